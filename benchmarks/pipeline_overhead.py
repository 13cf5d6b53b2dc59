"""Inference overhead of SAeUron on a whole pipeline, and the cost of activation collection.

Measured in one run on the embedded default (``checkpoints/shapescanvas-sd``, SD-1.x-shaped,
25 DDIM steps, guidance 5) with its shipped bundle: the plain pipeline vs the same call with one
concept unlearned, for the ``threshold`` encoder (only the selected latents are encoded), the
``topk`` encoder (full encode; on CPU only of tokens where a selected latent passes its gate) and
``topk-dense`` (full encode of every token, what a GPU runs). Calls are interleaved in rounds;
each hooked call is compared with the plain call of its own round (median of the paired ratios).

Two readings of the same overhead: the wall-time ratio of hooked to plain calls, and the share of
each hooked call's wall time spent inside our hooks (the timestep tracker and the editor, timed
with ``perf_counter``). On a shared 2-core machine the wall ratio of separate calls swings by
several percent between rounds; the in-call share is measured within one call, so outside load
slows its numerator and denominator alike and it stays steady.

The topk prediction is FLOP arithmetic: (tokens the hookpoint outputs per call, counted by a hook)
× n × d × 2 over the FLOPs of the plain pipeline call (FlopCounterMode). The same arithmetic for
SD 1.5 at 512 px with SAeUron's SAE (d = 1280, n = 20,480, one hookpoint at up_blocks.1, CFG
batch 2) uses a UNet built on the meta device (no weights). Collection: ``collect_activations``
into a temporary store vs the plain pipeline with ``output_type="latent"`` (what collection runs).

The robust mode (``unlearn(..., robust=True)``: each concept at the hookpoints its tuner chose
against adaptive attacks, often more) costs more hooks: for ``--robust-concept`` (star) the share of
each call spent in our hooks, topk encoder, default mode vs robust mode, in the same rounds.

    python benchmarks/pipeline_overhead.py [--prompts 8 --repeats 7 --concept striped --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import describe_run, paired_ratios, time_call, time_interleaved, time_rounds
from torch.utils.flop_counter import FlopCounterMode

from saeuron_plugin.diffusion.collect import collect_activations
from saeuron_plugin.diffusion.hookpoints import resolve_hookpoint, to_tokens
from saeuron_plugin.diffusion.hooks import install_hooks
from saeuron_plugin.diffusion.timestep import TimestepTracker
from saeuron_plugin.diffusion.unlearn import SAeUron
from saeuron_plugin.sae.ablation import kth_largest
from saeuron_plugin.shapescanvas import data as sc
from saeuron_plugin.shapescanvas.build import load_default


class HookClock:
    """Seconds spent inside wrapped callables (the editors and the timestep tracker's hooks)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


class TimedTracker(TimestepTracker):
    """The tracker ``install_hooks`` would make, with its two hooks timed by ``clock``."""

    def __init__(self, pipe, clock: HookClock) -> None:
        self._record = clock.wrap(self._record)  # bound before install() registers them
        self._clear = clock.wrap(self._clear)
        super().__init__(pipe)
        clock.seconds = 0.0  # the constructor's own first clear is not a hook call


def pipeline_flops(pipe, prompts, steps, guidance, paths: list[str]) -> tuple[float, dict[str, int]]:
    """(FLOPs of one plain call, tokens each hookpoint of ``paths`` outputs over that call)."""
    seen = dict.fromkeys(paths, 0)
    handles = []
    for path in paths:
        hookpoint = resolve_hookpoint(pipe, path)

        def count(module, args, output, path=path, index=hookpoint.output_index) -> None:
            seen[path] += to_tokens(output, index)[0].shape[:-1].numel()

        handles.append(hookpoint.module.register_forward_hook(count))
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="pt")
    finally:
        for handle in handles:
            handle.remove()
    return float(counter.get_total_flops()), seen


def selection_vs_gemm(tokens: int, n: int, d: int, k: int) -> tuple[float, float]:
    """Seconds of the encode GEMM [tokens, d] × [d, n] and of the per-token TopK selection after it
    (what the topk encoder does besides the FLOPs that the arithmetic counts), random data."""
    x, w, b = torch.randn(tokens, d), torch.randn(n, d) / d**0.5, torch.zeros(n)
    pre = F.linear(x, w, b)
    return time_call(lambda: F.linear(x, w, b), repeats=9), time_call(lambda: kth_largest(pre, k), repeats=9)


