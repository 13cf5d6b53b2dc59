"""Command-line options generated from a config dataclass and its field docs (as sparsify does with
``simple_parsing``): one source of truth for names, types, defaults and help texts.

A field documented with an attribute docstring (the string right below it) becomes ``--field-name``:

* ``int`` / ``float`` / ``str`` (optionally ``| None``) fields take a value of that type;
* ``bool`` fields become a switch: ``--name`` when the default is False, ``--no-name`` when True;
* ``Literal[...]`` fields take one of their values.

Fields of other types (dicts, lists) are left out; so are the names in ``skip``.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import types
import typing
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass's fields, read from its source."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _scalar(hint: Any) -> tuple[type | None, tuple[Any, ...] | None]:
    """(type, choices) of a field annotation we can expose, or (None, None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return type(args[0]), args
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return _scalar(rest[0]) if len(rest) == 1 else (None, None)
    if hint in (int, float, str, bool):
        return hint, None
    return None, None


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """Add one option per exposable field of ``cls`` (see the module docstring)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kind, choices = _scalar(hints[f.name])
        if kind is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        flag = "--" + f.name.replace("_", "-")
        names = (flag, *(aliases or {}).get(f.name, ()))
        text = docs.get(f.name, "")
        if kind is bool:
            if default:
                parser.add_argument(
                    f"--no-{f.name.replace('_', '-')}",
                    *names[1:],
                    dest=f.name,
                    action="store_false",
                    help=f"turn off: {text}",
                )
            else:
                parser.add_argument(*names, dest=f.name, action="store_true", help=text)
            continue
        shown = "" if default is None else f" (default {default})"
        parser.add_argument(
            *names, dest=f.name, type=kind, choices=choices, default=default, help=text + shown
        )


def dataclass_from_args(cls: type, args: argparse.Namespace, **overrides: Any) -> Any:
    """An instance of ``cls`` from the parsed options (fields without an option keep their default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


__all__ = ["add_dataclass_options", "dataclass_from_args", "field_docs"]
