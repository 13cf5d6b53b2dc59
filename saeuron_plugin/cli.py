"""The ``saeuron`` command. Each subcommand has ``--help``; adapters load only when used."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .cli_config import add_dataclass_options, dataclass_from_args
from .errors import SAeUronError

Handler = Callable[[argparse.Namespace], int]
ArgsBuilder = Callable[[argparse.ArgumentParser], None]


# ----------------------------------------------------------------------------- train
# Set by the command itself (from --out and the store's metadata), or not meaningful on the command line.
_TRAIN_SKIP = ("checkpoint_dir", "hookpoint", "model_family", "base_model", "extra", "progress")
_PROVENANCE = ("hookpoint", "model_family", "base_model")


def _train_args(p: argparse.ArgumentParser) -> None:
    from .sae.train import TrainConfig

    p.add_argument("--activations", required=True, help="activation store (saeuron collect / vlm collect)")
    p.add_argument("--out", required=True, help="output folder: cfg.json + sae.safetensors (+ checkpoint/)")
    aliases = {"dead_tokens_threshold": ("--dead-tokens",), "batch_topk": ("--per-token-topk",)}
    add_dataclass_options(p, TrainConfig, skip=_TRAIN_SKIP, aliases=aliases)


def _train(args: argparse.Namespace) -> int:
    """Train on any activation store (diffusers or VLM): the store's provenance (hookpoint, family,
    base model) and its other metadata (e.g. the VLM token set) go into cfg.json."""
    from .sae.store import ActivationStore
    from .sae.train import TrainConfig, Trainer

    store = ActivationStore(args.activations)
    meta = store.metadata or {}
    cfg = dataclass_from_args(
        TrainConfig,
        args,
        checkpoint_dir=str(Path(args.out) / "checkpoint"),
        extra={k: v for k, v in meta.items() if k not in _PROVENANCE},
        **{k: meta.get(k) for k in _PROVENANCE},
    )
    sae, s = Trainer(store, cfg).fit()
    if int(os.environ.get("RANK", "0")) == 0:  # one writer under torchrun / accelerate
        sae.save_pretrained(args.out)
        print(
            json.dumps(
                {
                    "out": str(args.out),
                    "hookpoint": sae.cfg.hookpoint,
                    "steps": s.step,
                    "tokens": s.tokens,
                    "fvu": round(s.last_fvu, 4),
                    "dead_fraction": round(s.dead_fraction, 4),
                    "threshold": s.threshold,
                }
            )
        )
    return 0


def _vlm_train(args: argparse.Namespace) -> int:
    print("saeuron vlm train: deprecated, use `saeuron train` (the same options, any store)", file=sys.stderr)
    return _train(args)


# ------------------------------------------------------------------------------ build
def _build_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="TOML recipe: model, hookpoints, prompts, SAE, concepts, judge, budget")


def _build(args: argparse.Namespace) -> int:
    from .sae.processes import Processes
    from .tuning.build import build

    bundle = build(args.recipe)
    if Processes.current().main:
        print(json.dumps({"bundle": str(bundle)}))
    return 0


# ------------------------------------------------------------------------------ info
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sae", help="SAE folder or Hub repo id")
    p.add_argument("--subfolder", default=None, help="hookpoint folder inside a repo")


def _info(args: argparse.Namespace) -> int:
    from .sae.model import SparseAutoencoder

    sae = SparseAutoencoder.from_pretrained(args.sae, subfolder=args.subfolder)
    print(json.dumps({**sae.cfg.to_dict(), "fingerprint": sae.fingerprint()}, indent=2))
    return 0


# ------------------------------------------------------------------------------ demo
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--concepts",
        nargs="+",
        default=["checkered", "star"],
        help="ShapesCanvas concepts to unlearn, one at a time (default: a style and an object)",
    )
    p.add_argument("--out", default="out/demo", help="folder for grid.png and metrics.json")
    p.add_argument("--bundle", default=None, help="SAE bundle (default: the shipped one)")
    p.add_argument(
        "--prompts-per-set", type=int, default=36, help="prompts with the concept, and as many without it"
    )


def _demo(args: argparse.Namespace) -> int:
    from .shapescanvas.demo import run_demo

    root = Path(__file__).resolve().parents[1] / "checkpoints"
    bundle = args.bundle or str(root / "shapescanvas-saeuron")
    if not Path(bundle).is_dir() and args.bundle is None:
        raise FileNotFoundError(
            f"the shipped bundle {bundle} is missing; build it with "
            "`python examples/build_shapescanvas_bundle.py`"
        )
    run_demo(
        args.concepts,
        args.out,
        bundle=bundle,
        model=str(root / "shapescanvas-sd"),
        judges_path=str(root / "shapescanvas-judges"),
        prompts_per_set=args.prompts_per_set,
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.robustness:
        from .benchmark import robustness

        robustness.run_from_args(robustness.from_eval_args(args))
        return 0
    from .benchmark.unlearning import run_from_args

    run_from_args(args, "saeuron eval " + " ".join(sys.argv[2:]))
    return 0


# ------------------------------------------------------------------------ adapters
def _lazy(module: str, name: str) -> Callable[..., object]:
    """A function of an adapter module, imported only when the subcommand runs (or builds its options)."""

    def call(*args: object) -> object:
        import importlib

        return getattr(importlib.import_module(module, __package__), name)(*args)

    return call


_DIFF = ".diffusion.commands"
_VLM = ".vlm.commands"

# ------------------------------------------------------------------------------ main
Command = tuple[str, ArgsBuilder, Handler]
COMMANDS: dict[str, Command | tuple[str, dict[str, Command]]] = {
    "collect": (
        "collect hookpoint activations from a diffusers pipeline into activation stores",
        _lazy(_DIFF, "collect_args"),
        _lazy(_DIFF, "collect"),
    ),  # type: ignore[dict-item]
    "train": ("train a TopK SAE on an activation store", _train_args, _train),
    "concept": (
        "build and inspect a bundle's concept library",
        {
            "add": (
                "run the statistics pass for a concept (or the background set)",
                _lazy(_DIFF, "concept_add_args"),
                _lazy(_DIFF, "concept_add"),
            ),
            "list": (
                "list the concepts of a bundle",
                _lazy(_DIFF, "concept_list_args"),
                _lazy(_DIFF, "concept_list"),
            ),
            "show": (
                "which latents a concept ablates, when, and their scores",
                _lazy(_DIFF, "concept_show_args"),
                _lazy(_DIFF, "concept_show"),
            ),
        },
    ),
    "tune": (
        "tune how a bundle unlearns concepts on a pipeline, judged by a judge (writes the defaults)",
        _lazy(".tuning.commands", "tune_args"),
        _lazy(".tuning.commands", "tune"),
    ),  # type: ignore[dict-item]
    "build": (
        "run a recipe: collect → train → statistics → tune → model card → push (resumable)",
        _build_args,
        _build,
    ),
    "attack": (
        "attack an unlearned concept through the edit (soft, token or typed prompts); UA before and after",
        _lazy(".attacks.commands", "attack_args"),
        _lazy(".attacks.commands", "attack"),
    ),  # type: ignore[dict-item]
    "diagnose": (
        "what an unlearning edit does inside the model: metrics per block and τ, effect sizes, heatmaps",
        _lazy(".diagnostics.commands", "diagnose_args"),
        _lazy(".diagnostics.commands", "diagnose_command"),
    ),  # type: ignore[dict-item]
    "generate": (
        "generate images, optionally unlearning concepts (and side by side with the original)",
        _lazy(_DIFF, "generate_args"),
        _lazy(_DIFF, "generate"),
    ),  # type: ignore[dict-item]
    "eval": (
        "the unlearning benchmark on ShapesCanvas: SAeUron vs baselines (UA/IRA/CRA; --robustness: attacked)",
        _lazy(".benchmark.unlearning", "add_args"),
        _eval,
    ),  # type: ignore[dict-item]
    "vlm": (
        "the same for transformers vision-language models",
        {
            "collect": (
                "collect VLM hookpoint activations from (image, prompt) pairs",
                _lazy(_VLM, "collect_args"),
                _lazy(_VLM, "collect"),
            ),
            "train": ("deprecated: `saeuron train` trains on any store", _train_args, _vlm_train),
            "concept": (
                "concept statistics from images with / without the concept",
                _lazy(_VLM, "concept_args"),
                _lazy(_VLM, "concept"),
            ),
            "ask": (
                "answer a question about an image, with and without unlearning",
                _lazy(_VLM, "ask_args"),
                _lazy(_VLM, "ask"),
            ),
        },
    ),
    "info": ("print an SAE's configuration", _info_args, _info),
    "demo": (
        "unlearn a style and an object on the embedded default model; grid + metrics",
        _demo_args,
        _demo,
    ),
}


def _add_commands(sub: Any, commands: dict[str, Any], prefix: str) -> None:
    for name, spec in commands.items():
        if isinstance(spec[1], dict):
            p = sub.add_parser(name, help=spec[0], description=spec[0])
            nested = p.add_subparsers(dest=f"{prefix}{name}_command", required=True, metavar="SUBCOMMAND")
            _add_commands(nested, spec[1], f"{prefix}{name} ")
            continue
        help_text, build, handler = spec
        p = sub.add_parser(name, help=help_text, description=help_text)
        build(p)
        _add_debug(p, argparse.SUPPRESS)  # SUPPRESS: `saeuron --debug CMD` is not reset by the subparser
        p.set_defaults(handler=handler, command_name=f"{prefix}{name}")


def _add_debug(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the full traceback of an error (default: one line, exit 2)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saeuron", description="Concept unlearning with sparse autoencoders (SAeUron)."
    )
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_commands(sub, COMMANDS, "")
    return parser


# What a user's bad input raises: our own family, and the built-ins our messages use (a missing file,
# a bad value). Anything else is a bug of ours: still one line, with how to get the traceback.
USER_ERRORS = (SAeUronError, ValueError, OSError, KeyError, TypeError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that write results
    debug = bool(getattr(args, "debug", False)) or os.environ.get("SAEURON_DEBUG", "") not in ("", "0")
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"saeuron {args.command_name}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"saeuron {args.command_name}: error: {_message(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            raise
        print(
            f"saeuron {args.command_name}: internal error: {type(exc).__name__}: {_message(exc)} "
            "(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


def _message(exc: BaseException) -> str:
    """One line: the message, without KeyError's quotes or a multi-line tail."""
    text = (
        str(exc.args[0])
        if isinstance(exc, KeyError) and type(exc).__str__ is KeyError.__str__ and exc.args
        else str(exc)
    )
    lines = text.strip().splitlines() or [type(exc).__name__]
    return lines[0] + (" [...]" if len(lines) > 1 else "")


if __name__ == "__main__":
    sys.exit(main())