def sd15_paper_estimate() -> tuple[float, float]:
    """(UNet FLOPs per CFG step at 512 px, SAE encode FLOPs per step) for SD 1.5 with SAeUron's SAE."""
    from diffusers import UNet2DConditionModel

    cfg = dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
        x, text = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.tensor(500), text)
    tokens = 2 * 16 * 16  # up_blocks.1 at 512 px, both CFG rows
    return float(counter.get_total_flops()), 2.0 * tokens * 20_480 * 1280


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default="checkpoints/shapescanvas-saeuron")
    p.add_argument("--model", default="checkpoints/shapescanvas-sd")
    p.add_argument("--concept", default="striped")
    p.add_argument("--robust-concept", default="star", help="whose robust mode is timed against its default")
    p.add_argument("--prompts", type=int, default=8, help="prompts per pipeline call")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_run(args.seed))
    pipe = load_default(args.model)
    eraser = SAeUron.from_pretrained(args.bundle)
    prompts = [q.prompt for q in sc.benchmark_prompts()][:: 180 // args.prompts][: args.prompts]
    gens = lambda: [torch.Generator().manual_seed(args.seed + i) for i in range(len(prompts))]  # noqa: E731

    def run(output_type: str = "pt") -> object:
        return pipe(
            prompts,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=gens(),
            output_type=output_type,
        )

    modes = {"threshold": "threshold", "topk": "topk", "topk-dense": "topk"}
    robust_modes = {f"{args.robust_concept} {m}": m == "robust" for m in ("default", "robust")}
    with eraser.unlearn(pipe, args.concept) as probe:
        paths = list(probe.hookpoints)
    saes = {p: eraser.hookpoints[p].sae for p in paths}
    where = ", ".join(f"{p} (SAE d={s.d_in} n={s.num_latents} k={s.cfg.k})" for p, s in saes.items())
    print(
        f"setup   : {args.model}, {len(prompts)} prompts/call, {args.steps} DDIM steps, guidance "
        f"{args.guidance}; concept {args.concept!r} at {len(paths)} hookpoint(s): {where}; medians of "
        f"{args.repeats} interleaved calls (each hooked call includes installing and removing the hooks, "
        "not building the ablators)\n"
    )

    editors = {}  # built once per mode (selection, row tables): the timed calls only hook and run
    for mode, encoder in modes.items():
        handle = eraser.apply(pipe, args.concept, encoder=encoder)
        for ablator in handle.ablators.values():
            ablator.sparse_tokens = mode != "topk-dense"
        editors[mode] = {p: site.editor for p, site in handle.hooks.sites.items()}
        handle.remove()
    for mode, robust in robust_modes.items():
        handle = eraser.apply(pipe, args.robust_concept, encoder="topk", robust=robust)
        editors[mode] = {p: site.editor for p, site in handle.hooks.sites.items()}
        handle.remove()

    spent: dict[str, list[float]] = {m: [] for m in editors}  # seconds inside our hooks, per timed call

    def hooked(mode: str):
        def call() -> object:
            clock = HookClock()
            timed = {p: clock.wrap(editor) for p, editor in editors[mode].items()}
            start = time.perf_counter()
            with install_hooks(pipe, timed, tracker=TimedTracker(pipe, clock)):
                out = run()
            spent[mode].append(clock.seconds / (time.perf_counter() - start))
            return out

        return call

    with torch.no_grad():
        plain_img = run().images
        with eraser.unlearn(pipe, args.concept, encoder="threshold"):
            changed = int((run().images != plain_img).flatten(1).any(1).sum())
        rounds = time_rounds({"plain": run, **{m: hooked(m) for m in editors}}, args.repeats)
        flops, seen = pipeline_flops(pipe, prompts, args.steps, args.guidance, paths)
    times = {name: statistics.median(v) for name, v in rounds.items()}
    ratios = paired_ratios(rounds, "plain")
    # full TopK encode of every token the hooks saw
    encode = sum(2.0 * seen[p] * s.num_latents * s.d_in for p, s in saes.items())
    tokens = sum(seen.values())
    predicted = encode / flops
    print(f"images changed by the ablation: {changed}/{len(prompts)}")
    print(f"{'mode':12s} {'s/call':>8s} {'vs plain':>9s}   (per-round paired ratio: median [min, max])")
    for mode, t in times.items():
        if mode in robust_modes:
            continue
        med, lo, hi = ratios[mode]
        print(f"{mode:12s} {t:8.3f} {med - 1:+9.2%}   [{lo - 1:+.2%}, {hi - 1:+.2%}]")
    print(
        f"\nplain pipeline: {flops / 1e9:.2f} GFLOP per call; the hookpoint saw {tokens:,} tokens per call "
        f"(all steps, both CFG rows); full TopK encode {encode / 1e9:.3f} GFLOP per call → predicted "
        f"topk overhead {predicted:+.2%}"
    )
    for mode in ("topk", "topk-dense"):
        measured = ratios[mode][0] - 1
        print(
            f"  {mode:10s} measured {measured:+.2%} = {measured / predicted:.2f}× the FLOP prediction "
            f"(target: within 10 %, i.e. ≤ 1.10×: {'met' if measured <= 1.10 * predicted else 'NOT met'})"
        )
    thr = ratios["threshold"][0]
    print(f"  threshold  {thr:.4f}× plain   target ≤ 1.01: {'met' if thr <= 1.01 else 'NOT met'}")
    # The same overhead read inside each hooked call: the share of its wall time spent in our hooks
    # (tracker + editor). Load from other processes slows both alike, so this share is steady where
    # the wall ratio of two separate calls is not (on 2 shared cores it swings by ±10 %).
    share = {m: statistics.median(v[1:]) for m, v in spent.items()}  # v[0]: the warm-up call
    print("\ntime inside the hooks / hooked call time (median over the timed calls):")
    for mode, frac in share.items():
        if mode in robust_modes:
            continue
        overhead = frac / (1 - frac)  # hooked = plain + hooks → hooks / plain
        verdict = (
            f"{overhead / predicted:.2f}× the FLOP prediction"
            if mode != "threshold"
            else f"target ≤ 1.01×: {'met' if overhead <= 0.01 else 'NOT met'}"
        )
        print(f"  {mode:10s} {frac:6.2%} of the call → {1 + overhead:.4f}× plain ({verdict})")
    print(f"\nthe robust mode of {args.robust_concept!r} (topk): time inside the hooks / hooked call time")
    for mode, robust in robust_modes.items():
        frac = share[mode]
        n = len(eraser.active_hookpoints(args.robust_concept, robust))
        med, lo, hi = ratios[mode]
        print(
            f"  {mode:14s} {n:2d} hookpoint(s): {frac:6.2%} of the call → {1 + frac / (1 - frac):.4f}× plain "
            f"(wall ratio {med - 1:+.2%} [{lo - 1:+.2%}, {hi - 1:+.2%}])"
        )
    print("\nwhy topk-dense can exceed its arithmetic: per denoiser call, encode GEMM vs TopK selection")
    sizes = {(seen[p] // args.steps, s.num_latents, s.d_in, s.cfg.k): "this bundle" for p, s in saes.items()}
    for (t, n, d, k), label in {**sizes, (512, 20_480, 1280, 32): "SAeUron size"}.items():  # each size once
        gemm, select = selection_vs_gemm(t, n, d, k)
        print(
            f"  {label:12s} {t} tokens, n={n}, d={d}, k={k}: GEMM {gemm * 1e3:.2f} ms, selection "
            f"{select * 1e3:.2f} ms ({select / gemm:.0%} of the GEMM)"
        )
    unet, sae_flops = sd15_paper_estimate()
    print(
        f"\nSD 1.5 at 512 px on paper: UNet {unet / 1e9:.0f} GFLOP per CFG step, SAE encode "
        f"{sae_flops / 1e9:.1f} GFLOP → topk overhead {sae_flops / unet:+.2%} (target ≤ 2.5 %; "
        "SAeUron reports +1.92 %); threshold with 1-3 latents: "
        f"{2.0 * 512 * 3 * 1280 / unet:+.5%}"
    )

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        t_plain = time_interleaved({"plain": lambda: run("latent")}, args.repeats)["plain"]
        counter = iter(range(10_000))

        def collect() -> object:
            return collect_activations(
                pipe,
                prompts,
                paths,
                Path(tmp) / f"c{next(counter)}",
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                batch_size=len(prompts),
                show_progress=False,
            )

        t_collect = time_interleaved({"collect": collect}, args.repeats)["collect"]
    rows = tokens // 2  # the conditional rows of every step, all tokens
    bytes_per_prompt = sum(seen[p] // 2 * s.d_in * 2 for p, s in saes.items()) / len(prompts)  # fp16 store
    print(
        f"\ncollection ({len(paths)} hookpoint(s), cond rows, fp16 store): {t_collect:.3f} s vs plain "
        f"latent generation {t_plain:.3f} s = {t_collect / t_plain:.3f}× (target ≤ 1.15×); "
        f"{rows / t_collect:,.0f} rows/s; {bytes_per_prompt / 1024:.1f} KiB per prompt"
    )


if __name__ == "__main__":
    main()
