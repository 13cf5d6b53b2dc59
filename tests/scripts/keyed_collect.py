"""A keyed collection into an activation store, as ``collect_activations`` writes one (rows per
prompt appended with the prompt's key), that can SIGKILL itself at a chosen write.

    python keyed_collect.py STORE SHARD_ROWS ROWS_PER_UNIT [KILL_AT]

Unit i has ``rows_per_unit[i]`` rows whose first column is i and second the row's index in the
unit, so duplicates and gaps are visible. Units already in the store (``has_key``) are skipped,
as a resumed collection does. ``KILL_AT=n`` kills the process with SIGKILL at the n-th file
operation of the store (a shard or manifest write, an fsync or a rename), wherever that falls.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from saeuron_plugin.sae import store as store_module
from saeuron_plugin.sae.store import ActivationStore

D = 4


def unit_rows(i: int, n: int) -> torch.Tensor:
    x = torch.zeros(n, D)
    x[:, 0] = float(i)
    x[:, 1] = torch.arange(n, dtype=torch.float32)
    x[:, 2] = torch.randn(n, generator=torch.Generator().manual_seed(i))
    return x


def arm_kill(kill_at: int) -> None:
    """SIGKILL this process at the ``kill_at``-th store file operation (counted from 1)."""
    count = [0]

    def tick() -> None:
        count[0] += 1
        if count[0] >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn):
        def inner(*args, **kwargs):
            tick()
            out = fn(*args, **kwargs)
            tick()
            return out

        return inner

    store_module.save_file = wrap(store_module.save_file)
    store_module._fsync = wrap(store_module._fsync)
    store_module._write_json = wrap(store_module._write_json)
    store_module.os.replace = wrap(store_module.os.replace)


def main() -> None:
    path, shard_rows, units = sys.argv[1], int(sys.argv[2]), [int(n) for n in sys.argv[3].split(",")]
    if len(sys.argv) > 4:
        arm_kill(int(sys.argv[4]))
    store = ActivationStore.create(path, d_in=D, dtype=torch.float32, shard_rows=shard_rows, exist_ok=True)
    for i, n in enumerate(units):
        key = f"{i}:unit"
        if store.has_key(key):
            continue
        store.append(unit_rows(i, n), tau=torch.full((n,), i / len(units)), key=key)
    store.close()


if __name__ == "__main__":
    main()
