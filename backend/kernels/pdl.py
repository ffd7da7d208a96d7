"""Programmatic dependent launch (PDL, Hopper and later): overlap one kernel's start with the previous one's end.

In a decode step every kernel depends on the one before, and each is only a
few microseconds long, so the launch gap and each kernel's ramp-up are a large
share of the step. A kernel launched with PDL may start once every program of
the previous kernel has started; it does its independent work first (streaming
its weights) and calls gdc_wait() before reading anything the previous kernel
writes. Invariant: every kernel launched with PDL calls gdc_wait() before its
first dependent read and before its first global write.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton >= 3.3; Triton's CPU interpreter has no grid dependency control
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - old Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None


# Whether the decode matmuls before the attention kernel (kernels/pdl_matmul.py's for 16-bit qkv, the fp8 one)
# let it launch at their start, as the int4 and fused kernels always do; benchmarks/profile_decode.py
# --early-attention off measures the step without.
EARLY_ATTENTION = True


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    if gdc_wait is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


__all__ = ["EARLY_ATTENTION", "gdc_launch_dependents", "gdc_wait", "pdl_supported"]
