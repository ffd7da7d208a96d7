"""The grid and epilogue the decode matmul kernels share: which output tile a program owns, and that tile
stored whole or as a split-K partial.

With SPLIT_K > 1 several programs own the same (BLOCK_M, BLOCK_N) output tile, each over its share of K;
each stores its fp32 partial sum at plane `split` of a (SPLIT_K, M, N) buffer and `add_planes` adds the
planes (deterministic, unlike atomics) in one launch. `planes.sum(0).to(dtype)` was two (a reduction, then
a cast), and at 64 rows the fp8 step's split-K down_proj spent 5.4 us a layer in them (H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels import pdl
from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait

ADD_BLOCK = 1024  # outputs per program of _add_planes


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(m, m_ok, n, n_ok, split): this program's rows and outputs, with their bounds, and its share of K.
    The grid is (N tiles, M tiles, SPLIT_K)."""
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return m, m < M, n, n < N, tl.program_id(2)


@triton.jit
def k_bounds(K, split, SPLIT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """(first, end): the inputs of plane `split`, whole BLOCK_K tiles a plane (the last plane's may end short)."""
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    return split * k_per_split, tl.minimum((split + 1) * k_per_split, K)


@triton.jit
def row_tile(ptr, rows, rows_ok, k, k_ok, K, EVEN_K: tl.constexpr):
    """The (rows, k) tile of a row-major (R, K) matrix, zeros outside it; EVEN_K: every k is inside."""
    mask = rows_ok[:, None]
    if not EVEN_K:
        mask = mask & k_ok[None, :]
    return tl.load(ptr + rows[:, None] * K + k[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(out_ptr, acc, m, m_ok, n, n_ok, split, M, N, SPLIT_K: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 for rows m and outputs n: into out (M, N) in its dtype, or with
    SPLIT_K > 1 into plane `split` of out (SPLIT_K, M, N) fp32."""
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + (split * M + m[:, None]) * N + n[None, :], acc, mask=mask)


@triton.jit
def zero_planes(out_ptr, m, m_ok, n, n_ok, split, M, N, FIRST: tl.constexpr, PLANES: tl.constexpr):
    """Zeros into planes FIRST..PLANES-1 of out (PLANES, M, N) fp32 at this tile, from plane 0's programs: a
    launch of fewer splits than its caller's planes (kernels/pdl_matmul.py's `pdl_linear_planes`)."""
    if split == 0:
        mask = m_ok[:, None] & n_ok[None, :]
        for s in tl.static_range(FIRST, PLANES):
            tl.store(out_ptr + (s * M + m[:, None]) * N + n[None, :], tl.zeros_like(mask).to(tl.float32), mask=mask)


@triton.jit
def _add_planes(planes_ptr, out_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # out[i] = planes[0, i] + planes[1, i] + ... in fp32, in plane order, rounded once to out's dtype.
    if PDL:  # kernels/pdl.py CHAIN: resident before the matmul that writes the planes has ended
        gdc_launch_dependents()
        gdc_wait()
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < MN
    acc = tl.load(planes_ptr + i, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(planes_ptr + s * MN + i, mask=ok, other=0.0)
    tl.store(out_ptr + i, acc.to(out_ptr.dtype.element_ty), mask=ok)


def output_buffer(m: int, n: int, dtype: torch.dtype, split_k: int, device: torch.device,
                  planes: int = 0) -> torch.Tensor:
    """What a matmul's programs store into (store_tile): (M, N) of dtype, or with split_k > 1 the (split_k, M, N)
    fp32 planes of their partial sums; planes (at least split_k): (planes, M, N) fp32 whatever the split, the
    planes past it for zero_planes to fill (a caller that adds them itself)."""
    if planes and planes < split_k:
        raise ValueError(f"{planes} planes cannot hold a split of {split_k}")
    if split_k == 1 and not planes:
        return torch.empty(m, n, dtype=dtype, device=device)
    return torch.empty(planes or split_k, m, n, dtype=torch.float32, device=device)


def finished(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (M, N) result of an output_buffer the programs have filled: itself, or its planes added."""
    return out if out.dim() == 2 else add_planes(out, dtype)


def add_planes(planes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """planes (SPLIT_K, M, N) fp32, contiguous -> (M, N) dtype: their sum."""
    split_k, m, n = planes.shape
    out = torch.empty(m, n, dtype=dtype, device=planes.device)
    chained = pdl.in_chain(planes.device)
    _add_planes[(triton.cdiv(m * n, ADD_BLOCK),)](planes, out, m * n, SPLIT_K=split_k, BLOCK=ADD_BLOCK, PDL=chained,
                                                  num_warps=4, **pdl.launch_options(chained))
    return out
