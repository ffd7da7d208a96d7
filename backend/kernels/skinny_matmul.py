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

W may also be quantized (a `QuantizedWeight`), so that fp8 and int4 decode
steps get the same fusions and the same five kernels a layer as bf16 (before,
they ran each projection unfused, with a separate activation-quantization
launch for fp8, and were slower than bf16 at batch 1):
  fp8   W8A8 e4m3, the numerics of models/fp8.py's `_scaled_mm` path: each
        program quantizes x per token itself (scale = max|x| / 448, from the
        normalised row already in registers, or from one pass over x when a
        tile is shorter than K), multiplies e4m3 by e4m3 (exact in fp32) and
        scales by x_scale * w_scale in the epilogue. This is the GEMV form
        vLLM and TensorRT-LLM use for fp8 at a few rows, where cuBLASLt's fp8
        GEMM pads M to a 64-row tile and adds a quantization launch.
  int4  kernels/int4_matmul.py's register dequantization (no int->float
        conversion, no bf16 rounding of the weight).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels.int4_gemv import TILES as GEMV_TILES
from kvtriton.backend.kernels.int4_gemv import int4_gemv
from kvtriton.backend.kernels.int4_gemv import serves as int4_gemv_serves
from kvtriton.backend.kernels.int4_matmul import int4_tile
from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, pdl_supported
from kvtriton.backend.kernels.skinny_epilogue import rms_normalized, store_outputs
from kvtriton.backend.kernels.tile_config import Tile, lookup

MAX_ROWS = 4  # rows of x the kernel serves (an unrolled loop over them)
# The weight formats (the WEIGHT constexpr), and e4m3's numbers: models/fp8.py's FP8_MAX and MIN_SCALE, which a
# kernel cannot import (a jitted function reads only tl.constexpr globals).
DENSE, FP8, INT4 = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
FP8_MAX, FP8_MIN_SCALE = tl.constexpr(448.0), tl.constexpr(1e-12)

