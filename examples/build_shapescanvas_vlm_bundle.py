"""Build the SAeUron bundle of the ShapesCanvas VLM with one command.

    python examples/build_shapescanvas_vlm_bundle.py [--out checkpoints/shapescanvas-vlm-saeuron --threads 2]

Collection (image tokens of LM decoder layers), SAE training, the concept statistics pass and the
per-value search on validation renders run through the package's own code
(``saeuron_plugin.shapescanvas.vlm_build``); activations go to ``--work``.
"""

from __future__ import annotations

import argparse
import functools

import torch

from saeuron_plugin.shapescanvas.vlm_build import BundleConfig, build_bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BundleConfig()
    p.add_argument("--out", default=d.out)
    p.add_argument("--work", default=d.work)
    p.add_argument("--model", default=d.model)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    build_bundle(
        BundleConfig(out=args.out, work=args.work, model=args.model), log=functools.partial(print, flush=True)
    )


if __name__ == "__main__":
    main()
