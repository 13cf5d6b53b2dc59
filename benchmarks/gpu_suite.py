"""The GPU suite: SAeUron at SD 1.5 size, no downloads. Runs on any CUDA machine; ``--small`` runs
the same measurements on CPU at a reduced size (what ``make bench`` does on machines without one).

The model is an SD-1.5-shaped pipeline built from SD 1.5's real UNet config (320/640/1280/1280
channels, 2 layers per block, 768-d cross-attention) with random weights, at 512 px and 50 DDIM
steps, guidance 7.5; text enters as ``prompt_embeds`` [1, 77, 768], so the text encoder is a tiny
stand-in that never runs. The SAE has SAeUron's shape (d 1280, n 20,480, k 32) at the reference's
hookpoint ``unet.up_blocks.1.attentions.1``; its concept library is synthetic, planted on latents
that fire on this model's activations, with 3 latents selected per τ bucket, so the edit really
runs at every step.

Measured, each in interleaved rounds in the same run:

1. pipeline overhead of the threshold and topk encoders against the plain pipeline, per dtype
   (fp16 and bf16 on GPU, fp32 on CPU), eager and, with ``--compile``, ``torch.compile``d UNet;
2. collection: rows/s and bytes per prompt of ``collect_activations`` at the hookpoint, and its
   time against plain generation;
3. training: tokens/s of our trainer (TopK and BatchTopK) against sparsify's ``SparseCoder``
   (with its Triton decoder when installed) on the same activations.

Targets at SD 1.5 size on a GPU: topk ≤ +2.5 % (the reference's +1.92 % is the anchor),
threshold ≤ +0.5 %, collection ≤ 1.10× plain generation.

    python benchmarks/gpu_suite.py [--small] [--compile] [--rounds 5] [--out benchmarks/results/gpu.md]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import describe_run, time_rounds, wall_time
from ablation_overhead import synthetic_library
from sae_train import planted, train_ours, train_sparsify

from saeuron_plugin.diffusion.collect import collect_activations
from saeuron_plugin.diffusion.hookpoints import resolve_hookpoint, to_tokens
from saeuron_plugin.diffusion.unlearn import SAeUron
from saeuron_plugin.sae.ablation import ConceptAblation, FeatureAblator
from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder
from saeuron_plugin.shapescanvas.model import build_pipeline

RESULTS = Path(__file__).parent / "results"
HOOKPOINT = "unet.up_blocks.1.attentions.1"
TOKENIZER = Path(__file__).parents[1] / "checkpoints" / "shapescanvas-sd" / "tokenizer"


@dataclass(frozen=True)
class Size:
    """One scale of the suite."""

    channels: tuple[int, ...]
    resolution: int
    steps: int
    d_sae: int
    n_sae: int
    k: int
    collect_prompts: int
    train_tokens: int
    train_batch: int


FULL = Size((320, 640, 1280, 1280), 512, 50, 1280, 20_480, 32, 8, 1 << 20, 4096)
SMALL = Size((32, 64, 128, 128), 128, 6, 128, 2048, 32, 4, 1 << 15, 1024)


def sd15_shaped_pipeline(size: Size, device: torch.device, dtype: torch.dtype):
    """SD 1.5's pipeline layout with random weights: its UNet config (channels scaled by ``size``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=size.resolution // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=size.channels,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(  # never runs (latent output); four blocks give the pipeline its ×8 scale
        block_out_channels=(32,) * 4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
    )
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=64, num_hidden_layers=1)
    )
    unet, vae, text = (m.to(device=device, dtype=dtype).eval() for m in (unet, vae, text))
    pipe = build_pipeline(vae, text, tokenizer, unet)  # with SD 1.x's DDIM schedule
    pipe.set_progress_bar_config(disable=True)
    return pipe


