"""Process groups for tensor and expert parallelism (torch.distributed; NCCL on GPUs, gloo on the CPU).

Started by torchrun (one node or several, c10d rendezvous): every process of the world runs the same engine steps.
Tensor parallel splits attention heads, dense MLPs and the vocabulary across a group of ranks: the whole world, or
consecutive blocks of `tensor_parallel_size` ranks (torchrun numbers ranks node by node, so a block of 8 is one
node's GPUs) that each repeat the same attention. Expert parallel gives each process of the world a contiguous share
of the routed experts. Layers ask `tp_rank()` / `tp_size()` / `ep_rank()` / `ep_size()` when they are built and
when they load weights; with no process group every one describes a single process, so every layer works unchanged
in one process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

_TP_GROUP: dist.ProcessGroup | None = None
_EP_GROUP: dist.ProcessGroup | None = None


def init_parallel(tensor_parallel_size: int = 1, expert_parallel: bool = False, backend: str | None = None) -> None:
    """Join the torchrun world: tensor parallel in blocks of tensor_parallel_size consecutive ranks (all of the
    world, or a divisor of it with expert parallel), expert parallel over the whole world (when asked). backend:
    NCCL when None and a GPU is present, else gloo."""
    global _TP_GROUP, _EP_GROUP
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tensor_parallel_size == 1 and not expert_parallel:
        if world > 1:
            raise ValueError(f"started with {world} processes but neither --tensor-parallel-size nor "
                             f"--expert-parallel asks for them")
        return
    if not dist.is_initialized():
        if world == 1 and "RANK" not in os.environ:
            raise ValueError("tensor or expert parallel needs one process per rank: launch with torchrun "
                             "(e.g. torchrun --nproc-per-node 2 -m lowbit ...)")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} does not divide the torchrun world of "
                         f"{world} processes")
    if 1 < tensor_parallel_size < world and not expert_parallel:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} in a world of {world} processes needs "
                         f"--expert-parallel (without it the other tensor-parallel groups would only repeat the work)")
    _TP_GROUP = None
    if tensor_parallel_size == world:
        _TP_GROUP = dist.group.WORLD
    elif tensor_parallel_size > 1:
        for start in range(0, world, tensor_parallel_size):  # every rank creates every group
            group = dist.new_group(list(range(start, start + tensor_parallel_size)))
            if start <= rank < start + tensor_parallel_size:
                _TP_GROUP = group
    _EP_GROUP = dist.group.WORLD if expert_parallel else None


def tp_size() -> int:
    return dist.get_world_size(_TP_GROUP) if _TP_GROUP is not None else 1


def tp_rank() -> int:
    return dist.get_rank(_TP_GROUP) if _TP_GROUP is not None else 0


def ep_size() -> int:
    return dist.get_world_size(_EP_GROUP) if _EP_GROUP is not None else 1


def ep_rank() -> int:
    return dist.get_rank(_EP_GROUP) if _EP_GROUP is not None else 0


def is_first_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


ONE_SHOT_MAX_BYTES = 1 << 20  # a decode step's hidden state: R1's 7168 x 64 tokens in bf16 is 0.9 MiB
_ONE_SHOT: dict = {}  # (group name, dtype) -> symmetric buffer, or False where it could not be made


def _one_shot_all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor | None:
    """A one-shot all-reduce over peer memory (torch symmetric memory, no multicast): each rank reads every peer's
    buffer over NVLink and sums, one kernel instead of NCCL's ring, for the small tensors of decode. Opt-in with
    LOWBIT_ONESHOT_ALLREDUCE=1 (not yet measured on two GPUs); None where it does not apply. The buffer is made by
    the first call, which every rank makes at the same point of the same forward (the warm-up, before any CUDA
    graph is captured)."""
    if os.environ.get("LOWBIT_ONESHOT_ALLREDUCE") != "1" or x.device.type != "cuda":
        return None
    nbytes = x.numel() * x.element_size()
    if nbytes > ONE_SHOT_MAX_BYTES or not x.is_contiguous():
        return None
    key = (group.group_name, x.dtype)
    buf = _ONE_SHOT.get(key)
    if buf is None:
        try:
            import torch.distributed._symmetric_memory as symm_mem
            buf = symm_mem.empty(ONE_SHOT_MAX_BYTES // x.element_size(), dtype=x.dtype, device=x.device)
            symm_mem.rendezvous(buf, group.group_name)
        except (RuntimeError, ImportError, AttributeError):
            buf = False
        _ONE_SHOT[key] = buf
    if buf is False:
        return None
    out = torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x.view(-1), "sum", group.group_name)
    return out[:x.numel()].view_as(x)


def all_reduce(x: torch.Tensor, expert: bool = False) -> torch.Tensor:
    """Sum x over the tensor-parallel group (or the expert-parallel group); in place unless the one-shot
    all-reduce is on (use the return value)."""
    group = _EP_GROUP if expert else _TP_GROUP
    if group is not None and dist.get_world_size(group) > 1:
        out = _one_shot_all_reduce(x, group)
        if out is not None:
            return out
        dist.all_reduce(x, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if tp_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size())]
    dist.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=-1)


def _comm_device() -> torch.device:
    """Where a collective's tensors live: this rank's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_parallel() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def broadcast_from_first(values: list[int]) -> list[int]:
    """Every rank takes rank 0's values (the sampled tokens), so the ranks' schedulers never diverge."""
    if not is_parallel():
        return values
    t = torch.tensor(values, dtype=torch.long, device=_comm_device())
    dist.broadcast(t, src=0)
    return t.tolist()


_FIRST_PART = 1024  # ints in a message's first broadcast: a decode step's batch fits, a long prefill takes two


def broadcast_message(values: list[int] | None) -> list[int]:
    """Rank 0's list of ints, of any length, on every rank; the other ranks pass None. One broadcast of a fixed
    size carries the length and the first ints, a second one the rest when there is more."""
    if not is_parallel():
        assert values is not None
        return values
    dev, first = _comm_device(), is_first_rank()
    if first:
        head = [len(values)] + values[:_FIRST_PART - 1]
        buf = torch.tensor(head + [0] * (_FIRST_PART - len(head)), dtype=torch.long, device=dev)
    else:
        buf = torch.empty(_FIRST_PART, dtype=torch.long, device=dev)
    dist.broadcast(buf, src=0)
    if first:
        rest = values[_FIRST_PART - 1:]
        if rest:
            dist.broadcast(torch.tensor(rest, dtype=torch.long, device=dev), src=0)
        return values
    head = buf.tolist()
    n = head[0]
    out = head[1:1 + n]
    if n > _FIRST_PART - 1:
        rest = torch.empty(n - (_FIRST_PART - 1), dtype=torch.long, device=dev)
        dist.broadcast(rest, src=0)
        out += rest.tolist()
    return out


def shutdown_parallel() -> None:
    """Leave the process group (each rank, once it has sent or received its last collective)."""
    global _TP_GROUP, _EP_GROUP
    _TP_GROUP = _EP_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()
