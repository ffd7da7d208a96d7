"""The work the decode matmul kernels fuse after the product: bias, SwiGLU, residual, the output's rounding.

Shared by kernels/skinny_matmul.py (1-4 rows, any weight format) and kernels/int4_gemv.py (one row, int4).
Every intermediate is rounded to the activation dtype where the unfused PyTorch modules round it (the
matmul output, silu's output), so a fused step computes what the unfused one does, up to fp32 summation
order.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_normalized(x, g, rstd, act: tl.constexpr):
    """RMSNorm's rounding: x (fp32) normalised in fp32, rounded to act, scaled by the weight g, rounded."""
    return (g * (x * rstd).to(act).to(tl.float32)).to(act).to(tl.float32)


@triton.jit
def store_outputs(acc, acc_up, m, m_ok, n, n_ok, N, out_ptr, bias_ptr, res_ptr, act: tl.constexpr,
                  SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """acc (and acc_up for SwiGLU) (BLOCK_M, BLOCK_N) fp32 for rows m and outputs n -> out (M, N): + bias,
    silu(gate) * up, + residual (M, N), rounded as the unfused modules round."""
    out_mask = m_ok[:, None] & n_ok[None, :]
    y = acc
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:  # silu(gate) * up, each rounded as F.silu and the product are
        gate = y.to(act).to(tl.float32)
        up = acc_up.to(act).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(act).to(tl.float32) * up
    if HAS_RESIDUAL:
        y = y.to(act).to(tl.float32) + tl.load(res_ptr + m[:, None] * N + n[None, :], mask=out_mask,
                                               other=0.0).to(tl.float32)
    # Rounded to the activation dtype even for an fp32 output: the logits then equal lm_head(x).float().
    tl.store(out_ptr + m[:, None] * N + n[None, :], y.to(act).to(out_ptr.dtype.element_ty), mask=out_mask)
