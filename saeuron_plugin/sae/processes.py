"""The processes of a multi-process run: who this process is, its share of the work, and the few
collectives that collection and the statistics pass need.

Under ``accelerate launch`` or ``torchrun`` (``WORLD_SIZE`` > 1) :meth:`Processes.current` sets up
``torch.distributed`` through accelerate's ``PartialState`` (gloo on CPU, NCCL on GPUs); a plain
run gets rank 0 of 1 and never touches ``torch.distributed``. Work is dealt round-robin: item i
goes to process i mod world, so every process gets a fair share of any ordered list.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..errors import SAeUronError

T = TypeVar("T")


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``; 1 for a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def require_single_process(what: str) -> None:
    """Refuse to run ``what`` under a multi-process launcher: every process would do all the work
    and write the same files at once."""
    world = launched_world_size()
    if world > 1:
        raise SAeUronError(
            f"{what} runs in one process only, but this is one of {world} launched processes "
            "(WORLD_SIZE): run it without accelerate launch / torchrun. Diffusers collection, "
            "the diffusers statistics pass and training split their work over processes; this does not yet."
        )


@dataclass(frozen=True)
class Processes:
    """Rank, world size and device of this process (rank 0 of 1 when not launched)."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    """This process's accelerator under a launcher (``cuda:LOCAL_RANK``, or CPU); None: not launched."""

    @classmethod
    def current(cls) -> Processes:
        if launched_world_size() <= 1:
            return cls()
        from accelerate import PartialState

        # initialises torch.distributed once per process; without a GPU accelerate needs cpu=True
        # to see the launcher's processes (gloo), else each process thinks it runs alone
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(state.process_index, state.num_processes, torch.device(state.device))

    @property
    def main(self) -> bool:
        """The process that writes shared files (rank 0)."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's items: every world-th one, starting at its rank."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, tensor: Tensor) -> Tensor:
        """The element-wise sum of ``tensor`` over all processes (a new tensor on its device)."""
        if self.world == 1:
            return tensor.clone()
        work = tensor.to(self.device or tensor.device, copy=True)  # NCCL reduces device tensors only
        torch.distributed.all_reduce(work)
        return work.to(tensor.device)

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (a JSON value), in rank order. Sent as JSON bytes, not pickles."""
        if self.world == 1:
            return [obj]
        data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
        sizes = self.sum(
            torch.zeros(self.world, dtype=torch.long).index_fill_(0, torch.tensor([self.rank]), len(data))
        )
        padded = torch.zeros(int(sizes.max()), dtype=torch.uint8)
        padded[: len(data)] = data
        device = self.device or padded.device
        parts = [torch.empty_like(padded, device=device) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded.to(device))
        return [
            json.loads(bytes(p[: int(n)].cpu().tolist()).decode()) for p, n in zip(parts, sizes, strict=True)
        ]


__all__ = ["Processes", "launched_world_size", "require_single_process"]
