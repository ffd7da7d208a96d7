"""Dynamic per-token FP8 (e4m3) quantization of activations, one launch (Triton).

For each row of x: scale = max|x| / 448 (e4m3's largest finite value; models/fp8.py passes it), xq = x / scale
rounded to e4m3.
Unfused in PyTorch this is abs, amax, divide, clamp and cast (five launches per linear layer, which at
batch 1 cost more than the matmul saves); here one program reads its row once and writes both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels import pdl
from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait


@triton.jit
def _per_token_fp8(x_ptr, q_ptr, scale_ptr, K, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
                   BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # kernels/pdl.py CHAIN: launched during attention, and the matmul after it may launch now too
        gdc_launch_dependents()
    row = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    ok = k < K
    if PDL:  # x is the previous kernel's output
        gdc_wait()
    x = tl.load(x_ptr + row * K + k, mask=ok, other=0.0).to(tl.float32)  # (BLOCK_K,)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FP8_MAX, MIN_SCALE)
    q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * K + k, q.to(q_ptr.dtype.element_ty), mask=ok)
    tl.store(scale_ptr + row, scale)


# A custom op: torch.compile (fullgraph, over the layer's work) sees one opaque call, not the launch code.
@torch.library.custom_op("kvtriton::per_token_fp8", mutates_args=())
def per_token_fp8(x: torch.Tensor, fp8_max: float, min_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (xq (M, K) float8_e4m3fn, scale (M, 1) fp32) with x ~= xq * scale; scale = max|x| /
    fp8_max per row, at least min_scale (models/fp8.py owns both numbers)."""
    m, k = x.shape
    x = x.contiguous()
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block_k = triton.next_power_of_2(k)
    chained = pdl.in_chain(x.device)
    _per_token_fp8[(m,)](x, q, scale, k, FP8_MAX=fp8_max, MIN_SCALE=min_scale, BLOCK_K=block_k, PDL=chained,
                         num_warps=4 if block_k <= 4096 else 8, **pdl.launch_options(chained))
    return q, scale


@per_token_fp8.register_fake
def _(x, fp8_max, min_scale):
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), x.new_empty(x.shape[0], 1, dtype=torch.float32)
