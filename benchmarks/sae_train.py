"""Training throughput and quality: our trainer vs EleutherAI sparsify on the same activations.

Both train a TopK SAE of the same shape (d_in, n, k), batch size, learning rate and token
budget, on CPU, from the same planted-dictionary activations (sparse codes × a random
unit-norm dictionary + noise). sparsify's ``SparseCoder`` is driven with the per-step recipe
of its trainer (FVU + AuxK, parallel-gradient removal, Adam, decoder renormalisation).
Reported: tokens/s of each, held-out FVU at the end, and the ratio, measured in this run.

    python benchmarks/sae_train.py [--d 512 --n 8192 --k 32 --batch 1024 --tokens 262144]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from _common import describe_run

from saeuron_plugin.sae.train import train_sae


def planted(d: int, atoms: int, k_true: int, rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dictionary = F.normalize(torch.randn(atoms, d, generator=torch.Generator().manual_seed(0)), dim=1)
    idx = torch.randint(0, atoms, (rows, k_true), generator=g)
    vals = torch.rand(rows, k_true, generator=g) * 2 + 0.5
    codes = torch.zeros(rows, atoms).scatter_add_(1, idx, vals)
    return codes @ dictionary + 0.02 * torch.randn(rows, d, generator=g)


def held_out_fvu(encode_decode, x: torch.Tensor) -> float:
    with torch.no_grad():
        rec = encode_decode(x)
    return float((rec - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def run_sparsify(chunks: list[torch.Tensor], args: argparse.Namespace, lr: float) -> tuple[float, object]:
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(args.seed)
    coder = SparseCoder(args.d, SparseCoderConfig(num_latents=args.n, k=args.k))
    first = torch.cat(chunks)[: args.batch]
    with torch.no_grad():
        coder.b_dec.copy_(first.median(0).values)  # sparsify's trainer also starts b_dec centred
    opt = torch.optim.Adam(coder.parameters(), lr=lr, eps=6.25e-10)
    since_fired = torch.zeros(args.n, dtype=torch.long)
    steps = args.tokens // args.batch
    data = torch.cat(chunks)
    start = time.perf_counter()
    for step in range(steps):
        x = data[(step * args.batch) % len(data) :][: args.batch]
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        out = coder(x, dead_mask=since_fired > args.dead_tokens)
        loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        coder.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(coder.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        coder.set_decoder_norm_to_unit_norm()
        since_fired += x.shape[0]
        since_fired[out.latent_indices.flatten()] = 0
    elapsed = time.perf_counter() - start
    return steps * args.batch / elapsed, lambda x: coder(x).sae_out


def run_ours(
    chunks: list[torch.Tensor], args: argparse.Namespace, lr: float, batch_topk: bool
) -> tuple[float, object]:
    torch.manual_seed(args.seed)
    steps = args.tokens // args.batch
    start = time.perf_counter()
    sae = train_sae(
        chunks,
        k=args.k,
        num_latents=args.n,
        batch_size=args.batch,
        steps=steps,
        lr=lr,
        batch_topk=batch_topk,
        dead_tokens_threshold=args.dead_tokens,
        progress=False,
        seed=args.seed,
        device="cpu",
    )
    elapsed = time.perf_counter() - start
    return steps * args.batch / elapsed, lambda x: sae(x).reconstruction


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=262_144)
    p.add_argument("--dead-tokens", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(describe_run(args.seed))
    data = planted(args.d, 4 * args.d, 8, args.tokens, args.seed)
    chunks = list(data.split(8192))
    test = planted(args.d, 4 * args.d, 8, 8192, args.seed + 1)
    lr = 2e-4 / (args.n / 2**14) ** 0.5 * 4  # short budget: a 4× larger lr than the long-run rule
    print(
        f"setup   : d_in={args.d} n={args.n} k={args.k} batch={args.batch} tokens={args.tokens} "
        f"lr={lr:.2e} fp32 CPU\n"
    )
    rows = []
    try:
        rows.append(("eai-sparsify SparseCoder (TopK)", *run_sparsify(chunks, args, lr)))
    except ImportError:
        print("eai-sparsify is not installed: `pip install eai-sparsify` (make bench does it)")
    rows.append(("saeuron train_sae (TopK)", *run_ours(chunks, args, lr, batch_topk=False)))
    rows.append(("saeuron train_sae (BatchTopK)", *run_ours(chunks, args, lr, batch_topk=True)))
    print(f"{'trainer':34s} {'tokens/s':>10s} {'held-out FVU':>13s}")
    results = []
    for name, tps, model in rows:
        fvu = held_out_fvu(model, test)
        results.append((name, tps, fvu))
        print(f"{name:34s} {tps:10.0f} {fvu:13.4f}")
    if results[0][0].startswith("eai"):
        base = results[0][1]
        for name, tps, fvu in results[1:]:
            print(
                f"ratio {name} / sparsify: throughput {tps / base:.2f}×, FVU {fvu:.4f} vs {results[0][2]:.4f}"
            )


if __name__ == "__main__":
    main()
