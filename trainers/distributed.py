"""Process-group set-up for torchrun (NCCL on GPUs, gloo on CPU), each process's device, barriers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sjea_tools.devices import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun described in the environment (NCCL when `device` resolves
    to a GPU, else gloo); a no-op without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        on_gpu = resolve_device(device).startswith("cuda")
        backend = "nccl" if on_gpu else "gloo"
        if on_gpu:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def process_device(requested: str, info: DistInfo) -> torch.device:
    """This process's device: `resolve_device`'s choice, except that under torchrun each process
    takes the GPU of its local rank."""
    device = torch.device(resolve_device(requested))
    if device.type != "cuda":
        return device
    return torch.device("cuda", info.local_rank if info.enabled else device.index or 0)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
