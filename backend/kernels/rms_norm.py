"""A decode layer's residual add and the RMSNorm after it in one pass (Triton): vLLM's fused_add_rms_norm.

    s = x + delta                                   rounded to x's dtype: the residual stream, written out
    h = weight * (s * rsqrt(mean(s^2) + eps))       normalised in fp32, rounded, times the weight, rounded

as models/llama.py's RMSNorm computes it (HF's order). One program a row, the row in registers: each row is
read once. Inductor fuses the same ops in the compiled decode layers, but for a hidden size over 1,024 it
generates a looped two-pass reduction (the row read twice): 2.2 us a kernel at 64 rows on an H100, 32 of them
in a 1B-class step. kernels/fp8_quant.py's RMSNorm form quantizes h in the same pass (`add_rms_norm_row`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels import pdl
from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait

# Whether a 16-bit model's RMSNorms after a residual add (models/llama.py RMSNorm.add_forward) run here, where the
# runner gives them this kernel (runners/torch_runner.py, with kernels/pdl_matmul.py CHAIN). Off until measured in
# the step (benchmarks/profile_decode.py --bf16-norm on|off).
ENABLED = False


@triton.jit
def add_rms_norm_row(x_ptr, delta_ptr, norm_ptr, sum_ptr, row, k, ok, K, eps):
    """Row `row` of x + delta stored at sum_ptr; returns h (above) at columns k (ok: k < K) in x's dtype."""
    act = x_ptr.dtype.element_ty
    s = (tl.load(x_ptr + row * K + k, mask=ok, other=0.0).to(tl.float32)
         + tl.load(delta_ptr + row * K + k, mask=ok, other=0.0).to(tl.float32)).to(act)
    tl.store(sum_ptr + row * K + k, s, mask=ok)
    sf = s.to(tl.float32)
    normed = (sf * tl.rsqrt(tl.sum(sf * sf, axis=0) / K + eps)).to(act)
    weight = tl.load(norm_ptr + k, mask=ok, other=0.0)
    return (weight.to(tl.float32) * normed.to(tl.float32)).to(act)


@triton.jit
def _add_rms_norm(x_ptr, delta_ptr, norm_ptr, sum_ptr, out_ptr, K, eps, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:  # kernels/pdl.py CHAIN: resident before the kernel that writes delta has ended
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)  # a prefill's rows * K may pass 2^31
    k = tl.arange(0, BLOCK_K)
    ok = k < K
    h = add_rms_norm_row(x_ptr, delta_ptr, norm_ptr, sum_ptr, row, k, ok, K, eps)
    tl.store(out_ptr + row * K + k, h, mask=ok)


def row_warps(block_k: int) -> int:
    """Warps for one row of block_k values in registers: ~32 values a thread, 4 to 16 warps."""
    return min(16, max(4, block_k // 1024))


# A custom op, as kernels/fp8_quant.py's: torch.compile sees one opaque call.
@torch.library.custom_op("kvtriton::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x, delta (M, K) 16-bit, weight (K,) of their dtype -> (x + delta, RMSNorm(x + delta) with weight, eps)."""
    m, k = x.shape
    total, out = torch.empty_like(x), torch.empty_like(x)
    block_k = triton.next_power_of_2(k)
    chained = pdl.in_chain(x.device)
    _add_rms_norm[(m,)](x.contiguous(), delta.contiguous(), weight, total, out, k, eps, BLOCK_K=block_k, PDL=chained,
                        num_warps=row_warps(block_k), **pdl.launch_options(chained))
    return total, out


@add_rms_norm.register_fake
def _(x, delta, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)
