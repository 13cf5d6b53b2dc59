"""Build the shipped SAeUron bundle of the embedded default with one command.

About 1 h 45 min on 2 cores, estimated from the timed parts (steps 1-3 took 20 min; the search
costs about 0.34 s per validation image).

    python examples/build_shapescanvas_bundle.py [--out checkpoints/shapescanvas-saeuron --threads 2]

Collection, SAE training, the concept statistics pass and the per-concept hyperparameter search all
run through the package's own code (``saeuron_plugin.shapescanvas.build``); intermediate
activations go to ``--work`` and a re-run skips the prompts already collected. The SAEs and
statistics (steps 1-3) are saved in ``--work``/trained; a re-run with the same recipe starts at the
search (about 90 min with the object grid of 69 settings and stage 2), so an interrupted build or a
new search grid does not retrain. The search (the generic tuner's, ``saeuron_plugin.tuning.search``)
saves every trial in ``--work``/search/search.json as it is judged and resumes there too.

    python examples/build_shapescanvas_bundle.py --from-bundle checkpoints/shapescanvas-saeuron

re-tunes the shipped bundle in place: its SAEs and statistics are kept, trials its ``search.json``
already holds are not rerun (only new grid points and the stage-2 refinement run). The robustness
stage (the bundle's robust mode) attacks each concept's winner at its hookpoints and at every hookpoint
holding it (about 1 min per concept); ``--robust-attacks 0`` skips it.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

import torch

from saeuron_plugin.shapescanvas.build import BundleConfig, build_bundle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BundleConfig()
    p.add_argument("--out", default=d.out)
    p.add_argument("--work", default=d.work)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--search-prompts", type=int, default=d.search_prompts)
    p.add_argument("--refine-prompts", type=int, default=d.refine_prompts)
    p.add_argument("--train-epochs", type=int, default=d.train_epochs)
    p.add_argument(
        "--robust-attacks",
        type=int,
        default=d.robust_attacks,
        help="captions UnlearnDiffAtk attacks per candidate in the robustness stage (0: no robust mode)",
    )
    p.add_argument(
        "--from-bundle",
        default=None,
        metavar="PATH_OR_REPO",
        help="re-tune this bundle's defaults: skip steps 1-3 and reuse its search.json trials",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = {f.name for f in fields(BundleConfig)}
    build_bundle(BundleConfig(**{k: v for k, v in vars(args).items() if k in names}))


if __name__ == "__main__":
    main()
