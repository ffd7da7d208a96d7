"""The collectives the tensor-parallel layers call; each is the identity in a world of one.

They take and return tensors so that a CUDA graph captures them (NCCL collectives
are capturable) and torch.compile traces them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kvtriton.backend.distributed.parallel_state import get_cpu_group, get_device_group, get_tp_world_size

# The ranks' tensors concatenated along dim 0 into one output (torch >= 2.10 names it all_gather_single).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the ranks, in place."""
    if get_tp_world_size() == 1:
        return x
    dist.all_reduce(x, group=get_device_group())
    return x


def tensor_model_parallel_all_gather(x: torch.Tensor) -> torch.Tensor:
    """x (M, C) on each rank -> (M, world * C): the ranks' columns side by side, in rank order."""
    world = get_tp_world_size()
    if world == 1:
        return x
    parts = torch.empty((world * x.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)  # (world * M, C)
    _all_gather_single(parts, x.contiguous(), group=get_device_group())
    return parts.view(world, *x.shape).permute(1, 0, 2).reshape(x.shape[0], world * x.shape[1])


def tensor_model_parallel_min(value: int) -> int:
    """The smallest of one integer over the ranks (KV pool sizes must agree: rank 0's block ids index all)."""
    if get_tp_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=get_cpu_group())
    return int(t.item())