# ("skinny-bf16" | "skinny-fp8" | "skinny-int4", rows bucket, N, K) -> Tile fields (block_m, block_n, block_k,
# split_k = 1, warps), measured on an H200 by benchmarks/quant_kernels_bench.py --device cuda, which prints
# this table; N is the output width (for rms_norm_swiglu, the intermediate size). Empty: `_blocks` decides.
# Measured on an NVIDIA H200 (torch 2.11, triton 3.6) by benchmarks/quant_kernels_bench.py --device cuda
# --rows 1,2,4,16,64; fp8 at one row again (2026-12-04) with 2- and 8-warp programs among the candidates: 8-16
# rows a program on 8 warps for qkv, o and down, the fp8 batch-1 step 0.573 -> 0.537 ms.
TILES: dict[tuple[str, int, int, int], tuple] = {
    ('skinny-fp8', 1, 3072, 2048): (1, 16, 2048, 1, 8),
    ('skinny-int4', 1, 3072, 2048): (1, 16, 2048, 1, 4),
    ('skinny-fp8', 1, 2048, 2048): (1, 8, 2048, 1, 8),
    ('skinny-int4', 1, 2048, 2048): (1, 8, 2048, 1, 4),
    ('skinny-fp8', 1, 8192, 2048): (1, 8, 2048, 1, 4),
    ('skinny-int4', 1, 8192, 2048): (1, 4, 2048, 1, 4),
    ('skinny-fp8', 1, 2048, 8192): (1, 8, 8192, 1, 8),
    ('skinny-int4', 1, 2048, 8192): (1, 8, 4096, 1, 4),
    ('skinny-fp8', 1, 49152, 2048): (1, 8, 2048, 1, 2),
    ('skinny-int4', 1, 49152, 2048): (1, 8, 2048, 1, 4),
    ('skinny-fp8', 2, 3072, 2048): (2, 4, 2048, 1, 4),
    ('skinny-int4', 2, 3072, 2048): (2, 8, 2048, 1, 4),
    ('skinny-fp8', 2, 2048, 2048): (2, 4, 2048, 1, 4),
    ('skinny-int4', 2, 2048, 2048): (2, 8, 2048, 1, 4),
    ('skinny-fp8', 2, 8192, 2048): (2, 2, 2048, 1, 4),
    ('skinny-int4', 2, 8192, 2048): (2, 4, 2048, 1, 4),
    ('skinny-fp8', 2, 2048, 8192): (2, 8, 4096, 1, 4),
    ('skinny-int4', 2, 2048, 8192): (2, 4, 4096, 1, 4),
    ('skinny-fp8', 2, 49152, 2048): (2, 4, 2048, 1, 4),
    ('skinny-int4', 2, 49152, 2048): (2, 8, 2048, 1, 4),
    ('skinny-fp8', 4, 3072, 2048): (4, 4, 2048, 1, 4),
    ('skinny-int4', 4, 3072, 2048): (4, 4, 2048, 1, 4),
    ('skinny-fp8', 4, 2048, 2048): (4, 8, 2048, 1, 4),
    ('skinny-int4', 4, 2048, 2048): (4, 8, 2048, 1, 4),
    ('skinny-fp8', 4, 8192, 2048): (4, 4, 2048, 1, 4),
    ('skinny-int4', 4, 8192, 2048): (4, 4, 2048, 1, 4),
    ('skinny-fp8', 4, 2048, 8192): (4, 4, 4096, 1, 4),
    ('skinny-int4', 4, 2048, 8192): (4, 4, 4096, 1, 4),
    ('skinny-fp8', 4, 49152, 2048): (4, 4, 2048, 1, 4),
    ('skinny-int4', 4, 49152, 2048): (4, 4, 2048, 1, 4),
}


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized (N, K) matrix as the decode kernels read it; models/fp8.py and models/int4.py own the layouts.

    kind "fp8":  data (N16, K) float8_e4m3fn (rows past N are zero padding), scale (1, N16) fp32 per channel
    kind "int4": data (N, K/2) uint8 two codes a byte, scale (N, K/G) fp16, zero_point (N, K/G) uint8,
                 offset (N, K/G) fp16 or None; w = (q - zero_point) * scale + offset
    """

    kind: str
    out_features: int  # N: the rows that are real
    data: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    group_size: int = 0

    @property
    def in_features(self) -> int:
        return self.data.shape[1] * (2 if self.kind == "int4" else 1)


@triton.jit
def _skinny_matmul(x_ptr, w_ptr, out_ptr, norm_ptr, bias_ptr, res_ptr, ws_ptr, zero_ptr, offset_ptr, M, N, K, eps,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM: tl.constexpr,
                   SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr,
                   WEIGHT: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, WHOLE_ROWS: tl.constexpr):
    # One program: BLOCK_N output features for all M rows. x (M, K), W (N, K) or (2N, K) with SWIGLU (int4:
    # (N, K/2) bytes), out (M, N); all contiguous. With NORM, BLOCK_K >= K: each x row is normalised whole,
    # in registers. ws/zero/offset: the quantized weight's numbers (QuantizedWeight), unused for DENSE.
    # WHOLE_ROWS: BLOCK_K >= K, one tile holds each row whole.
    if PDL:  # let the next kernel launch now; it waits for this one before reading what we write
        gdc_launch_dependents()
    act = x_ptr.dtype.element_ty
    m = tl.arange(0, BLOCK_M)
    m_ok = m < M
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    x_scale = tl.full((BLOCK_M,), 1.0, tl.float32)  # fp8: each row's activation scale
    if WEIGHT == FP8 and not WHOLE_ROWS:  # a tile sees part of each row: one pass over x (from L2) for max|x|
        if PDL:
            gdc_wait()
        amax = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(xk.to(tl.float32)), axis=1))
        x_scale = tl.maximum(amax / FP8_MAX, FP8_MIN_SCALE)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w_mask = n_ok[:, None] & k_ok[None, :]
        if WEIGHT == INT4:  # (BLOCK_N, BLOCK_K/2) each, fp32: the weights of the even and of the odd inputs
            w, w_odd = int4_tile(w_ptr, ws_ptr, zero_ptr, offset_ptr, n, n_ok, k0, K, GROUP, BLOCK_N, BLOCK_K,
                                 HAS_OFFSET, True)
            if SWIGLU:
                w_up, w_up_odd = int4_tile(w_ptr, ws_ptr, zero_ptr, offset_ptr, n + N, n_ok, k0, K, GROUP, BLOCK_N,
                                           BLOCK_K, HAS_OFFSET, True)
        else:
            w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=w_mask, other=0.0)  # (BLOCK_N, BLOCK_K)
            if SWIGLU:
                w_up = tl.load(w_ptr + (n[:, None] + N) * K + k[None, :], mask=w_mask, other=0.0)
        if PDL:  # weights never depend on the previous kernel: they stream while it finishes; x does
            gdc_wait()
        # One row of x at a time against the 2-D tile. (A broadcast over a third, row axis makes the compiler
        # move the weight tile through shared memory into that axis' layout at every step; the rows are few,
        # the loop is unrolled.) int4 reads x's even and odd inputs with stride 2, as the codes hold them, so
        # the weight is never interleaved in registers.
        if WEIGHT != INT4:
            w = w.to(tl.float32)  # bf16 or e4m3 values, exact in fp32
            if SWIGLU:
                w_up = w_up.to(tl.float32)
        else:
            pair = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            pair_ok = pair < K // 2
        if NORM:
            if WEIGHT == INT4:
                g_even = tl.load(norm_ptr + 2 * pair, mask=pair_ok, other=0.0).to(tl.float32)
                g_odd = tl.load(norm_ptr + 2 * pair + 1, mask=pair_ok, other=0.0).to(tl.float32)
            else:
                g = tl.load(norm_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        for r in tl.static_range(BLOCK_M):
            on_row = m[:, None] == r  # (BLOCK_M, 1): where this row's sums go
            if WEIGHT == INT4:
                x_even = tl.load(x_ptr + r * K + 2 * pair, mask=pair_ok & (r < M), other=0.0).to(tl.float32)
                x_odd = tl.load(x_ptr + r * K + 2 * pair + 1, mask=pair_ok & (r < M), other=0.0).to(tl.float32)
                if NORM:  # RMSNorm's rounding, as above
                    rstd = 1.0 / tl.sqrt((tl.sum(x_even * x_even) + tl.sum(x_odd * x_odd)) / K + eps)
                    x_even = rms_normalized(x_even, g_even, rstd, act)
                    x_odd = rms_normalized(x_odd, g_odd, rstd, act)
                part = tl.sum(x_even[None, :] * w + x_odd[None, :] * w_odd, axis=1)  # (BLOCK_N,)
                acc += tl.where(on_row, part[None, :], 0.0)
                if SWIGLU:
                    part = tl.sum(x_even[None, :] * w_up + x_odd[None, :] * w_up_odd, axis=1)
                    acc_up += tl.where(on_row, part[None, :], 0.0)
            else:  # bf16, or fp8: per-token e4m3, as kernels/fp8_quant.py: x ~= xq * x_scale
                xr = tl.load(x_ptr + r * K + k, mask=k_ok & (r < M), other=0.0).to(tl.float32)  # (BLOCK_K,)
                if NORM:  # RMSNorm's rounding: normalise in fp32, round, scale by the weight, round
                    rstd = 1.0 / tl.sqrt(tl.sum(xr * xr) / K + eps)
                    xr = rms_normalized(xr, g, rstd, act)
                if WEIGHT == FP8:
                    if WHOLE_ROWS:  # the whole row is here (always so with NORM)
                        row_scale = tl.maximum(tl.max(tl.abs(xr)) / FP8_MAX, FP8_MIN_SCALE)
                        x_scale = tl.where(m == r, row_scale, x_scale)
                    else:  # from the first pass
                        row_scale = tl.sum(tl.where(m == r, x_scale, 0.0))
                    xr = tl.clamp(xr / row_scale, -FP8_MAX, FP8_MAX).to(w_ptr.dtype.element_ty).to(tl.float32)
                acc += tl.where(on_row, tl.sum(xr[None, :] * w, axis=1)[None, :], 0.0)
                if SWIGLU:
                    acc_up += tl.where(on_row, tl.sum(xr[None, :] * w_up, axis=1)[None, :], 0.0)
    if WEIGHT == FP8:  # y = (xq . wq) * x_scale * w_scale, as _scaled_mm's epilogue
        acc *= x_scale[:, None] * tl.load(ws_ptr + n, mask=n_ok, other=0.0)[None, :]
        if SWIGLU:
            acc_up *= x_scale[:, None] * tl.load(ws_ptr + N + n, mask=n_ok, other=0.0)[None, :]
    store_outputs(acc, acc_up, m, m_ok, n, n_ok, N, out_ptr, bias_ptr, res_ptr, act, SWIGLU, HAS_BIAS, HAS_RESIDUAL)


def _launch(x, weight, out_features, *, norm=None, eps=0.0, bias=None, residual=None, swiglu=False,
            out_dtype=None, blocks=None) -> torch.Tensor:
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"skinny matmul serves at most {MAX_ROWS} rows, got {m}")
    quantized = weight if isinstance(weight, QuantizedWeight) else None
    kind = quantized.kind if quantized is not None else "bf16"
    fmt = {"bf16": DENSE, "fp8": FP8, "int4": INT4}[kind].value
    if quantized is not None and quantized.in_features != k:
        raise ValueError(f"x has {k} inputs, the {kind} weight {quantized.in_features}")
    x = x.contiguous()
    # One int4 row: the GEMV kernel, for the shapes where it measured faster (or when the sweep asks for it).
    if kind == "int4" and int4_gemv_serves(x, quantized.group_size):
        if blocks is None:
            gemv = GEMV_TILES.get((out_features, k))
        else:
            gemv = blocks[1:] if blocks[0] == "gemv" else None
        if gemv is not None:
            return int4_gemv(x, quantized.data, quantized.scale, quantized.zero_point, quantized.offset,
                             quantized.group_size, out_features, norm=norm, eps=eps, bias=bias, residual=residual,
                             swiglu=swiglu, out_dtype=out_dtype, rows=gemv[0], warps=gemv[1],
                             per_sm=gemv[2] if len(gemv) > 2 else None)
    data = (quantized.data if quantized is not None else weight).contiguous()
    out = torch.empty(m, out_features, dtype=out_dtype or x.dtype, device=x.device)
    block_m = triton.next_power_of_2(m)
    tile = lookup(TILES, f"skinny-{kind}", m, out_features, k)
    if blocks is None and tile is not None:
        blocks = tile.block_n, tile.block_k, tile.warps
    block_n, block_k, warps = blocks or _blocks(out_features, k, block_m, norm is not None, 2 if swiglu else 1)
    if kind == "int4":  # a tile holds whole groups
        block_k = max(block_k, quantized.group_size)
    pdl = pdl_supported(x.device)
    spare = x  # any pointer, for the operands a variant does not read
    _skinny_matmul[(triton.cdiv(out_features, block_n),)](
        x, data, out, norm if norm is not None else spare, bias if bias is not None else spare,
        residual.contiguous() if residual is not None else spare,
        quantized.scale if quantized is not None else spare,
        quantized.zero_point if kind == "int4" else spare,
        quantized.offset if kind == "int4" and quantized.offset is not None else spare,
        m, out_features, k, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, NORM=norm is not None, SWIGLU=swiglu,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, PDL=pdl, WEIGHT=fmt,
        GROUP=quantized.group_size if kind == "int4" else 1,
        HAS_OFFSET=kind == "int4" and quantized.offset is not None, WHOLE_ROWS=block_k >= k, num_warps=warps,
        **launch_options(pdl),
    )
    return out


def tile_of(m: int, n: int, k: int, norm: bool, swiglu: bool) -> Tile:
    """The heuristic's choice as a Tile (the benchmark prints it beside the measured best)."""
    block_m = triton.next_power_of_2(m)
    block_n, block_k, warps = _blocks(n, k, block_m, norm, 2 if swiglu else 1)
    return Tile(block_m, block_n, block_k, 1, warps)


