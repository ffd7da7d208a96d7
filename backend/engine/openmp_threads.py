"""The engine thread's own torch ops on one OpenMP thread, so that the forward thread keeps the only team.

On a CPU the engine thread schedules and builds step N+1's inputs while the forward thread computes step N
(step_executor.py). libgomp gives every thread that opens a parallel region a team of its own, kept for the
life of the process, and once the teams' threads outnumber the cores it stops spin-waiting between regions
(README "CPU threads"). So a single op on the engine thread wide enough to go parallel made a second team for
good: one request with a frequency penalty (its token counts span the vocabulary) and every later step paid
a wake-up per region, one stream through tritonserver 147 -> 51 tok/s on the 2-core VM, until a restart.

The engine thread's ops are small (a step's metadata); one thread is right for them. OpenMP's thread count is
per thread (its nthreads ICV), so setting it on the engine thread leaves the forward thread's team as it is.
torch.set_num_threads cannot do this: it also changes the default that each new thread starts from.
"""

from __future__ import annotations

import ctypes
import os

import torch

# The runtimes torch may be built against: GNU libgomp (the Linux wheels), LLVM's libomp, Intel's libiomp5.
_RUNTIMES = ("libgomp", "libomp", "libiomp5")


def _loaded_openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime already mapped into this process (torch's own copy), or None (no OpenMP, not Linux)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(_RUNTIMES) and ".so" in path:
            return ctypes.CDLL(path)  # the loaded copy: dlopen of a mapped path returns its handle
    return None


def use_one_openmp_thread() -> bool:
    """Make the calling thread's parallel regions run on itself alone; other threads keep their counts. True if
    torch on this thread now sees one thread."""
    torch.get_num_threads()  # torch sets each thread's count from its default on first use: let it happen first
    runtime = _loaded_openmp()
    if runtime is not None:
        runtime.omp_set_num_threads(1)
    return torch.get_num_threads() == 1
