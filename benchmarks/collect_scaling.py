"""Collection with 1 and N processes: rows/s and peak memory of ``saeuron collect`` on the embedded
default (ShapesCanvas), launched plainly and under ``torchrun`` (gloo, as accelerate on CPU).

Each run collects the same prompts (the first ``--prompts`` ShapesCanvas captions, 25 DDIM steps,
guidance 5) at three hookpoints of ``up_blocks.1`` into a fresh folder; rows/s counts every row of
every hookpoint over the command's wall time (model loading included, as a user waits for it);
peak memory is the largest resident set of any one process (GNU time's %M over the process
tree). With N processes the machine's cores are split (``--threads`` per process = cores / N),
so the ratio says what splitting buys on the same hardware.

    python benchmarks/collect_scaling.py [--prompts 48 --processes 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import describe_run

from saeuron_plugin.shapescanvas import data as sc

ROOT = Path(__file__).parents[1]
HOOKPOINTS = [
    "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2",
]


def collect(
    processes: int, prompts_file: Path, out: Path, threads: int, port: int
) -> tuple[float, int, float]:
    """Wall seconds, rows (all hookpoints) and peak RSS in MiB of any one process, for one
    ``saeuron collect`` run with ``processes`` (GNU time reports the largest resident set in the
    process tree it waits for)."""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port)]
    cmd = [
        "/usr/bin/time",
        "-f",
        "peak-kib %M",
        sys.executable,
        *(launcher if processes > 1 else []),
        "-m",
        "saeuron_plugin.cli",
        "collect",
        "--model",
        str(ROOT / "checkpoints" / "shapescanvas-sd"),
        "--prompts",
        str(prompts_file),
        "--steps",
        "25",
        "--guidance",
        "5",
        "--batch-size",
        "8",
        "--out",
        str(out),
        *[a for hp in HOOKPOINTS for a in ("--hookpoint", hp)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("peak-kib"))
    return seconds, sum(result["rows"].values()), peak / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--processes", default="1,2")
    args = p.parse_args()
    print(describe_run(0))
    cores = os.cpu_count() or 1
    counts = [int(n) for n in args.processes.split(",")]
    print(
        f"setup   : {args.prompts} ShapesCanvas captions, 25 DDIM steps, guidance 5, batch 8, "
        f"{len(HOOKPOINTS)} hookpoints (up_blocks.1 attn2 outputs), fp16 store; {cores} cores split "
        "between the processes\n"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "prompts.txt"
        prompts_file.write_text("\n".join(q.prompt for q in sc.benchmark_prompts()[: args.prompts]) + "\n")
        for i, n in enumerate(counts):
            rows.append((n, *collect(n, prompts_file, Path(tmp) / f"out{n}", max(1, cores // n), 29600 + i)))
    base = rows[0][2] / rows[0][1]
    print(
        f"{'processes':>9s} {'wall s':>8s} {'rows':>8s} {'rows/s':>8s} {'vs 1':>6s} {'peak RSS/process':>17s}"
    )
    for n, seconds, total, peak in rows:
        print(
            f"{n:9d} {seconds:8.1f} {total:8d} {total / seconds:8.0f} "
            f"{total / seconds / base:5.2f}× {peak:12.0f} MiB"
        )


if __name__ == "__main__":
    main()
