"""The grid and epilogue the decode matmul kernels share: which output tile a program owns, and that tile
stored whole or as a split-K partial.

With SPLIT_K > 1 several programs own the same (BLOCK_M, BLOCK_N) output tile, each over its share of K;
each stores its fp32 partial sum at plane `split` of a (SPLIT_K, M, N) buffer and the caller adds the
planes (deterministic, unlike atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(m, m_ok, n, n_ok, split): this program's rows and outputs, with their bounds, and its share of K.
    The grid is (N tiles, M tiles, SPLIT_K)."""
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return m, m < M, n, n < N, tl.program_id(2)


@triton.jit
def store_tile(out_ptr, acc, m, m_ok, n, n_ok, split, M, N, SPLIT_K: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 for rows m and outputs n: into out (M, N) in its dtype, or with
    SPLIT_K > 1 into plane `split` of out (SPLIT_K, M, N) fp32."""
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + (split * M + m[:, None]) * N + n[None, :], acc, mask=mask)
