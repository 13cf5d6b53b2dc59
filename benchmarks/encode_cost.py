"""Encode cost per token: full TopK encode vs the threshold encoder restricted to a few latents.

SAeUron's SAE size (d_in = 1280, n = 20,480, k = 32) on 2 × 16 × 16 tokens (one CFG pair of an
SD 1.5 ``up_blocks.1`` activation at 512 px). The threshold path computes only the selected
rows of W_enc (|F|·d MACs per token instead of n·d), which is what the ablation uses.

    python benchmarks/encode_cost.py [--latents 8 --tokens 512]
"""

from __future__ import annotations

import argparse

import torch
from _common import describe_run, time_call

from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=1280)
    p.add_argument("--n", type=int, default=20_480)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--latents", type=int, default=8)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(describe_run(args.seed))
    torch.manual_seed(args.seed)
    sae = SparseAutoencoder(SaeConfig(d_in=args.d, num_latents=args.n, k=args.k))
    thr = SparseAutoencoder(sae.cfg.replace(encoder="threshold", threshold=0.5))
    thr.load_state_dict(sae.state_dict())
    x = torch.randn(args.tokens, args.d)
    chosen = torch.randperm(args.n)[: args.latents]
    with torch.inference_mode():
        t_topk = time_call(lambda: sae.encode_sparse(x), repeats=9)
        t_dense = time_call(lambda: sae.encode(x), repeats=9)
        t_sub = time_call(lambda: thr.encode_subset(x, chosen), repeats=51, warmup=5)
    per = 1e6 / args.tokens
    print(f"setup   : d_in={args.d} n={args.n} k={args.k} tokens={args.tokens} subset={args.latents} fp32\n")
    print(f"topk encode (sparse code)      {t_topk * per:9.3f} µs/token")
    print(f"topk encode (dense latents)    {t_dense * per:9.3f} µs/token")
    print(f"threshold, {args.latents} latents only     {t_sub * per:9.3f} µs/token")
    print(
        f"ratio topk / threshold-subset: {t_topk / t_sub:.1f}× "
        f"(arithmetic: n/|F| = {args.n / args.latents:.0f}×)"
    )


if __name__ == "__main__":
    main()
