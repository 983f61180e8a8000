"""Process groups for tensor and expert parallelism (torch.distributed; NCCL on GPUs, gloo on the CPU).

Layers ask `tp_rank()` / `tp_size()` when they are built and when they load weights; with no process group
initialised both describe a single process, so every layer works unchanged in one process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None


def init_parallel(tensor_parallel_size: int = 1, backend: str | None = None) -> None:
    """Join the torchrun world and build the tensor-parallel group (all ranks, for now)."""
    global _TP_GROUP
    if tensor_parallel_size == 1 and not dist.is_initialized():
        return
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    if dist.get_world_size() != tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} but the torchrun world has "
                         f"{dist.get_world_size()} processes")
    _TP_GROUP = dist.group.WORLD


def tp_size() -> int:
    return dist.get_world_size(_TP_GROUP) if _TP_GROUP is not None else 1


def tp_rank() -> int:
    return dist.get_rank(_TP_GROUP) if _TP_GROUP is not None else 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_size() > 1:
        dist.all_reduce(x, group=_TP_GROUP)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=-1)
