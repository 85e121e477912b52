"""torch.distributed, as launched by torchrun or `accelerate launch`: who am I, and the few collectives used.

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `from_env` joins the
process group they describe (gloo on CPU, nccl when the rank has a GPU). Without those variables
everything runs as a single process and every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from diffdissect.errors import DiffdissectError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    """processes in the group (WORLD_SIZE)"""
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, chunk: int) -> bool:
        """Chunk k of the inputs belongs to rank k mod world_size: disjoint, deterministic, balanced."""
        return chunk % self.world_size == self.rank

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return tensor

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.enabled:
            dist.broadcast(tensor, src)
        return tensor


SINGLE = Dist()


def from_env(backend: str | None = None) -> Dist:
    """The process group torchrun / accelerate describe in the environment (joined once), or SINGLE."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    if "RANK" not in os.environ:
        raise DiffdissectError(
            f"WORLD_SIZE={world} but RANK is not set; launch with torchrun or `accelerate launch`, "
            "which set both (or unset WORLD_SIZE for one process)."
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if backend is None:
            # CPU tensors (store bookkeeping, SAE statistics) always go through gloo; CUDA tensors through nccl
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if "nccl" in backend:
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
        except (RuntimeError, ValueError) as err:
            raise DiffdissectError(
                f"rank {rank} could not join the process group ({backend}, MASTER_ADDR="
                f"{os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): {err}"
            ) from None
    return Dist(rank=rank, world_size=world, local_rank=local_rank)
