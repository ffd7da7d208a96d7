"""Host-to-device copies of a step's small inputs that never make the host wait for the device (in kernels/, the
bottom layer, because every layer above uploads per-step inputs: the engine, the runners, the attention backends).

A copy from pageable host memory, even with non_blocking=True, makes the CPU wait until the work already
queued on the stream has finished (CUDA stages pageable memory and may synchronize with the stream first).
In the engine's overlapped loop the queue holds the step in flight, so one pageable copy while preparing
step N + 1 (a block table, a gather index) stalls the host until step N ends: the overlap is lost. A copy
from pinned memory is queued like a kernel; torch's caching host allocator makes pinning a small per-step
buffer cheap and keeps it alive until its copy has run.
"""

from __future__ import annotations

import torch


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, without waiting for the device's queued work on CUDA."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
