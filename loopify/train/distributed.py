"""Several processes under torchrun: DistributedDataParallel (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    started_here: bool = False

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.on:
            torch.distributed.barrier()

    def reduce(self, values: list[float], op="sum") -> list[float]:
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
        return t.tolist()


def dist_setup() -> Dist:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    import torch.distributed as td

    started = False
    if not td.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        td.init_process_group(backend=backend)
        started = True
    return Dist(td.get_rank(), td.get_world_size(), started)


# ----------------------------------------------------------------------------------------------
