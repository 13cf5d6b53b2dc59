"""Training throughput and quality: our trainer vs EleutherAI sparsify on the same activations.

Every arm trains a TopK SAE of the same shape (d_in, n, k) and batch size on the same
planted-dictionary activations (sparse codes × a random unit-norm dictionary + noise), fp32 on
CPU. sparsify's ``SparseCoder`` is driven step by step as ``sparsify/trainer.py`` (v1.3) drives
it: the decoder renormalised before each forward, ``b_dec`` set to the first batch's mean, the
gradient parallel to the decoder rows removed, no clipping, AuxK off (``auxk_alpha`` 0) and its
two optimisers with their own lr rules:

- signum (its default): schedule-free SignSGD, momentum 0.95, lr 5e-3/√(n/2¹⁴);
- adam: Adam, lr 2e-4/√(n/2¹⁴), linear warm-up over ``--sparsify-warmup`` steps (its default
  1,000), then linear decay to 0.

Ours runs ``train_sae`` with its defaults (BatchTopK and per-token TopK). Reported:

1. throughput, tokens/s per arm over ``--rounds`` interleaved rounds of ``--timing-steps`` steps
   (median and range; the ratio is taken per round, then its median and range);
2. held-out FVU after ``--tokens`` tokens, each arm with its own recipe, at its default lr and at
   the best of the same lr grid (``--lr-multipliers`` × its own rule, picked on a validation
   set: every arm gets the same tuning budget), plus one control arm: sparsify's ``SparseCoder``
   under our recipe (our initialisation and optimiser), which shows how much of an FVU gap comes
   from the recipe rather than the model code.

    python benchmarks/sae_train.py [--d 512 --n 8192 --k 32 --batch 1024 --tokens 262144 --rounds 3]

Writes benchmarks/results/sae_train.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import describe_run, time_rounds

from saeuron_plugin.sae.train import geometric_median, train_sae

RESULTS = Path(__file__).parent / "results"
Reconstruct = Callable[[torch.Tensor], torch.Tensor]


def planted(d: int, atoms: int, k_true: int, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(atoms, d, generator=torch.Generator().manual_seed(0)), dim=1)
    idx = torch.randint(0, atoms, (rows, k_true), generator=g)
    vals = torch.rand(rows, k_true, generator=g) * 2 + 0.5
    x = F.embedding_bag(idx, dictionary, per_sample_weights=vals, mode="sum")  # never a dense code matrix
    return x + 0.02 * torch.randn(rows, d, generator=g)


def held_out_fvu(reconstruct: Reconstruct, x: torch.Tensor) -> float:
    with torch.no_grad():
        rec = reconstruct(x)
    return float((rec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


# ------------------------------------------------------------------ sparsify, as its trainer drives it
def train_sparsify(
    data: torch.Tensor,
    args: argparse.Namespace,
    steps: int,
    optimizer: str,
    lr_mult: float = 1.0,
    our_recipe: bool = False,
) -> Reconstruct:
    """``steps`` steps of sparsify's ``SparseCoder`` on consecutive batches of ``data``.

    ``our_recipe``: the control arm, our trainer's recipe around sparsify's model (our
    initialisation, geometric-median ``b_dec``, Adam at our lr with clipping and AuxK).
    """
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(args.seed)
    device = getattr(args, "device", "cpu")
    coder = SparseCoder(args.d, SparseCoderConfig(num_latents=args.n, k=args.k), device=device)
    scale = (args.n / 2**14) ** 0.5
    with torch.no_grad():
        first = data[: args.batch]
        if our_recipe:
            w = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(args.seed))
            w = F.normalize(w, dim=1).to(device)
            coder.encoder.weight.copy_(w)
            coder.W_dec.copy_(w)
            coder.b_dec.copy_(geometric_median(first))
        else:
            coder.b_dec.copy_(first.mean(0))
    schedule: Callable[[int], float] = lambda step: 1.0  # noqa: E731
    if optimizer == "signum":
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        groups = [{"params": coder.parameters(), "lr": lr_mult * 5e-3 / scale}]
        opt = ScheduleFreeWrapper(SignSGD(groups), momentum=0.95)
        opt.train()
    else:
        lr = lr_mult * 2e-4 / scale
        opt = torch.optim.Adam(coder.parameters(), lr=lr, eps=6.25e-10 if our_recipe else 1e-8)
        warm = 0 if our_recipe else args.sparsify_warmup

        def schedule(step: int) -> float:
            if step < warm:
                return step / warm
            return max(0.0, (steps - step) / max(1, steps - warm))

    since_fired = torch.zeros(args.n, dtype=torch.long, device=device)
    for step in range(steps):
        x = data[(step * args.batch) % len(data) :][: args.batch]
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
            if optimizer == "adam":
                group["lr"] = group["base_lr"] * schedule(step)
        coder.set_decoder_norm_to_unit_norm()
        dead = since_fired > args.dead_tokens if our_recipe else None
        out = coder(x, dead_mask=dead)
        loss = out.fvu + (out.auxk_loss / 32 if our_recipe else 0.0)
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        if our_recipe:
            torch.nn.utils.clip_grad_norm_(coder.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        since_fired += x.shape[0]
        since_fired[out.latent_indices.flatten()] = 0
    if optimizer == "signum":
        opt.eval()  # schedule-free: evaluate at the averaged weights, as sparsify saves them
    coder.set_decoder_norm_to_unit_norm()
    return lambda x: coder(x).sae_out


def train_ours(
    data: torch.Tensor, args: argparse.Namespace, steps: int, batch_topk: bool, lr_mult: float = 1.0
) -> Reconstruct:
    sae = train_sae(
        [data],
        k=args.k,
        num_latents=args.n,
        batch_size=args.batch,
        steps=steps,
        batch_topk=batch_topk,
        lr=lr_mult * 2e-4 / (args.n / 2**14) ** 0.5,  # our default rule × lr_mult
        dead_tokens_threshold=args.dead_tokens,
        progress=False,
        seed=args.seed,
        device=getattr(args, "device", "cpu"),
    )
    return lambda x: sae(x).reconstruction


Arm = Callable[[torch.Tensor, argparse.Namespace, int, float], Reconstruct]
ARMS: dict[str, Arm] = {
    "sparsify signum (its default)": lambda d, a, s, m: train_sparsify(d, a, s, "signum", m),
    "sparsify adam": lambda d, a, s, m: train_sparsify(d, a, s, "adam", m),
    "ours TopK": lambda d, a, s, m: train_ours(d, a, s, False, m),
    "ours BatchTopK (default)": lambda d, a, s, m: train_ours(d, a, s, True, m),
}
CONTROL = "control: sparsify model, our recipe"


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=262_144, help="training budget of the quality runs")
    p.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    p.add_argument("--timing-steps", type=int, default=48, help="optimiser steps per arm and round")
    p.add_argument(
        "--lr-multipliers",
        default="0.5,1,2,4,8",
        help="every arm's lr grid, as multiples of its own default rule (the same budget for all)",
    )
    p.add_argument("--dead-tokens", type=int, default=100_000)
    p.add_argument("--sparsify-warmup", type=int, default=1000, help="sparsify's lr_warmup_steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "sae_train")
    args = p.parse_args()
    mults = [float(m) for m in args.lr_multipliers.split(",")]
    header = describe_run(args.seed)
    setup = (
        f"setup   : d_in={args.d} n={args.n} k={args.k} batch={args.batch} fp32 CPU; throughput "
        f"{args.rounds} interleaved rounds × {args.timing_steps} steps; quality {args.tokens} tokens "
        f"({args.tokens // args.batch} steps) per lr in {mults} × each arm's default, picked on a "
        "validation set, FVU on a separate test set"
    )
    print(header + "\n" + setup + "\n", flush=True)
    try:
        import sparsify  # noqa: F401
    except ImportError as err:
        hint = "eai-sparsify is not installed: `pip install eai-sparsify` (make bench does it)"
        raise SystemExit(hint) from err

    data = planted(args.d, 4 * args.d, 8, args.tokens, args.seed)
    valid = planted(args.d, 4 * args.d, 8, 8192, args.seed + 1)
    test = planted(args.d, 4 * args.d, 8, 8192, args.seed + 2)
    timing_data = data[: args.timing_steps * args.batch]
    seconds = time_rounds(
        {
            name: (lambda arm=arm: arm(timing_data, args, args.timing_steps, 1.0))
            for name, arm in ARMS.items()
        },
        args.rounds,
    )
    tokens = args.timing_steps * args.batch
    throughput = {name: [tokens / s for s in times] for name, times in seconds.items()}

    sweep: dict[str, dict[str, dict[str, float]]] = {}
    steps = args.tokens // args.batch
    for name, arm in ARMS.items():
        for mult in mults:
            model = arm(data, args, steps, mult)
            sweep.setdefault(name, {})[f"{mult:g}"] = {
                "valid": held_out_fvu(model, valid),
                "test": held_out_fvu(model, test),
            }
            print(
                f"quality run: {name} lr ×{mult:g}: valid FVU {sweep[name][f'{mult:g}']['valid']:.4f}",
                flush=True,
            )
    control = held_out_fvu(train_sparsify(data, args, steps, "adam", our_recipe=True), test)
    default_fvu = {name: runs["1"]["test"] for name, runs in sweep.items()}
    best_mult = {name: min(runs, key=lambda m: runs[m]["valid"]) for name, runs in sweep.items()}
    best_fvu = {name: sweep[name][m]["test"] for name, m in best_mult.items()}

    lines = [f"{'arm':30s} {'tokens/s median [range]':>25s} {'FVU default lr':>15s} {'FVU best lr':>17s}"]
    for name in ARMS:
        t = throughput[name]
        best = f"{best_fvu[name]:.4f} (×{best_mult[name]})"
        lines.append(
            f"{name:30s} {statistics.median(t):8.0f} [{min(t):6.0f}, {max(t):6.0f}] "
            f"{default_fvu[name]:15.4f} {best:>17s}"
        )
    lines.append(f"{CONTROL:56s} {control:15.4f}")
    ratios: dict[str, dict[str, list[float]]] = {}
    for base in ("sparsify signum (its default)", "sparsify adam"):
        lines.append(f"\nthroughput ratio per round vs {base}, median [range]; FVU at the best lr:")
        for name in ("ours TopK", "ours BatchTopK (default)"):
            r = [a / b for a, b in zip(throughput[name], throughput[base], strict=True)]
            ratios.setdefault(name, {})[base] = r
            lines.append(f"  {name:28s} {spread(r)}×   FVU {best_fvu[name]:.4f} vs {best_fvu[base]:.4f}")
    report = "\n".join(lines)
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(f"```\n{header}\n{setup}\n\n{report}\n```\n")
    payload = {
        "header": header,
        "setup": setup,
        "throughput_tokens_per_s": throughput,
        "throughput_ratio": ratios,
        "fvu_sweep": sweep,
        "fvu_default_lr": default_fvu,
        "fvu_best_lr": best_fvu,
        "best_lr_multiplier": best_mult,
        "fvu_control_sparsify_model_our_recipe": control,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
