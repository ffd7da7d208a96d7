"""The grid and epilogue the decode matmul kernels share: which output tile a program owns, and that tile
stored whole or as a split-K partial.

With SPLIT_K > 1 several programs own the same (BLOCK_M, BLOCK_N) output tile, each over its share of K;
each stores its fp32 partial sum at plane `split` of a (SPLIT_K, M, N) buffer. The last of a tile's programs to
finish adds the planes, in plane order (deterministic, unlike atomic adds into the output), and stores the sum:
cuBLAS's and CUTLASS's serial split-K reduction, counted by one int32 a tile (`arrivals`). Before, a launch of
its own (`add_planes`) added them: at 64 rows the fp8 step's split-K adds took 22 us of an H200's 0.945 ms step
on its critical path, a kernel and a launch gap a layer (docs/performance-gpu.md, stop 59).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels import pdl
from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait

ADD_BLOCK = 1024  # outputs per program of _add_planes
# Whether the last program of a split tile adds the planes (store_tile), or a launch after the matmul does
# (add_planes): benchmarks/profile_decode.py --split-k-reduce in-kernel|launch measures the two.
IN_KERNEL_REDUCE = True
# Split output tiles one launch may have: one arrival count each (the 64-row decode projections have up to 64).
MAX_SPLIT_TILES = 4096


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
def store_tile(out_ptr, planes_ptr, arrivals_ptr, acc, m, m_ok, n, n_ok, split, M, N, SPLIT_K: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) fp32 for rows m and outputs n, into out (M, N) in its dtype. With SPLIT_K > 1 it is
    plane `split` of the sum: stored into planes (SPLIT_K, M, N) fp32, and the tile's last program to arrive
    (arrivals: one int32 a tile, zero before the launch) adds all planes and stores their sum into out, then
    sets its count back to zero, so that the next launch (and every CUDA-graph replay) starts from zero.
    arrivals None: the planes stay for add_planes. Invariant: no two launches on a device run their epilogues
    at once (kernels/pdl.py: a kernel launched with PDL writes nothing before the previous one has completed),
    so one set of counts a device serves every launch."""
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(planes_ptr + (split * M + m[:, None]) * N + n[None, :], acc, mask=mask)
        if arrivals_ptr is not None:
            tile = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
            tl.debug_barrier()  # all of this program's threads have stored their part of the plane
            # Release: the plane is visible before the count; acquire: the last program sees every plane.
            arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT_K - 1:
                total = tl.zeros_like(acc)
                for s in tl.static_range(SPLIT_K):  # plane order, whichever program came last
                    total += tl.load(planes_ptr + (s * M + m[:, None]) * N + n[None, :], mask=mask, other=0.0,
                                     cache_modifier=".cg")  # from L2: other SMs wrote them
                tl.store(out_ptr + m[:, None] * N + n[None, :], total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.store(arrivals_ptr + tile, 0)


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


_arrivals: dict[torch.device, torch.Tensor] = {}


def output_buffers(m: int, n: int, dtype: torch.dtype, split_k: int, device: torch.device, grid: tuple[int, ...]):
    """(out, planes, arrivals), what a matmul's programs store into (store_tile): out (M, N) of dtype; with
    split_k > 1 the (split_k, M, N) fp32 planes of their partial sums and the device's arrival counts (None where
    add_planes adds the planes after the launch). Without a split, planes is out and arrivals None (unused)."""
    out = torch.empty(m, n, dtype=dtype, device=device)
    if split_k == 1:
        return out, out, None
    planes = torch.empty(split_k, m, n, dtype=torch.float32, device=device)
    if not IN_KERNEL_REDUCE:
        return out, planes, None
    if grid[0] * grid[1] > MAX_SPLIT_TILES:
        raise ValueError(f"{grid[0] * grid[1]} split output tiles: more than MAX_SPLIT_TILES ({MAX_SPLIT_TILES})")
    arrivals = _arrivals.get(device)
    if arrivals is None:  # zeroed once; each launch leaves it zero (store_tile)
        arrivals = _arrivals[device] = torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device)
    return out, planes, arrivals


def finished(out: torch.Tensor, planes: torch.Tensor, arrivals: torch.Tensor | None) -> torch.Tensor:
    """The (M, N) result once the programs have run: out, with the planes added first where the programs left
    them (split along K, no arrival counts)."""
    if planes is out or arrivals is not None:
        return out
    return add_planes(planes, out)


def add_planes(planes: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """planes (SPLIT_K, M, N) fp32, contiguous -> out (M, N): their sum, in plane order."""
    split_k, m, n = planes.shape
    chained = pdl.in_chain(planes.device)
    _add_planes[(triton.cdiv(m * n, ADD_BLOCK),)](planes, out, m * n, SPLIT_K=split_k, BLOCK=ADD_BLOCK, PDL=chained,
                                                  num_warps=4, **pdl.launch_options(chained))
    return out
