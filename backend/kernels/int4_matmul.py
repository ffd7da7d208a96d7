"""INT4 weight-only matmul for decode batches: y = x W^T with W dequantized in registers (Triton).

W is stored as models/int4.py lays it out: qweight (N, K/2) uint8, two 4-bit codes per byte (the even
input in the low nibble), and per group of GROUP inputs an fp16 scale, a uint8 zero point and
optionally an fp16 offset:  w[n, k] = (q - zero_point) * scale + offset.

A decode step is bound by weight bytes, so each program streams a (BLOCK_N, BLOCK_K) tile of codes
(a quarter of the bf16 bytes). At 4 bits the CUDA cores become the second limit: an H200 must
dequantize ~7e12 weights/s to keep up with its HBM, about 5 instructions a weight. So the dequantization
is the cheap form FasterTransformer and Marlin use, written in Triton:
  - the code becomes a float without an int->float conversion (a quarter-rate instruction): OR-ing it into
    the mantissa of 2^23 gives the float 2^23 + q, and one subtraction of (2^23 + zero_point), exact in
    fp32, gives q - zero_point;
  - then (q - z) * s + o in fp32: no rounding of the weight on CUDA cores; for tl.dot it is rounded to the
    activation dtype for the tensor cores;
  - the low and high nibbles are never interleaved in registers: they multiply the even and the odd
    inputs of x, read with stride 2 (x is tiny and comes from L2).
Two ways to multiply, per (rows bucket, N, K) from TILES (benchmarks/quant_kernels_bench.py --device cuda):
  broadcast  fp32 multiply-sum on CUDA cores, long narrow tiles, one row of x at a time: the GEMV form
  dot        tl.dot on (BLOCK_M, BLOCK_K/2) x (BLOCK_K/2, BLOCK_N) tiles, the even inputs' and the odd
             ones', the weight rounded to the activation dtype for the tensor cores (the GemLite and Marlin
             form for 16-64 rows), the K loop software-pipelined (Tile.stages)
and, in both, split-K: at N = K = 2048 a 32-wide tile gives 64 programs for 132 SMs, so SPLIT_K programs
share one output tile along K and split_k.add_planes adds their fp32 partial sums (deterministic, unlike atomics).
Prefill (more than MAX_ROWS rows) does not come here: `int4_dequantize` writes the weight once in the
activation dtype (the same tile code) and models/int4.py hands it to cuBLAS, compute-bound there anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels.direct_op import direct_op
from kvtriton.backend.kernels.split_k import finished, output_buffer, output_tile, store_tile
from kvtriton.backend.kernels.tile_config import BROADCAST_ROWS, ROWS_NOT_SPECIALIZED, Tile, lookup

MAX_ROWS = 64  # the decode batch sizes this kernel serves
MAGIC = tl.constexpr(8388608.0)  # 2^23: the float whose mantissa's low bits are the OR-ed code

# (kernel, rows bucket, N, K) -> Tile fields, measured on an H200 by benchmarks/quant_kernels_bench.py
# --device cuda (it prints this table). Empty: every shape takes `heuristic_tile`. "int4" is this file's
# matmul; "skinny-int4" is kernels/skinny_matmul.py's fused decode kernel reading int4 weights.
# Measured on an NVIDIA H200 (torch 2.11, triton 3.6) by benchmarks/quant_kernels_bench.py --device cuda: rows 1-4
# --rows 1,2,4,16,64. On an H100 (2026-12-07): the dot rows (16-64) again with --rows 16,32,64 after the dot form was
# rewritten (the 1B int4 step at 16 / 32 / 64 rows 1.206 / 1.395 / 1.759 -> 1.137 / 1.298 / 1.483 ms, alternated
# twice); the 8-row bucket, missing until then, with --rows 8 (batch 5-8 had taken the broadcast heuristic: 6.43 ->
# 1.09 ms at batch 8); the 4-row qkv and o_proj with --rows 2,4, cut after those two (batch 4 1.142 -> 1.085 ms).
TILES: dict[tuple[str, int, int, int], tuple] = {
    ('int4', 1, 3072, 2048): (1, 2, 1024, 1, 1, False),
    ('int4', 1, 2048, 2048): (1, 4, 1024, 1, 4, False),
    ('int4', 1, 16384, 2048): (1, 4, 1024, 1, 1, False),
    ('int4', 1, 2048, 8192): (1, 4, 1024, 1, 4, False),
    ('int4', 1, 49152, 2048): (1, 4, 1024, 1, 1, False),
    ('int4', 2, 3072, 2048): (2, 2, 1024, 1, 1, False),
    ('int4', 2, 2048, 2048): (2, 4, 1024, 1, 4, False),
    ('int4', 2, 16384, 2048): (2, 8, 512, 1, 4, False),
    ('int4', 2, 2048, 8192): (2, 4, 1024, 1, 4, False),
    ('int4', 2, 49152, 2048): (16, 64, 128, 2, 4, True),
    ('int4', 4, 3072, 2048): (16, 64, 128, 4, 4, True, 4),
    ('int4', 4, 2048, 2048): (16, 32, 256, 4, 4, True, 3),
    ('int4', 4, 16384, 2048): (16, 64, 128, 2, 4, True),
    ('int4', 4, 2048, 8192): (16, 32, 128, 4, 4, True),
    ('int4', 4, 49152, 2048): (16, 64, 128, 2, 4, True),
    ('int4', 8, 3072, 2048): (16, 64, 128, 4, 4, True, 4),
    ('int4', 8, 2048, 2048): (16, 32, 256, 4, 4, True, 3),
    ('int4', 8, 16384, 2048): (16, 64, 256, 1, 4, True, 3),
    ('int4', 8, 2048, 8192): (16, 64, 256, 8, 4, True, 3),
    ('int4', 8, 49152, 2048): (16, 64, 128, 1, 4, True, 4),
    ('int4', 16, 3072, 2048): (16, 64, 128, 4, 4, True, 3),
    ('int4', 16, 2048, 2048): (16, 32, 256, 4, 4, True, 3),
    ('int4', 16, 16384, 2048): (16, 64, 256, 1, 4, True, 3),
    ('int4', 16, 2048, 8192): (16, 64, 128, 8, 4, True, 3),
    ('int4', 16, 49152, 2048): (16, 64, 128, 1, 4, True, 3),
    ('int4', 32, 3072, 2048): (32, 64, 128, 4, 4, True, 3),
    ('int4', 32, 2048, 2048): (32, 64, 128, 8, 4, True, 4),
    ('int4', 32, 16384, 2048): (32, 64, 128, 1, 4, True, 3),
    ('int4', 32, 2048, 8192): (32, 64, 128, 8, 4, True, 3),
    ('int4', 32, 49152, 2048): (32, 64, 128, 1, 4, True, 3),
    ('int4', 64, 3072, 2048): (64, 64, 128, 4, 4, True, 3),
    ('int4', 64, 2048, 2048): (64, 32, 128, 4, 4, True, 4),
    ('int4', 64, 16384, 2048): (64, 64, 128, 1, 4, True, 3),
    ('int4', 64, 2048, 8192): (64, 64, 128, 8, 4, True, 3),
    ('int4', 64, 49152, 2048): (64, 128, 64, 1, 4, True, 4),
}


@triton.jit
def nibbles(codes):
    """Bytes of two 4-bit codes (int32) -> (low, high) as the floats 2^23 + q: OR-ing the code into the
    mantissa of 2^23 (no int->float conversion); subtracting 2^23 + zero point then gives q - zero, exact."""
    return (((codes & 0xF) | 0x4B000000).to(tl.float32, bitcast=True),
            ((codes >> 4) | 0x4B000000).to(tl.float32, bitcast=True))


@triton.jit
def int4_tile(q_ptr, scale_ptr, zero_ptr, offset_ptr, n, n_ok, k0, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, HAS_OFFSET: tl.constexpr, MASK_K: tl.constexpr):
    """W[n, k0:k0 + BLOCK_K] in fp32 as (even inputs, odd inputs), each (BLOCK_N, BLOCK_K/2). GROUP divides
    BLOCK_K and K; MASK_K: inputs past K (a tile wider than K) read as zeros."""
    groups = K // GROUP
    # Byte j holds inputs 2j (low nibble) and 2j + 1 (high). GROUP (>= 32) divides K and BLOCK_K divides k0,
    # so rows and tiles start 16-byte aligned: said explicitly, or the compiler, losing it through the
    # division, loads one byte per instruction instead of 16.
    row_bytes = tl.multiple_of(K // 2, 16)
    pair = tl.multiple_of(k0 // 2, 16) + tl.arange(0, BLOCK_K // 2)
    ok = n_ok[:, None]
    if MASK_K:
        ok = ok & (pair < row_bytes)[None, :]
    packed = tl.load(q_ptr + n[:, None] * row_bytes + pair[None, :], mask=ok, other=0).to(tl.int32)
    low, high = nibbles(packed)  # 2^23 + q, (BLOCK_N, BLOCK_K/2) each
    g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    meta = n[:, None] * groups + g[None, :]  # (BLOCK_N, BLOCK_K/GROUP)
    meta_ok = n_ok[:, None]
    if MASK_K:
        meta_ok = meta_ok & (g < groups)[None, :]
    scale = tl.load(scale_ptr + meta, mask=meta_ok, other=0.0).to(tl.float32)[:, :, None]
    zero = (tl.load(zero_ptr + meta, mask=meta_ok, other=0).to(tl.float32) + MAGIC)[:, :, None]
    low = tl.reshape(low, (BLOCK_N, BLOCK_K // GROUP, GROUP // 2)) - zero  # q - z, exact
    high = tl.reshape(high, (BLOCK_N, BLOCK_K // GROUP, GROUP // 2)) - zero
    if HAS_OFFSET:
        offset = tl.load(offset_ptr + meta, mask=meta_ok, other=0.0).to(tl.float32)[:, :, None]
        low, high = low * scale + offset, high * scale + offset
    else:
        low, high = low * scale, high * scale
    return tl.reshape(low, (BLOCK_N, BLOCK_K // 2)), tl.reshape(high, (BLOCK_N, BLOCK_K // 2))


@triton.jit(do_not_specialize=[ROWS_NOT_SPECIALIZED])
def _int4_matmul(x_ptr, q_ptr, scale_ptr, zero_ptr, offset_ptr, out_ptr, M, N, K,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPLIT_K: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """The broadcast (GEMV) form. x (M, K), q (N, K/2) uint8, scale/zero/offset (N, K/GROUP); out (M, N) in
    x's dtype, or with SPLIT_K > 1 (SPLIT_K, M, N) fp32 partial sums. BLOCK_K * SPLIT_K divides K."""
    m, m_ok, n, n_ok, split = output_tile(M, N, BLOCK_M, BLOCK_N)
    k_per_split = K // SPLIT_K
    half = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(split * k_per_split, (split + 1) * k_per_split, BLOCK_K):
        w_even, w_odd = int4_tile(q_ptr, scale_ptr, zero_ptr, offset_ptr, n, n_ok, k0, K, GROUP, BLOCK_N, BLOCK_K,
                                  HAS_OFFSET, False)  # (BLOCK_N, BLOCK_K/2) each
        pair = k0 // 2 + half
        # One row of x at a time against the 2-D tile: a broadcast over a third (row) axis makes the
        # compiler move the whole weight tile through shared memory into that axis' layout each step.
        for r in tl.static_range(BLOCK_M):
            row = tl.program_id(1) * BLOCK_M + r
            x_even = tl.load(x_ptr + row * K + 2 * pair, mask=row < M, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + row * K + 2 * pair + 1, mask=row < M, other=0.0).to(tl.float32)
            part = tl.sum(x_even[None, :] * w_even + x_odd[None, :] * w_odd, axis=1)  # (BLOCK_N,)
            acc += tl.where(tl.arange(0, BLOCK_M)[:, None] == r, part[None, :], 0.0)
    store_tile(out_ptr, acc, m, m_ok, n, n_ok, split, M, N, SPLIT_K)


