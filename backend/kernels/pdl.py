"""Programmatic dependent launch (PDL, Hopper and later): overlap one kernel's start with the previous one's end.

In a decode step every kernel depends on the one before, and each is only a
few microseconds long, so the launch gap and each kernel's ramp-up are a large
share of the step. A kernel launched with PDL may start once every program of
the previous kernel has started; it does its independent work first (streaming
its weights) and calls gdc_wait() before reading anything the previous kernel
writes. Invariant: every kernel launched with PDL calls gdc_wait() before its
first dependent read and before its first global write. A kernel may call
gdc_launch_dependents() before its own gdc_wait() (the early attention below):
its dependent's gdc_wait() returns only once this kernel has completed, which it
cannot do before its own wait has returned, so the chain stays ordered.
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

# Whether the rest of a decode layer's chain launches with PDL too: the fp8 matmul (waiting in-kernel for its
# quantized x), the per-token quantizer before o_proj, the split-K adds, and the kernels torch.compile generates
# for the layer's norms, SwiGLU and quantizers (inductor's triton.enable_pdl, which waits before each dependent
# access and triggers its dependents after its loads). Measured on an H100 (benchmarks/profile_decode.py
# --pdl-chain on|off, 2026-12-06): the fp8 1B-class step at 64 rows 1.091 -> 1.020 ms; bf16 and int4 unchanged
# (before the quantizer and the split-K adds joined: bf16 at 64 rows 1.408 on, 1.419 off). Served from an engine
# in its own process, alternated twice, fp8's 64-request ITL p50 1.199 / 1.071 ms on, 1.254 / 1.129 off.
CHAIN = True


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    if gdc_wait is None or device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def in_chain(device: torch.device) -> bool:
    """Whether the decode layer's other kernels (CHAIN's) launch with PDL on `device`."""
    return CHAIN and pdl_supported(device)


def launch_options(enabled: bool) -> dict:
    """The Triton launch keyword that launches a kernel with PDL where `enabled`; none otherwise."""
    return {"launch_pdl": True} if enabled else {}


__all__ = ["CHAIN", "EARLY_ATTENTION", "gdc_launch_dependents", "gdc_wait", "in_chain", "launch_options",
           "pdl_supported"]
