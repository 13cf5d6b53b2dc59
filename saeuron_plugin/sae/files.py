"""Readers that turn any bad file into one clear error naming the file and the field.

Every JSON or safetensors file the package reads (SAE configs, concept statistics and their index,
activation-store manifests and shards, trainer checkpoints, bundle recipes) goes through these, so
a truncated file, random bytes, a pickle in place of safetensors, a JSON value of the wrong type, a
missing field or NaN/inf values all end in :class:`~saeuron_plugin.errors.BadFileError` (a
``ValueError``) rather than a raw ``SafetensorError``, ``JSONDecodeError`` or ``KeyError``.
Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from ..errors import BadFileError, MissingFileError

PathLike = str | os.PathLike[str]

_TYPE_NAMES = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true/false",
    dict: "an object",
    list: "a list",
}


def read_json(path: PathLike, what: str = "JSON file") -> Any:
    """Parse ``path`` as JSON; a missing, unreadable, truncated or non-JSON file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no {what} at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BadFileError(path, f"not a {what}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise BadFileError(path, f"cannot read the {what}: {err}") from err
    if not text.strip():
        raise BadFileError(path, f"the {what} is empty (zero bytes or blank)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise BadFileError(path, f"not valid JSON (truncated or corrupt?): {err}") from err


def read_json_object(path: PathLike, what: str = "JSON file") -> dict[str, Any]:
    """:func:`read_json` for files that must hold one JSON object."""
    raw = read_json(path, what)
    if not isinstance(raw, dict):
        raise BadFileError(path, f"the {what} must hold a JSON object, got {type(raw).__name__}")
    return raw


def typed_field(
    raw: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    path: PathLike,
    *,
    default: Any = ...,
    positive: bool = False,
    finite: bool = True,
) -> Any:
    """``raw[name]`` checked against ``kind`` (``bool`` is never an ``int`` here; an integral float
    counts as an ``int`` only if ``kind`` allows float); missing without a default is an error."""
    if name not in raw or raw[name] is None:
        if default is not ...:
            return default
        raise BadFileError(path, "missing", field=name)
    value = raw[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise BadFileError(path, f"must be {want}, got {type(value).__name__} {value!r}"[:200], field=name)
    if isinstance(value, float) and finite and not math.isfinite(value):
        raise BadFileError(path, f"must be finite, got {value!r}", field=name)
    if positive and isinstance(value, int | float) and value <= 0:
        raise BadFileError(path, f"must be positive, got {value!r}", field=name)
    return value


class SafetensorsFile(NamedTuple):
    """What a safetensors file holds: tensors (those asked for) and its string metadata."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]


def read_safetensors(
    path: PathLike, what: str, names: Iterable[str] | None = None, *, finite: bool = True
) -> SafetensorsFile:
    """Load tensors (all, or ``names``, each required) and the header metadata of ``path``.

    Truncated files, random bytes and pickles fail in the header parse and are reported as
    :class:`BadFileError`; with ``finite`` a NaN/inf value names its tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no {what} at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            available = set(fh.keys())
            wanted = list(available) if names is None else list(names)
            missing = [n for n in wanted if n not in available]
            if missing:
                raise BadFileError(
                    path,
                    f"the {what} has no tensor(s) {missing} (it holds {sorted(available)})",
                    field=missing[0],
                )
            tensors = {n: fh.get_tensor(n) for n in wanted}
    except BadFileError:
        raise
    except Exception as err:  # SafetensorError, OSError, and whatever a garbage header raises
        raise BadFileError(
            path,
            f"not a readable {what} (truncated, corrupt, or not safetensors: {type(err).__name__}: {err})",
        ) from err
    if finite:
        for name, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise BadFileError(path, f"holds {bad} NaN/inf value(s)", field=name)
    return SafetensorsFile(tensors, metadata)


def safetensors_shapes(path: PathLike, what: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name → (shape, dtype) from the header alone (no tensor data read): a cheap integrity check.
    ``safe_open`` itself refuses a file shorter than its header promises (truncated)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"no {what} at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            out = {}
            for name in fh.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
                piece = fh.get_slice(name)
                out[name] = (tuple(piece.get_shape()), str(piece.get_dtype()))
    except Exception as err:
        raise BadFileError(
            path,
            f"not a readable {what} (truncated, corrupt, or not safetensors: {type(err).__name__}: {err})",
        ) from err
    return out


__all__ = [
    "BadFileError",
    "MissingFileError",
    "SafetensorsFile",
    "read_json",
    "read_json_object",
    "read_safetensors",
    "safetensors_shapes",
    "typed_field",
]
