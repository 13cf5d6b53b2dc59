"""Multi-process collection and statistics (torchrun over gloo, as accelerate launches on CPU):
the merged store holds the rows of a one-process run and the statistics are the same."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saeuron_plugin.sae.bundle import SaeBundle
from saeuron_plugin.sae.store import ActivationStore

SCRIPT = Path(__file__).parent / "scripts" / "ddp_collect.py"
HOOKPOINTS = ["unet.up_blocks.1.attentions.1", "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2"]


def _run(out: Path, processes: int) -> str:
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", "29581"]
    cmd = [sys.executable, *(launcher if processes > 1 else []), str(SCRIPT), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _rows(store: ActivationStore) -> list[tuple[float, ...]]:
    """The store's rows with their τ, as a sorted list: a multiset, whatever the shard order."""
    x, tau = store.read_all(with_tau=True, dtype=torch.float32)
    return sorted(tuple([t, *r]) for t, r in zip(tau.tolist(), x.tolist(), strict=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    single, multi = root / "single", root / "multi"
    assert "rank 0 of 1: generated 14 collected 7" in _run(single, 1)
    log = _run(multi, 2)
    return single, multi, log


def test_two_processes_share_the_prompts_and_merge_one_store(runs):
    single, multi, log = runs
    # 7 prompts dealt round-robin, 4 to rank 0 and 3 to rank 1, for collection and again for the
    # statistics pass; both report the whole collection's counts
    assert "rank 0 of 2: generated 8 collected 7 skipped 0" in log
    assert "rank 1 of 2: generated 6 collected 7 skipped 0" in log
    for path in HOOKPOINTS:
        one, two = ActivationStore(single / "acts" / path), ActivationStore(multi / "acts" / path)
        assert not (multi / "acts" / path / "parts").exists()
        assert len(one) == len(two) == 7 * 3 * 5
        assert one.keys == two.keys and len(two.keys) == 7
        assert _rows(one) == _rows(two)  # one prompt per call: bit for bit


def test_two_processes_pool_the_concept_statistics(runs):
    single, multi, _ = runs
    one, two = SaeBundle.from_pretrained(single / "bundle"), SaeBundle.from_pretrained(multi / "bundle")
    for path in HOOKPOINTS:
        a, b = one.hookpoints[path].library, two.hookpoints[path].library
        assert a.names == b.names == ["red", "square"]
        for name in ("red", "square"):
            sa, sb = a.get(name), b.get(name)
            assert torch.equal(sa.counts, sb.counts) and sa.prompts == sb.prompts
            assert torch.allclose(sa.sums, sb.sums, rtol=1e-9, atol=1e-12)
        assert torch.equal(a.background.counts, b.background.counts)
        assert a.calibrated_threshold == pytest.approx(b.calibrated_threshold, rel=1e-6)
        assert a.calibration["tokens"] == b.calibration["tokens"] > 0


def test_a_rerun_collects_nothing_twice(runs):
    _, multi, _ = runs
    log = _run(multi, 2)
    assert "rank 0 of 2: generated 4 collected 0 skipped 7" in log  # only the statistics pass ran
    assert "rank 1 of 2: generated 3 collected 0 skipped 7" in log
    assert len(ActivationStore(multi / "acts" / HOOKPOINTS[0])) == 7 * 3 * 5


def test_vlm_collection_and_statistics_refuse_a_launcher(monkeypatch):
    """The VLM adapter does not split its work yet: under a launcher it says so before any work,
    instead of every process writing the same store."""
    from saeuron_plugin.errors import SAeUronError
    from saeuron_plugin.vlm.collect import collect_activations
    from saeuron_plugin.vlm.unlearn import VLMUnlearner

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SAeUronError, match="one of 2 launched processes"):
        collect_activations(None, None, None, None, [], "unused")
    with pytest.raises(SAeUronError, match="one of 2 launched processes"):
        VLMUnlearner.add_concepts(None, {}, None)
