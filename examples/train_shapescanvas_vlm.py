"""Train the ShapesCanvas VLM (a tiny LLaVA) from scratch on CPU and save it, with one command.

    python examples/train_shapescanvas_vlm.py [--out checkpoints/shapescanvas-vlm --threads 2]

Builds the model, processor and tokenizer in code (``saeuron_plugin.shapescanvas.vlm``), trains
on fresh ShapesCanvas renders, saves fp16 safetensors + JSON, reloads the folder and writes its
held-out accuracy (fresh renders of another seed) and the wall time into the folder's README.md.
"""

from __future__ import annotations

import argparse
import functools

import torch

from saeuron_plugin.shapescanvas.vlm import TrainConfig, train_and_save


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--out", default=d.out)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_and_save(
        TrainConfig(out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
        log=functools.partial(print, flush=True),
    )


if __name__ == "__main__":
    main()