def planted_ablators(pipe, size: Size, call) -> dict[str, FeatureAblator]:
    """A threshold and a topk ablator of one random SAE, with a library planted on firing latents."""
    device = pipe.unet.device
    seen: list[torch.Tensor] = []
    hp = resolve_hookpoint(pipe, HOOKPOINT)
    handle = hp.module.register_forward_hook(
        lambda _m, _a, out: seen.append(to_tokens(out, hp.output_index)[0].detach().float())
    )
    try:
        call(pipe)
    finally:
        handle.remove()
    tokens = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen[:: max(1, len(seen) // 8)]])
    sae = SparseAutoencoder(SaeConfig(d_in=size.d_sae, num_latents=size.n_sae, k=size.k), device=device)
    with torch.no_grad():
        pre = sae.pre_acts(tokens)
        theta = float(pre.flatten().topk(size.k * tokens.shape[0]).values.min())
        firing = (pre > theta).sum(0).argsort(descending=True)[:256].cpu()
    thr = SparseAutoencoder(sae.cfg.replace(encoder="threshold", threshold=theta), device=device)
    thr.load_state_dict(sae.state_dict())
    lib = synthetic_library(sae, firing, size.steps, torch.Generator().manual_seed(0))
    spec = [ConceptAblation("A", percentile=99.99)]
    return {"threshold": FeatureAblator(thr, lib, spec), "topk": FeatureAblator(sae, lib, spec)}


def overhead(pipe, size: Size, rounds: int, compiled: bool) -> dict[str, float]:
    """Median per-round ratio of hooked to plain pipeline calls, per encoder."""
    embeds = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)).to(
        pipe.unet.device, pipe.dtype
    )

    def call(p):
        g = torch.Generator().manual_seed(0)
        return p(
            prompt_embeds=embeds,
            negative_prompt_embeds=torch.zeros_like(embeds),
            num_inference_steps=size.steps,
            guidance_scale=7.5,
            output_type="latent",
            generator=g,
        )

    ablators = planted_ablators(pipe, size, call)
    eraser = SAeUron.from_saes({HOOKPOINT: ablators["topk"].sae})
    times = (
        compiled_times(pipe, eraser, ablators, call, rounds)
        if compiled
        else eager_times(pipe, eraser, ablators, call, rounds)
    )
    return {
        m: statistics.median(h / p for h, p in zip(times[m], times["plain"], strict=True)) - 1
        for m in ablators
    } | {"plain_s": statistics.median(times["plain"])}


def _checked(handle) -> None:
    """The edit really ran (a hook a compiled graph skipped would measure nothing)."""
    if handle.edits(HOOKPOINT) == 0:
        raise RuntimeError(f"the ablation at {HOOKPOINT} never changed anything: nothing was measured")


def eager_times(pipe, eraser, ablators, call, rounds: int) -> dict[str, list[float]]:
    """Plain and hooked calls in interleaved rounds."""

    def hooked(name: str):
        def run():
            with eraser.install_ablators(pipe, {HOOKPOINT: ablators[name]}) as handle:
                call(pipe)
                _checked(handle)

        return run

    return time_rounds({"plain": lambda: call(pipe), **{m: hooked(m) for m in ablators}}, rounds)


def compiled_times(pipe, eraser, ablators, call, rounds: int) -> dict[str, list[float]]:
    """One compiled UNet per variant, hooks installed before compiling (dynamo does not re-guard on
    hooks added later, so a graph compiled plain would silently skip them); each variant is timed
    in its own block of rounds after its compile call."""
    times = {}
    for name in ["plain", *ablators]:
        torch._dynamo.reset()
        handle = eraser.install_ablators(pipe, {HOOKPOINT: ablators[name]}) if name != "plain" else None
        pipe.unet.compile()  # in place: the hooks on its blocks are traced with it
        call(pipe)  # compile
        times[name] = [wall_time(lambda: call(pipe)) for _ in range(rounds)]
        if handle is not None:
            _checked(handle)
            handle.remove()
    return times


def collection(pipe, size: Size, rounds: int) -> dict[str, float]:
    """Rows/s and bytes per prompt of collecting the hookpoint, and collection / plain generation."""
    prompts = [
        {"prompt_embeds": torch.randn(1, 77, 768).to(pipe.unet.device, pipe.dtype)}
    ] * size.collect_prompts
    prompts = [{"prompt_embeds": p["prompt_embeds"] + i} for i, p in enumerate(prompts)]
    kw = {"num_inference_steps": size.steps, "guidance_scale": 7.5, "show_progress": False}
    stats: dict[str, float] = {}

    def collect():
        with tempfile.TemporaryDirectory() as tmp:
            result = collect_activations(pipe, prompts, [HOOKPOINT], tmp, **kw)
            stats["rows"] = result.rows[HOOKPOINT]
            stats["bytes"] = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors"))

    def plain():
        for p in prompts:
            pipe(
                prompt_embeds=p["prompt_embeds"],
                negative_prompt_embeds=torch.zeros_like(p["prompt_embeds"]),
                num_inference_steps=size.steps,
                guidance_scale=7.5,
                output_type="latent",
            )

    times = time_rounds({"plain": plain, "collect": collect}, rounds)
    t = statistics.median(times["collect"])
    ratio = statistics.median(c / p for c, p in zip(times["collect"], times["plain"], strict=True))
    return {
        "rows_per_s": stats["rows"] / t,
        "bytes_per_prompt": stats["bytes"] / size.collect_prompts,
        "vs_plain": ratio,
    }


