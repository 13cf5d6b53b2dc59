"""The ``saeuron`` command. Each subcommand has ``--help``; adapters load only when used."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import SAeUronError

Handler = Callable[[argparse.Namespace], int]
ArgsBuilder = Callable[[argparse.ArgumentParser], None]


# ----------------------------------------------------------------------------- train
def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--activations", required=True, help="activation store folder (saeuron collect)")
    p.add_argument("--out", required=True, help="output folder: cfg.json + sae.safetensors")
    p.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    p.add_argument("--expansion-factor", type=int, default=16, help="n = d_in × this (default 16)")
    p.add_argument("--num-latents", type=int, default=0, help="dictionary size (overrides expansion)")
    p.add_argument("--lr", type=float, default=None, help="Adam lr (default 2e-4/sqrt(n/2^14))")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per step and process")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: --epochs passes)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--encoder", choices=["topk", "threshold"], default="topk",
                   help="inference encoder saved in cfg.json (θ is calibrated either way)")
    p.add_argument("--per-token-topk", action="store_true", help="train with TopK instead of BatchTopK")
    p.add_argument("--auxk-alpha", type=float, default=1 / 32)
    p.add_argument("--dead-tokens", type=int, default=10_000_000, help="tokens without firing = dead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: accelerate's choice)")
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")


def _train(args: argparse.Namespace) -> int:
    from .sae.store import ActivationStore
    from .sae.train import TrainConfig, train_sae

    store = ActivationStore(args.activations)
    meta = store.metadata or {}
    cfg = TrainConfig(
        k=args.k, expansion_factor=args.expansion_factor, num_latents=args.num_latents, lr=args.lr,
        batch_size=args.batch_size, steps=args.steps, epochs=args.epochs, encoder=args.encoder,
        batch_topk=not args.per_token_topk, auxk_alpha=args.auxk_alpha,
        dead_tokens_threshold=args.dead_tokens, seed=args.seed,
        checkpoint_dir=str(Path(args.out) / "checkpoint"), checkpoint_every=args.checkpoint_every,
        resume=args.resume, device=args.device, mixed_precision=args.mixed_precision,
        hookpoint=meta.get("hookpoint"), model_family=meta.get("model_family"),
        base_model=meta.get("base_model"))
    sae = train_sae(store, cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # one writer under torchrun / accelerate
        sae.save_pretrained(args.out)
        s = sae.training_state
        print(json.dumps({"out": str(args.out), "steps": s.step, "tokens": s.tokens,
                          "fvu": round(s.last_fvu, 4), "dead_fraction": round(s.dead_fraction, 4),
                          "threshold": s.threshold}))
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
    p.add_argument("--concepts", nargs="+", default=["checkered", "star"],
                   help="ShapesCanvas concepts to unlearn, one at a time (default: a style and an object)")
    p.add_argument("--out", default="out/demo", help="folder for grid.png and metrics.json")
    p.add_argument("--bundle", default=None, help="SAE bundle (default: the shipped one)")
    p.add_argument("--prompts-per-set", type=int, default=36,
                   help="prompts with the concept, and as many without it")


def _demo(args: argparse.Namespace) -> int:
    from .eval.demo import run_demo

    root = Path(__file__).resolve().parents[1] / "checkpoints"
    bundle = args.bundle or str(root / "shapescanvas-saeuron")
    if not Path(bundle).is_dir() and args.bundle is None:
        raise FileNotFoundError(f"the shipped bundle {bundle} is missing; build it with "
                                "`python examples/build_shapescanvas_bundle.py`")
    run_demo(args.concepts, args.out, bundle=bundle, model=str(root / "shapescanvas-sd"),
             judges_path=str(root / "shapescanvas-judges"), prompts_per_set=args.prompts_per_set)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .eval.unlearning import run_from_args

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
    "collect": ("collect hookpoint activations from a diffusers pipeline into activation stores",
                _lazy(_DIFF, "collect_args"), _lazy(_DIFF, "collect")),  # type: ignore[dict-item]
    "train": ("train a TopK SAE on an activation store", _train_args, _train),
    "concept": ("build and inspect a bundle's concept library", {
        "add": ("run the statistics pass for a concept (or the background set)",
                _lazy(_DIFF, "concept_add_args"), _lazy(_DIFF, "concept_add")),
        "list": ("list the concepts of a bundle",
                 _lazy(_DIFF, "concept_list_args"), _lazy(_DIFF, "concept_list")),
        "show": ("which latents a concept ablates, when, and their scores",
                 _lazy(_DIFF, "concept_show_args"), _lazy(_DIFF, "concept_show")),
    }),
    "generate": ("generate images, optionally unlearning concepts (and side by side with the original)",
                 _lazy(_DIFF, "generate_args"), _lazy(_DIFF, "generate")),  # type: ignore[dict-item]
    "eval": ("the unlearning benchmark on ShapesCanvas: SAeUron vs baselines (UA/IRA/CRA)",
             _lazy(".eval.unlearning", "add_args"), _eval),  # type: ignore[dict-item]
    "vlm": ("the same for transformers vision-language models", {
        "collect": ("collect VLM hookpoint activations from (image, prompt) pairs",
                    _lazy(_VLM, "collect_args"), _lazy(_VLM, "collect")),
        "train": ("train an SAE on a VLM activation store", _lazy(_VLM, "train_args"), _lazy(_VLM, "train")),
        "concept": ("concept statistics from images with / without the concept",
                    _lazy(_VLM, "concept_args"), _lazy(_VLM, "concept")),
        "ask": ("answer a question about an image, with and without unlearning",
                _lazy(_VLM, "ask_args"), _lazy(_VLM, "ask")),
    }),
    "info": ("print an SAE's configuration", _info_args, _info),
    "demo": ("unlearn a style and an object on the embedded default model; grid + metrics",
             _demo_args, _demo),
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
    p.add_argument("--debug", action="store_true", default=default,
                   help="show the full traceback of an error (default: one line, exit 2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saeuron", description="Concept unlearning with sparse autoencoders (SAeUron).")
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_commands(sub, COMMANDS, "")
    return parser


# What a user's bad input raises: our own family, and the built-ins our messages use (a missing file,
# a bad value). Anything else is a bug of ours: still one line, with how to get the traceback.
USER_ERRORS = (SAeUronError, ValueError, OSError, KeyError, TypeError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        print(f"saeuron {args.command_name}: internal error: {type(exc).__name__}: {_message(exc)} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


def _message(exc: BaseException) -> str:
    """One line: the message, without KeyError's quotes or a multi-line tail."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and type(exc).__str__ is KeyError.__str__ \
        and exc.args else str(exc)
    lines = text.strip().splitlines() or [type(exc).__name__]
    return lines[0] + (" [...]" if len(lines) > 1 else "")


if __name__ == "__main__":
    sys.exit(main())
