"""Skinny matmul for decode: y = x W^T for a few rows of x, with its neighbours fused in (Triton).

A batch-1 decode step reads every weight once, so its floor is weight bytes /
HBM bandwidth. What keeps a step off that floor is everything else: the small
elementwise kernels between the matmuls and the gap before each launch. So each
call here is one kernel that streams W once and does the work around the
matmul on the fly:

  linear(x, W, bias, residual)        residual + (x W^T + bias)
  rms_norm_linear(x, norm, W)         RMSNorm(x) W^T      (the norm is recomputed per program, from L2)
  rms_norm_swiglu(x, norm, W_gu)      silu(xn Wg^T) * (xn Wu^T), W_gu = [Wg; Wu] as fused in the model

Every intermediate is rounded to the activation dtype where the unfused
PyTorch modules round it (RMSNorm's normalised x, the matmul output, silu's
output), so the fused step computes what the unfused one does, up to fp32
summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_supported

MAX_ROWS = 4  # rows of x the kernel serves (its register tile grows with the rows)


@triton.jit
def _skinny_matmul(x_ptr, w_ptr, out_ptr, norm_ptr, bias_ptr, res_ptr, M, N, K, eps,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                   SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    # One program: BLOCK_N output features for all M rows. x (M, K), W (N, K) or (2N, K) with SWIGLU,
    # out (M, N); all contiguous. With NORM, BLOCK_K >= K: each x row is normalised whole, in registers.
    if PDL:  # let the next kernel launch now; it waits for this one before reading what we write
        gdc_launch_dependents()
    act = x_ptr.dtype.element_ty
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w_mask = n_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=w_mask, other=0.0)  # (BLOCK_N, BLOCK_K)
        if SWIGLU:
            w_up = tl.load(w_ptr + (n[:, None] + N) * K + k[None, :], mask=w_mask, other=0.0)
        if PDL:  # weights never depend on the previous kernel: they stream while it finishes; x does
            gdc_wait()
        xk = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if NORM:  # RMSNorm's rounding: normalise in fp32, round, scale by the weight, round
            xf = xk.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / K + eps)  # (BLOCK_M,)
            g = tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            xk = (g[None, :] * (xf * rstd[:, None]).to(act).to(tl.float32)).to(act)
        xk = xk.to(tl.float32)[:, None, :]  # (BLOCK_M, 1, BLOCK_K)
        acc += tl.sum(xk * w.to(tl.float32)[None, :, :], axis=2)
        if SWIGLU:
            acc_up += tl.sum(xk * w_up.to(tl.float32)[None, :, :], axis=2)
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


def _launch(x, weight, out_features, *, norm=None, eps=0.0, bias=None, residual=None, swiglu=False,
            out_dtype=None, blocks=None) -> torch.Tensor:
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"skinny matmul serves at most {MAX_ROWS} rows, got {m}")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(m, out_features, dtype=out_dtype or x.dtype, device=x.device)
    block_m = triton.next_power_of_2(m)
    block_n, block_k, warps = blocks or _blocks(out_features, k, block_m, norm is not None, 2 if swiglu else 1)
    pdl = pdl_supported(x.device)
    _skinny_matmul[(triton.cdiv(out_features, block_n),)](
        x, weight, out, norm if norm is not None else x, bias if bias is not None else x,
        residual.contiguous() if residual is not None else x, m, out_features, k, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm is not None, SWIGLU=swiglu,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, PDL=pdl, num_warps=warps,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


def _blocks(n: int, k: int, block_m: int, norm: bool, tiles: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from a sweep on an H200 (benchmarks/skinny_matmul_bench.py --sweep):
    long, narrow tiles (2048-4096 along K, 2-4 rows) and enough programs (~768, or ~512 for long rows) that
    every SM keeps several loads in flight. Small programs of one warp fit the most per SM (in a decode
    step, a whole small matmul can be resident and streaming its weights before its input is ready: see
    kernels/pdl.py). With the RMSNorm prologue, BLOCK_K covers K."""
    block_k = triton.next_power_of_2(k) if norm else min(4096, triton.next_power_of_2(k))
    budget = 8192 if norm else 16384  # fp32 products per program
    block_n = max(1, min(budget // (block_m * block_k * tiles), n // (768 if k <= 2048 else 512)))
    block_n = 1 << (block_n.bit_length() - 1)  # a power of two
    while block_m * block_n * block_k * tiles > budget and block_k > 256 and not norm:
        block_k //= 2
    return block_n, block_k, 1 if block_m * block_n * block_k * tiles <= 8192 else 4


# blocks: (BLOCK_N, BLOCK_K, num_warps) to override the tuned choice (the benchmark's sweep).

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, blocks=None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T [+ bias] [+ residual (M, N)] -> (M, N)."""
    return _launch(x, weight, weight.shape[0], bias=bias, residual=residual, blocks=blocks)


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                    blocks=None) -> torch.Tensor:
    """RMSNorm(x) @ weight^T [+ bias]: x (M, K), norm_weight (K,), weight (N, K) -> (M, N)."""
    return _launch(x, weight, weight.shape[0], norm=norm_weight, eps=eps, bias=bias, out_dtype=out_dtype,
                   blocks=blocks)


def rms_norm_swiglu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up: torch.Tensor,
                    blocks=None) -> torch.Tensor:
    """silu(xn Wg^T) * (xn Wu^T) with xn = RMSNorm(x): gate_up (2I, K) = [Wg; Wu] -> (M, I)."""
    return _launch(x, gate_up, gate_up.shape[0] // 2, norm=norm_weight, eps=eps, swiglu=True, blocks=blocks)