def training(size: Size, device: torch.device) -> dict[str, float]:
    """Tokens/s of each trainer on the same planted activations (one timed run each)."""
    args = argparse.Namespace(
        d=size.d_sae,
        n=size.n_sae,
        k=size.k,
        batch=size.train_batch,
        seed=0,
        dead_tokens=10_000_000,
        sparsify_warmup=1000,
        device=str(device),
    )
    data = planted(size.d_sae, 4 * size.d_sae, 8, size.train_tokens, 0).to(device)
    steps = size.train_tokens // size.train_batch
    arms = {
        "sparsify signum": lambda: train_sparsify(data, args, steps, "signum"),
        "ours TopK": lambda: train_ours(data, args, steps, batch_topk=False),
        "ours BatchTopK": lambda: train_ours(data, args, steps, batch_topk=True),
    }
    out = {}
    for name, arm in arms.items():
        arm()  # warm-up (kernels, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        arm()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = size.train_tokens / (time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="reduced size on CPU (no GPU needed)")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd UNet")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # random-weight models: no config nags
    size = SMALL if args.small else FULL
    device = torch.device("cpu" if args.small or not torch.cuda.is_available() else "cuda")
    if not args.small and device.type != "cuda":
        raise SystemExit("no CUDA device: run with --small for the reduced CPU suite")
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float16, torch.bfloat16]
    header = describe_run(0)
    setup = (
        f"setup   : SD-1.5-shaped UNet {size.channels} random weights, {size.resolution} px, "
        f"{size.steps} DDIM steps, guidance 7.5, latent output; SAE d {size.d_sae} n {size.n_sae} "
        f"k {size.k} at {HOOKPOINT}; {args.rounds} interleaved rounds; device {device}"
    )
    print(header + "\n" + setup + "\n", flush=True)
    lines = ["| measurement | value |", "|---|---|"]
    for dtype in dtypes:
        modes = [False, True] if args.compile else [False]
        for compiled in modes:
            pipe = sd15_shaped_pipeline(size, device, dtype)
            res = overhead(pipe, size, args.rounds, compiled)
            tag = f"{str(dtype).removeprefix('torch.')}, {'compiled' if compiled else 'eager'}"
            lines.append(f"| plain pipeline call ({tag}) | {res['plain_s']:.3f} s |")
            for m in ("threshold", "topk"):
                lines.append(f"| {m} overhead ({tag}) | {100 * res[m]:+.2f} % |")
            print("\n".join(lines[-3:]), flush=True)
    pipe = sd15_shaped_pipeline(size, device, dtypes[0])
    col = collection(pipe, size, max(1, args.rounds // 2))
    lines += [
        f"| collection rows/s ({str(dtypes[0]).removeprefix('torch.')}) | {col['rows_per_s']:.0f} |",
        f"| collection bytes per prompt | {col['bytes_per_prompt'] / 1e6:.2f} MB |",
        f"| collection time / plain generation | {col['vs_plain']:.3f}× |",
    ]
    print("\n".join(lines[-3:]), flush=True)
    tr = training(size, device)
    for name, tps in tr.items():
        lines.append(
            f"| training {name} | {tps:.0f} tokens/s ({tps / tr['sparsify signum']:.2f}× sparsify) |"
        )
    print("\n".join(lines[-3:]), flush=True)
    out = args.out or RESULTS / ("gpu-small.md" if args.small else "gpu.md")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (--small: reduced size, no GPU)"
    out.write_text(f"# GPU suite: {card}\n\n```\n{header}\n{setup}\n```\n\n" + "\n".join(lines) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