@triton.jit(do_not_specialize=[ROWS_NOT_SPECIALIZED])
def _int4_dot_matmul(x_ptr, q_ptr, scale_ptr, zero_ptr, offset_ptr, out_ptr, M, N, K,
                     GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, HAS_OFFSET: tl.constexpr, STAGES: tl.constexpr):
    """The tensor-core form (16-64 rows), same arguments as _int4_matmul. Each k-step multiplies two
    (BLOCK_M, BLOCK_K/2) x (BLOCK_K/2, BLOCK_N) products, the even inputs' and the odd ones', on int4_tile's
    (BLOCK_N, BLOCK_K/2) tiles as the broadcast form reads them: the codes as they lie, a byte's low nibble
    the even input's weight, so nothing is interleaved, gathered or reshaped between the load and the tensor
    cores. x's even and odd inputs: for 16-bit activations each 32-bit word of x holds one of each, split in
    registers; 32-bit ones are read with stride 2.

    This form replaced one that multiplied a group at a time (a (GROUP/2, BLOCK_N) tile of codes read
    transposed, 16-deep dots): compiled for sm_90, that one stored each dequantized tile to shared memory
    with scalar 16-bit stores and waited on every wgmma, this one stores 16-byte vectors and waits twice a
    k-step. On an H100 (2026-12-07), the kernel alone at 16 / 64 rows: gate_up 29.1 / 38.7 -> 22.7 / 29.2 us,
    lm_head 68.7 / 92.6 -> 53.9 / 65.4; the 1B-class int4 step (benchmarks/profile_decode.py --quantization
    int4 --context 192) at 16 / 32 / 64 rows 1.40 / 1.54 / 2.04 -> 1.20 / 1.39 / 1.77 ms on TILES swept for
    the old form, and 1.14 / 1.30 / 1.48 ms on TILES swept for this one. (Swapping the operands, out^T = W x^T
    with the weight as wgmma's register operand, measured 10-35% slower on an H200.)"""
    act = x_ptr.dtype.element_ty
    PAIRS: tl.constexpr = act.primitive_bitwidth == 16
    m, m_ok, n, n_ok, split = output_tile(M, N, BLOCK_M, BLOCK_N)
    pairs_ptr = x_ptr.to(tl.pointer_type(tl.int32))  # x (M, K) as (M, K/2) pairs: input 2i low, 2i + 1 high
    pair = tl.arange(0, BLOCK_K // 2)
    k_per_split = K // SPLIT_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in tl.range(split * k_per_split, (split + 1) * k_per_split, BLOCK_K, num_stages=STAGES):
        # The tile's codes as they lie (BLOCK_K/2 bytes a row) and x's pairs as they lie (BLOCK_K/2 words a row):
        # the even inputs are the codes' low nibbles and the pairs' low halves, the odd ones the high.
        w_even, w_odd = int4_tile(q_ptr, scale_ptr, zero_ptr, offset_ptr, n, n_ok, k0, K, GROUP, BLOCK_N, BLOCK_K,
                                  HAS_OFFSET, False)  # (BLOCK_N, BLOCK_K/2) each
        if PAIRS:
            pairs = tl.load(pairs_ptr + m[:, None] * (K // 2) + (tl.multiple_of(k0 // 2, 16) + pair)[None, :],
                            mask=m_ok[:, None], other=0)  # (BLOCK_M, BLOCK_K/2)
            x_even = (pairs & 0xFFFF).to(tl.int16).to(act, bitcast=True)
            x_odd = (pairs >> 16).to(tl.int16).to(act, bitcast=True)
        else:  # 32-bit activations
            even = x_ptr + m[:, None] * K + 2 * (k0 // 2 + pair)[None, :]
            x_even = tl.load(even, mask=m_ok[:, None], other=0.0)
            x_odd = tl.load(even + 1, mask=m_ok[:, None], other=0.0)
        acc = tl.dot(x_even, tl.trans(w_even.to(act)), acc)
        acc = tl.dot(x_odd, tl.trans(w_odd.to(act)), acc)
    store_tile(out_ptr, acc, m, m_ok, n, n_ok, split, M, N, SPLIT_K)


@triton.jit
def _int4_dequantize(q_ptr, scale_ptr, zero_ptr, offset_ptr, out_ptr, N, K, GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_OFFSET: tl.constexpr):
    # out (N, K) in the activation dtype; BLOCK_K divides K.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k0 = tl.program_id(1) * BLOCK_K
    w_even, w_odd = int4_tile(q_ptr, scale_ptr, zero_ptr, offset_ptr, n, n_ok, k0, K, GROUP, BLOCK_N, BLOCK_K,
                              HAS_OFFSET, False)
    out = out_ptr + n[:, None] * K + k0 + 2 * tl.arange(0, BLOCK_K // 2)[None, :]
    tl.store(out, w_even.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])
    tl.store(out + 1, w_odd.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


def _widest_block_k(k: int, group: int, limit: int) -> int:
    """The largest power-of-two multiple of `group` up to `limit` that divides k."""
    block_k = group
    while block_k * 2 <= limit and k % (block_k * 2) == 0:
        block_k *= 2
    return block_k


def heuristic_tile(m: int, n: int, k: int, group: int) -> Tile:
    """The tile for a shape the sweep has not measured. Broadcast (<= BROADCAST_ROWS rows): as
    kernels/skinny_matmul.py's H200 sweep found, long tiles along K and ~512+ programs to keep every SM
    streaming. Dot: 16-64 rows x 64 outputs x 128 inputs a stage (the usual W4A16 decode tile), split along
    K until there is a program per SM of an H200 (132 SMs)."""
    if m <= BROADCAST_ROWS:
        block_m = triton.next_power_of_2(m)
        block_k = _widest_block_k(k, group, 1024)
        block_n = max(1, min(8192 // (block_m * block_k), n // 512))
        block_n = 1 << (block_n.bit_length() - 1)
        return Tile(block_m, block_n, block_k, 1, 1 if block_m * block_n * block_k <= 4096 else 4, False)
    block_m, block_n = min(64, max(16, triton.next_power_of_2(m))), 64
    block_k = _widest_block_k(k, group, 128)
    return Tile(block_m, block_n, block_k, split_k_for(n, k, block_n, block_k), 4, True, 3)


def split_k_for(n: int, k: int, block_n: int, block_k: int, programs: int = 132) -> int:
    """The least power-of-two split of K that gives `programs` programs (an H200's SMs), as far as K divides."""
    split = 1
    while triton.cdiv(n, block_n) * split < programs and k % (block_k * split * 2) == 0:
        split *= 2
    return split


def int4_matmul_with(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                     offset: torch.Tensor | None, group_size: int, tile: Tile) -> torch.Tensor:
    """int4_matmul under a given tile (the benchmark's sweep; the op picks its own)."""
    m, k = x.shape
    n = qweight.shape[0]
    if k % (tile.block_k * tile.split_k) or tile.block_k % group_size:
        raise ValueError(f"tile {tile} does not fit K = {k} in groups of {group_size}")
    if tile.dot and tile.block_m < 16:
        raise ValueError(f"tile {tile}: tl.dot needs tiles of >= 16 rows")
    x = x.contiguous()
    out = output_buffer(m, n, x.dtype, tile.split_k, x.device)
    grid = (triton.cdiv(n, tile.block_n), triton.cdiv(m, tile.block_m), tile.split_k)
    args = (x, qweight, scale, zero_point, offset if offset is not None else scale, out, m, n, k)
    shape = dict(GROUP=group_size, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                 SPLIT_K=tile.split_k, HAS_OFFSET=offset is not None, num_warps=tile.warps)
    if tile.dot:
        _int4_dot_matmul[grid](*args, **shape, STAGES=tile.stages)
    else:
        _int4_matmul[grid](*args, **shape)
    return finished(out, x.dtype)


# An operator (kernels/direct_op.py): torch.compile (the runner compiles each layer's work around attention,
# fullgraph) sees one opaque call with a known output shape instead of tracing the launch code over symbolic shapes.
@direct_op
def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                offset: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """x (M, K), M <= MAX_ROWS -> (M, N) in x's dtype; the weight in models/int4.py's layout."""
    m, k = x.shape
    n = qweight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"int4_matmul serves at most {MAX_ROWS} rows (decode batches), got {m}")
    if k % group_size or qweight.shape[1] * 2 != k:
        raise ValueError(f"x has {k} inputs, the weight {qweight.shape[1] * 2} in groups of {group_size}")
    tile = lookup(TILES, "int4", m, n, k) or heuristic_tile(m, n, k, group_size)
    return int4_matmul_with(x, qweight, scale, zero_point, offset, group_size, tile)


@torch.library.register_fake(int4_matmul)
def _(x, qweight, scale, zero_point, offset, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0])


@direct_op
def int4_dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    offset: torch.Tensor | None, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight (N, K) in `dtype`, written once: prefill's operand for cuBLAS (no fp32 temporaries)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    block_n, block_k = 16, _widest_block_k(k, group_size, 256)
    _int4_dequantize[(triton.cdiv(n, block_n), k // block_k)](
        qweight, scale, zero_point, offset if offset is not None else scale, out, n, k, GROUP=group_size,
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_OFFSET=offset is not None, num_warps=4)
    return out


@torch.library.register_fake(int4_dequantize)
def _(qweight, scale, zero_point, offset, group_size, dtype):
    return qweight.new_empty(qweight.shape[0], qweight.shape[1] * 2, dtype=dtype)
