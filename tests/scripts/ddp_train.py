"""Launched by tests under `accelerate launch` / torchrun: trains one SAE across processes."""

import os
import sys

import torch
from safetensors.torch import save_file

from saeuron_plugin.sae.train import Trainer, train_config

out = sys.argv[1]
g = torch.Generator().manual_seed(0)
data = [torch.randn(512, 16, generator=g) for _ in range(8)]
sae, state = Trainer(
    data,
    train_config(
        k=4,
        num_latents=64,
        batch_size=64,
        steps=20,
        progress=False,
        checkpoint_dir=os.path.join(out, "ckpt"),
        device="cpu",
    ),
).fit()
rank = int(os.environ.get("RANK", "0"))
save_file(
    {k: v.contiguous() for k, v in sae.state_dict().items()}, os.path.join(out, f"rank{rank}.safetensors")
)
print(f"rank {rank} of {os.environ.get('WORLD_SIZE')}: steps={state.step} tokens={state.tokens}")
