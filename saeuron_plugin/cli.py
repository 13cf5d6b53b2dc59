"""The ``saeuron`` command. Each subcommand has ``--help``; adapters load only when used."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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
def _no_args(p: argparse.ArgumentParser) -> None:
    """A subcommand without options."""


def _demo(args: argparse.Namespace) -> int:
    print("no demo yet: the embedded ShapesCanvas default model is not shipped in this version "
          "(see CHANGELOG). `make test` exercises everything that exists.")
    return 0


# ------------------------------------------------------------------------------ main
COMMANDS: dict[str, tuple[str, ArgsBuilder, Handler]] = {
    "train": ("train a TopK SAE on an activation store", _train_args, _train),
    "info": ("print an SAE's configuration", _info_args, _info),
    "demo": ("unlearn a concept on the embedded default model", _no_args, _demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saeuron", description="Concept unlearning with sparse autoencoders (SAeUron).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, build, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        build(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError, KeyError) as exc:  # our errors carry clear messages
        print(f"saeuron {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
