"""Launched by tests with torchrun (2 processes) or plainly: collection and a statistics pass on a
tiny SD pipeline, written under OUT (argv[1]). The same seeds everywhere, so a 1-process and a
2-process run must give the same rows and the same statistics."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_pipelines import tiny_sd_pipeline

from saeuron_plugin.diffusion.collect import collect_activations
from saeuron_plugin.diffusion.unlearn import SAeUron
from saeuron_plugin.sae.model import SaeConfig, SparseAutoencoder
from saeuron_plugin.sae.processes import Processes

HOOKPOINTS = ["unet.up_blocks.1.attentions.1", "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2"]
PROMPTS = [f"a {c} {s}" for c in ("red", "green", "blue") for s in ("square", "circle")] + ["a star"]

out = Path(sys.argv[1])
procs = Processes.current()
torch.set_num_threads(1)
pipe = tiny_sd_pipeline()
latents_seen = []  # CFG pairs of latents the UNet denoised in this process
pipe.unet.register_forward_pre_hook(lambda _m, args: latents_seen.append(args[0].shape[0] // 2))
# One prompt per call: batched with other neighbours, the UNet's sums round differently (found:
# 4 of 105 rows 1-3 fp16 ulps apart at batch size 2); alone, a prompt's rows are bit for bit the same.
kw = {"num_inference_steps": 3, "batch_size": 1, "show_progress": False}
result = collect_activations(pipe, PROMPTS, HOOKPOINTS, out / "acts", tokens_per_step=5, seed=3, **kw)
saes = {}
for n, path in enumerate(HOOKPOINTS):
    torch.manual_seed(n)
    saes[path] = SparseAutoencoder(SaeConfig(d_in=16, num_latents=64, k=4))
eraser = SAeUron.from_saes(saes)
eraser.add_concepts({"red": PROMPTS[:2], "square": PROMPTS[::2], None: PROMPTS}, pipe, calibrate=True, **kw)
if procs.main:
    eraser.save_pretrained(out / "bundle")
generated = sum(latents_seen) // 3  # 3 steps per image
counts = f"generated {generated} collected {result.collected} skipped {result.skipped} rows {result.rows}"
print(f"rank {procs.rank} of {procs.world}: {counts}")
