"""A decode matmul program's weights asked into L2 at its start, by the copy engine (Hopper's bulk prefetch).

At 3-64 rows a decode matmul reads each weight once and is bound by how many bytes are in flight, not by its
tensor cores: a program's software pipeline keeps a few (BLOCK_N, BLOCK_K) tiles in flight, and the small
projections (qkv, o_proj: 8-13 MB) end before the memory system is busy (an H100's bf16 qkv streamed ~1.7 TB/s of
3.0, benchmarks/profile_decode.py --profile). `cp.async.bulk.prefetch.L2` hands a whole contiguous range to the
copy engine in one instruction, so each program asks for its entire slice of the weight at once, and its
pipelined loads then find it in L2 or on its way. Launched with PDL (kernels/pdl.py), a program does this before
gdc_wait: the weights stream while the kernel ahead of it ends. A prefetch changes no value: it only moves bytes
into L2 (and L2 may drop them again; a load that misses reads HBM as before).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels.pdl import pdl_supported
from kvtriton.backend.kernels.tile_config import Tile

# Whether the decode matmuls (kernels/pdl_matmul.py, kernels/fp8_matmul.py) prefetch their weight slices.
# benchmarks/profile_decode.py --l2-prefetch on|off measures the step with and without.
ENABLED = False

# Weights larger than this are not prefetched: every program of such a matmul asking for its whole slice at once
# would overfill L2 (50 MB on an H100 or H200) and evict what the others asked for before they read it.
MAX_WEIGHT_BYTES = 1 << 62
MIN_BYTES = 16  # the bulk prefetch's granule: a range's start and size are multiples of it
MIN_GRANULE = tl.constexpr(MIN_BYTES)  # the same, for a kernel


@triton.jit
def prefetch_rows(w_ptr, rows, rows_ok, row_stride, col0, cols, CHUNKS: tl.constexpr):
    """Ask L2 for w[rows, col0 : col0 + cols] (elements of w's dtype; each row's range contiguous) as CHUNKS ranges a
    row, so that the requests spread over the program's threads. cols * element size / CHUNKS must be a multiple
    of 16 bytes, and each range's start 16-byte aligned (the caller's to check: `ranges_per_row`)."""
    chunk = cols // CHUNKS
    nbytes = chunk * (w_ptr.dtype.element_ty.primitive_bitwidth // 8)
    starts = w_ptr + rows[:, None] * row_stride + col0 + tl.arange(0, CHUNKS)[None, :] * chunk
    # A row past N asks for row 0's range instead: no request leaves the tensor.
    starts = tl.where(rows_ok[:, None], starts, w_ptr + col0 + tl.arange(0, CHUNKS)[None, :] * chunk)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                              [starts.to(tl.int64, bitcast=True), tl.full(starts.shape, nbytes, tl.int32)],
                              dtype=tl.int32, is_pure=False, pack=1)


RANGE_BYTES = 1 << 16  # what one bulk prefetch of `prefetch_bytes` asks for
RANGES_PER_PROGRAM = 128


@triton.jit
def _prefetch_bytes(ptr, nbytes, RANGE: tl.constexpr, BLOCK: tl.constexpr):
    # bytes [0, nbytes) from ptr (16-byte aligned, nbytes a multiple of 16) in RANGE-byte ranges, BLOCK a program.
    # The instruction returns at once: the program ends while the copy engine fetches.
    offsets = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64) * RANGE
    inside = offsets < nbytes
    starts = tl.where(inside, ptr + offsets, ptr)
    sizes = tl.where(inside, tl.minimum(nbytes - offsets, RANGE), MIN_GRANULE).to(tl.int32)
    tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r",
                              [starts.to(tl.int64, bitcast=True), sizes], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_bytes(region: torch.Tensor) -> None:
    """Ask L2 for a contiguous uint8 region (a weight's bytes, or their first part) on the current stream."""
    nbytes = region.numel()
    if nbytes == 0:
        return
    if nbytes % MIN_BYTES or region.data_ptr() % MIN_BYTES:
        raise ValueError(f"an L2 prefetch takes whole {MIN_BYTES}-byte granules, got {nbytes} bytes at "
                         f"{region.data_ptr():#x}")
    grid = (triton.cdiv(nbytes, RANGE_BYTES * RANGES_PER_PROGRAM),)
    _prefetch_bytes[grid](region, nbytes, RANGE=RANGE_BYTES, BLOCK=RANGES_PER_PROGRAM, num_warps=4)


def ranges_per_row(tile: Tile, n: int, k: int, element_size: int, m_tiles: int, device: torch.device) -> int:
    """PREFETCH for a decode matmul kernel of `tile` over an (n, k) weight: how many ranges each of a program's
    weight rows is asked for in, so that its threads each issue about one (Triton would otherwise give several
    threads the same range). 0 for none: prefetch is off or not Hopper, the weight is over MAX_WEIGHT_BYTES, K is
    not whole tiles (the kernel's EVEN_K), a range would not be whole 16-byte granules, or several row tiles would
    ask for the same weights."""
    if not (ENABLED and pdl_supported(device)) or n * k * element_size > MAX_WEIGHT_BYTES:
        return 0
    if k % (tile.block_k * tile.split_k) or m_tiles != 1:
        return 0
    cols = k // tile.split_k
    if (cols * element_size) % MIN_BYTES:
        return 0
    want = max(1, triton.next_power_of_2(triton.cdiv(32 * tile.warps, tile.block_n)))
    while want > 1 and (cols % want or (cols // want * element_size) % MIN_BYTES):
        want //= 2
    return want


__all__ = ["ENABLED", "prefetch_bytes", "prefetch_rows", "ranges_per_row"]