def _blocks(n: int, k: int, block_m: int, norm: bool, tiles: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from a sweep on an H200 (benchmarks/skinny_matmul_bench.py --sweep):
    long, narrow tiles (2048-4096 along K, 2-4 rows) and enough programs (~768, or ~512 for long rows) that
    every SM keeps several loads in flight. Small programs of one warp fit the most per SM (in a decode
    step, a whole small matmul can be resident and streaming its weights before its input is ready: see
    kernels/pdl.py). With the RMSNorm prologue, BLOCK_K covers K. More rows take narrower tiles: the kernel
    multiplies them one at a time against the weight tile, and at 2 rows tiles sized for one row's budget
    were slower (a step's matmuls 0.954 against 0.712 ms, H200)."""
    block_k = triton.next_power_of_2(k) if norm else min(4096, triton.next_power_of_2(k))
    budget = 8192 if norm else 16384  # fp32 products per program
    block_n = max(1, min(budget // (block_m * block_k * tiles), n // (768 if k <= 2048 else 512)))
    block_n = 1 << (block_n.bit_length() - 1)  # a power of two
    while block_m * block_n * block_k * tiles > budget and block_k > 256 and not norm:
        block_k //= 2
    return block_n, block_k, 1 if block_m * block_n * block_k * tiles <= 8192 else 4


# weight: a dense (N, K) tensor in x's dtype, or a QuantizedWeight. blocks: (BLOCK_N, BLOCK_K, num_warps) to
# override the table and the heuristic (the benchmark's sweep), or ("gemv", ROWS, num_warps[, programs per SM]):
# one int4 row through kernels/int4_gemv.py under that choice.

def _rows(weight) -> int:
    return weight.out_features if isinstance(weight, QuantizedWeight) else weight.shape[0]


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, blocks=None) -> torch.Tensor:
    """x (M, K) @ weight (N, K)^T [+ bias] [+ residual (M, N)] -> (M, N)."""
    return _launch(x, weight, _rows(weight), bias=bias, residual=residual, blocks=blocks)


def rms_norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                    blocks=None) -> torch.Tensor:
    """RMSNorm(x) @ weight^T [+ bias]: x (M, K), norm_weight (K,), weight (N, K) -> (M, N)."""
    return _launch(x, weight, _rows(weight), norm=norm_weight, eps=eps, bias=bias, out_dtype=out_dtype,
                   blocks=blocks)


def rms_norm_swiglu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, gate_up,
                    blocks=None) -> torch.Tensor:
    """silu(xn Wg^T) * (xn Wu^T) with xn = RMSNorm(x): gate_up (2I, K) = [Wg; Wu] -> (M, I)."""
    return _launch(x, gate_up, _rows(gate_up) // 2, norm=norm_weight, eps=eps, swiglu=True, blocks=blocks)
