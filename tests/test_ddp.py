"""Multi-process training (DDP over gloo, launched with torchrun: what accelerate uses on CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


def test_two_process_training_stays_in_sync(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29577",
        str(SCRIPT),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # both processes took 20 steps over a global batch of 2 × 64 tokens
    assert "rank 0 of 2: steps=20 tokens=2560" in proc.stdout
    assert "rank 1 of 2: steps=20 tokens=2560" in proc.stdout
    a, b = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert a.keys() == b.keys() == {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} diverged between processes"
    assert (tmp_path / "ckpt" / "trainer.safetensors").exists()
