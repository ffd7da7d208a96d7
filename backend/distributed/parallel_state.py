"""The process group one tensor-parallel model instance runs in (after vLLM's parallel_state).

One group per process: `init_tensor_parallel` joins it, `destroy_tensor_parallel`
leaves it. Two handles to the same ranks:
- the device group (NCCL on CUDA, gloo on the CPU) carries activations: the
  all-reduces, the logits gather and each step's input tensors;
- the CPU group (always gloo) carries the small host-side step header
  (broadcast_object_list), so that no pickle travels through NCCL.
On the CPU both are the one gloo group.

Rendezvous is torch.distributed's TCPStore, served by rank 0: the same store
spans hosts when rank 0's address is reachable (README "Tensor parallelism").
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing

# A collective that waits longer than this raises instead of hanging (a stuck rank, a network partition).
# A dead rank is seen sooner: gloo fails on the closed connection, and the runner watches its workers.
COLLECTIVE_TIMEOUT = timedelta(seconds=300)


@dataclass
class _TensorParallelGroup:
    rank: int
    world_size: int
    device_group: dist.ProcessGroup
    cpu_group: dist.ProcessGroup
    backend: str


_GROUP: _TensorParallelGroup | None = None


def create_store(world_size: int, host: str = "127.0.0.1") -> dist.TCPStore:
    """Rank 0's rendezvous store on a free port (store.port); the other ranks connect with `connect_store`."""
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)


def connect_store(host: str, port: int, world_size: int) -> dist.TCPStore:
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)


def init_tensor_parallel(store: dist.Store, rank: int, world_size: int, device: torch.device) -> None:
    """Join the group as `rank` (blocks until every rank has joined): NCCL on CUDA, gloo on the CPU."""
    global _GROUP
    if _GROUP is not None:
        raise RuntimeError("this process is already a rank of a tensor-parallel group")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    device_group = dist.group.WORLD
    cpu_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if backend == "nccl" else device_group
    _GROUP = _TensorParallelGroup(rank, world_size, device_group, cpu_group, backend)


def destroy_tensor_parallel() -> None:
    global _GROUP
    if _GROUP is not None:
        _GROUP = None
        dist.destroy_process_group()


def abort_tensor_parallel() -> None:
    """Unblock collectives waiting on a dead rank (NCCL would wait out the timeout); best effort."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if _GROUP is not None and _GROUP.backend == "nccl" and abort is not None:
        abort()


def get_tp_world_size() -> int:
    return _GROUP.world_size if _GROUP is not None else 1


def get_tp_rank() -> int:
    return _GROUP.rank if _GROUP is not None else 0


def get_device_group() -> dist.ProcessGroup:
    return _GROUP.device_group


def get_cpu_group() -> dist.ProcessGroup:
    return _GROUP.cpu_group


def spawn_context():
    """torch.multiprocessing's spawn context (never fork a process with threads or CUDA). Embedded interpreters
    (Triton's Python stub) may not know the python they run, which spawn needs: it is set here."""
    context = torch.multiprocessing.get_context("spawn")
    if not sys.executable or not os.path.basename(sys.executable).startswith("python"):
        context.set_executable(str(Path(sys.prefix) / "bin" / "python3"))
    return context
