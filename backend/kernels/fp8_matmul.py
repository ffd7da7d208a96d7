"""FP8 (e4m3) W8A8 matmul for decode batches in Triton: y = (xq wq^T) * x_scale * w_scale.

models/fp8.py's layers run `torch._scaled_mm` (cuBLASLt). At a few rows that is the wrong tool: its
fp8 GEMM tiles are 64+ rows tall and, at N = K = 2048, launch far fewer CTAs than an H200 has SMs, so a
batch-1 step spent more time in it than bf16 spent in its GEMV (issue #15: 1.76x bf16). This kernel is
the decode form vLLM and TensorRT-LLM switch to at small M: weight-streaming tiles sized for the GPU,
with the same numerics (e4m3 x e4m3 products, exact in fp32; fp32 sums; the scales in the epilogue):
  broadcast  fp32 multiply-sum on CUDA cores, long narrow tiles (1-8 rows)
  dot        tl.dot on fp8 tensor cores (Hopper/Ada), 16-64 rows
and split-K (SPLIT_K programs share an output tile along K; split_k.add_planes adds their fp32 partial sums) so
that a narrow N still fills the SMs. x arrives quantized per token by kernels/fp8_quant.py. Which form
and tile, and from how many rows cuBLASLt wins, is read from TILES (benchmarks/quant_kernels_bench.py
--device cuda measures it); never autotuned, so the choice is fixed before CUDA-graph capture.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels import pdl, split_k
from kvtriton.backend.kernels.direct_op import direct_op
from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait
from kvtriton.backend.kernels.split_k import finished, k_bounds, output_buffer, output_tile, row_tile, store_tile
from kvtriton.backend.kernels.tile_config import BROADCAST_ROWS, ROWS_NOT_SPECIALIZED, Tile, buckets_between, measured

MAX_ROWS = 64  # the decode batch sizes this kernel may serve
TRITON_ROWS = 8  # unmeasured default: up to here this kernel, above it _scaled_mm
CUBLAS = (0, 0, 0)  # a TILES value meaning "torch._scaled_mm is faster here"

# ("fp8", rows bucket, N, K) -> Tile fields, or CUBLAS; printed by benchmarks/quant_kernels_bench.py --device
# cuda from an H200 sweep. N is the weight's padded row count (a multiple of 16). Empty: `heuristic_tile`.
# Measured on an NVIDIA H200 (torch 2.11, triton 3.6) by benchmarks/quant_kernels_bench.py --device cuda
# --rows 1,2,4,16,64; rows 16-64 again (--rows 16,32,64, 2026-12-03) with pipeline depths and split-K among the
# candidates (7 fields). The 64-row qkv and o_proj tiles (32 outputs by 256 inputs, split-K 1, 4 stages) came from a
# wider sweep on the H200 (2026-12-05: 5.2 and 4.9 us against 8.4 and 8.2 for the earlier tiles; the fp8 1B-class
# step at batch 64 1.136 -> 1.029 ms, benchmarks/profile_decode.py --quantization fp8 --batch 64, alternated twice).
# On an H100 (2026-12-07): the 8-row bucket, missing until then, with --rows 8 (batch 5-8 had taken the GEMV
# heuristic: the step at batch 8 3.43 -> 0.83 ms), and the 4-row qkv and o_proj with --rows 2,4, cut after those two
# (batch 4 0.995 -> 0.918 ms; profile_decode.py --quantization fp8 --batch 4,8,16 --context 192, one run each).
TILES: dict[tuple[str, int, int, int], tuple] = {
    ('fp8', 1, 2048, 2048): (1, 2, 2048, 1, 1, False),
    ('fp8', 1, 2048, 8192): (1, 2, 2048, 1, 1, False),
    ('fp8', 1, 3072, 2048): (1, 2, 2048, 1, 1, False),
    ('fp8', 1, 16384, 2048): (1, 2, 2048, 1, 1, False),
    ('fp8', 1, 49152, 2048): (16, 64, 128, 1, 4, True),
    ('fp8', 2, 2048, 2048): (2, 2, 2048, 1, 1, False),
    ('fp8', 2, 2048, 8192): (2, 2, 2048, 1, 1, False),
    ('fp8', 2, 3072, 2048): (2, 2, 2048, 1, 1, False),
    ('fp8', 2, 16384, 2048): (16, 64, 128, 1, 4, True),
    ('fp8', 2, 49152, 2048): (16, 64, 128, 1, 4, True),
    ('fp8', 4, 2048, 2048): (16, 32, 256, 1, 4, True, 4),
    ('fp8', 4, 2048, 8192): (16, 32, 256, 4, 4, True),
    ('fp8', 4, 3072, 2048): (16, 32, 256, 1, 4, True, 4),
    ('fp8', 4, 16384, 2048): (16, 64, 128, 1, 4, True),
    ('fp8', 4, 49152, 2048): (16, 64, 128, 1, 4, True),
    ('fp8', 8, 3072, 2048): (16, 32, 256, 1, 4, True, 4),
    ('fp8', 8, 2048, 2048): (16, 32, 128, 2, 4, True, 3),
    ('fp8', 8, 16384, 2048): (16, 128, 128, 1, 4, True, 4),
    ('fp8', 8, 2048, 8192): (16, 64, 256, 8, 4, True, 3),
    ('fp8', 8, 49152, 2048): (16, 128, 256, 1, 4, True, 3),
    ('fp8', 16, 2048, 2048): (16, 32, 128, 4, 4, True, 4),
    ('fp8', 16, 2048, 8192): (16, 64, 128, 8, 4, True, 4),
    ('fp8', 16, 3072, 2048): (16, 64, 256, 2, 8, True, 3),
    ('fp8', 16, 16384, 2048): (16, 64, 256, 1, 4, True, 3),
    ('fp8', 16, 49152, 2048): (16, 128, 256, 1, 4, True, 3),
    # The 32-row bucket re-swept on an H100 (2026-12-07, --rows 16,32,64 --formats fp8): its qkv had been CUBLAS,
    # whose _scaled_mm breaks the PDL chain and attention's early start; the fp8 step at 32 rows 1.114-1.120 ->
    # 1.012-1.017 ms (profile_decode.py --quantization fp8 --batch 16,32,64, alternated twice; 16 and 64 rows
    # within 1% on the sweep's tiles, kept).
    ('fp8', 32, 2048, 2048): (32, 64, 256, 2, 8, True, 3),
    ('fp8', 32, 2048, 8192): (32, 64, 256, 8, 4, True, 5),
    ('fp8', 32, 3072, 2048): (32, 64, 256, 2, 8, True, 3),
    ('fp8', 32, 16384, 2048): (32, 128, 256, 1, 4, True, 4),
    ('fp8', 32, 49152, 2048): (32, 32, 256, 1, 4, True, 3),
    ('fp8', 64, 2048, 2048): (64, 32, 256, 1, 4, True, 4),
    ('fp8', 64, 2048, 8192): (64, 32, 256, 4, 4, True, 3),
    ('fp8', 64, 3072, 2048): (64, 32, 256, 1, 4, True, 4),
    ('fp8', 64, 16384, 2048): (64, 64, 256, 1, 4, True, 3),
    ('fp8', 64, 49152, 2048): (64, 64, 128, 1, 4, True, 4),
}


@triton.jit(do_not_specialize=[ROWS_NOT_SPECIALIZED])
def _fp8_matmul(xq_ptr, xs_ptr, w_ptr, ws_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
                PDL: tl.constexpr, WAIT: tl.constexpr, FP32_DOT: tl.constexpr, PLANES: tl.constexpr):
    # xq (M, K) e4m3, xs (M, 1) fp32, w (N, K) e4m3, ws (1, N) fp32; out (M, N), or with SPLIT_K > 1
    # (SPLIT_K, M, N) fp32 partial sums (already scaled: the scales are the same for every split).
    # PLANES > SPLIT_K: out is (PLANES, M, N) fp32 partial sums whatever SPLIT_K (fp8_matmul_planes), the planes past
    # SPLIT_K zeros.
    if PDL:  # the attention kernel after a qkv projection launches now and streams its K/V (kernels/pdl_matmul.py)
        gdc_launch_dependents()
    if WAIT:  # launched with PDL itself (kernels/pdl.py CHAIN): resident before the kernel that makes xq has ended
        gdc_wait()
    m, m_ok, n, n_ok, split = output_tile(M, N, BLOCK_M, BLOCK_N)
    first, end = k_bounds(K, split, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(first, end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = row_tile(w_ptr, n, n_ok, k, k_ok, K, EVEN_K)  # (BLOCK_N, BLOCK_K)
        if USE_DOT:
            xq = row_tile(xq_ptr, m, m_ok, k, k_ok, K, False)  # (BLOCK_M, BLOCK_K); masked along K as measured
            if FP32_DOT:  # Triton's CPU interpreter has no fp8 tl.dot; e4m3 values are exact in fp32
                xq, w = xq.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(xq, tl.trans(w), acc)  # (BLOCK_M, BLOCK_K) x (BLOCK_K, BLOCK_N), fp8 tensor cores
        else:  # one row at a time against the 2-D tile (a row axis would move the tile through shared memory)
            wf = w.to(tl.float32)
            for r in tl.static_range(BLOCK_M):
                row = tl.program_id(1) * BLOCK_M + r
                x_row = tl.load(xq_ptr + row * K + k, mask=k_ok & (row < M), other=0.0).to(tl.float32)
                acc += tl.where(tl.arange(0, BLOCK_M)[:, None] == r, tl.sum(x_row[None, :] * wf, axis=1)[None, :], 0.0)
    x_scale = tl.load(xs_ptr + m, mask=m_ok, other=0.0)
    w_scale = tl.load(ws_ptr + n, mask=n_ok, other=0.0)
    acc = acc * x_scale[:, None] * w_scale[None, :]
    store_tile(out_ptr, acc, m, m_ok, n, n_ok, split, M, N, SPLIT_K)
    if PLANES > SPLIT_K:
        split_k.zero_planes(out_ptr, m, m_ok, n, n_ok, split, M, N, SPLIT_K, PLANES)


def heuristic_tile(m: int, n: int, k: int) -> Tile | None:
    """Unmeasured shapes: this kernel up to TRITON_ROWS rows; above, None: cuBLASLt. Up to BROADCAST_ROWS rows a
    GEMV with kernels/skinny_matmul.py's H200 shape (long tiles along K, ~512+ programs); past it a 16-row
    tensor-core tile, the shape every measured 4- and 8-row entry took."""
    if m > TRITON_ROWS:
        return None
    if m > BROADCAST_ROWS:
        return Tile(16, 64, 128, 1, 4, True)
    block_m = triton.next_power_of_2(m)
    block_k = min(1024, triton.next_power_of_2(k))
    block_n = max(1, min(8192 // (block_m * block_k), n // 512))
    block_n = 1 << (block_n.bit_length() - 1)
    return Tile(block_m, block_n, block_k, 1, 1 if block_m * block_n * block_k <= 4096 else 4, False)


def fp8_tile(m: int, n: int, k: int) -> Tile | None:
    """This kernel's tile for an (m, n, k) call, or None where _scaled_mm serves it."""
    if m > MAX_ROWS:
        return None
    found = measured(TILES, "fp8", m, n, k)
    if found is not None:
        return None if tuple(found) == CUBLAS else Tile(*found)
    return heuristic_tile(m, n, k)


def fp8_matmul_with(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    out_dtype: torch.dtype, tile: Tile, planes: int = 0) -> torch.Tensor:
    """xq (M, K) e4m3, x_scale (M, 1) fp32, weight (N, K) e4m3, weight_scale (1, N) fp32 -> (M, N) out_dtype.
    planes (at least the tile's split): -> (planes, M, N) fp32, partial sums whose sum is the product, not added
    here."""
    m, k = xq.shape
    n = weight.shape[0]
    if tile.dot and (tile.block_m < 16 or tile.block_k < 32):
        raise ValueError(f"tile {tile}: fp8 tl.dot needs tiles of >= 16 rows and >= 32 inputs")
    out = output_buffer(m, n, out_dtype, tile.split_k, xq.device, planes)
    grid = (triton.cdiv(n, tile.block_n), triton.cdiv(m, tile.block_m), tile.split_k)
    chained = pdl.in_chain(xq.device)
    _fp8_matmul[grid](xq, x_scale, weight, weight_scale, out, m, n, k, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                      BLOCK_K=tile.block_k, SPLIT_K=tile.split_k, USE_DOT=tile.dot,
                      EVEN_K=k % (tile.block_k * tile.split_k) == 0,
                      PDL=pdl.EARLY_ATTENTION and pdl.pdl_supported(xq.device), WAIT=chained,
                      FP32_DOT=xq.device.type != "cuda", PLANES=planes or tile.split_k, num_warps=tile.warps,
                      num_stages=tile.stages, **pdl.launch_options(chained))
    return out if planes else finished(out, out_dtype)


# An operator (kernels/direct_op.py), like kernels/fp8_quant.py's: torch.compile (fullgraph, over a layer's work,
# with symbolic row counts) sees one opaque call, and the choice between this kernel and cuBLASLt by row count
# happens in here, at run time, instead of as shape guards (one recompilation per rows bucket) in the compiled
# graph.
@direct_op
def fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """xq (M, K) e4m3, x_scale (M, 1) fp32, weight (N, K) e4m3 (N % 16 == 0), weight_scale (1, N) fp32 -> (M, N):
    this kernel at its table's tile, or torch._scaled_mm where the table says cuBLASLt is faster."""
    tile = fp8_tile(xq.shape[0], weight.shape[0], xq.shape[1])
    if tile is None:
        return torch._scaled_mm(xq, weight.T, scale_a=x_scale, scale_b=weight_scale, out_dtype=out_dtype)
    return fp8_matmul_with(xq.contiguous(), x_scale, weight, weight_scale, out_dtype, tile)


@torch.library.register_fake(fp8_matmul)
def _(xq, x_scale, weight, weight_scale, out_dtype):
    return xq.new_empty(xq.shape[0], weight.shape[0], dtype=out_dtype)


# Whether fp8 down projections hand their split-K partial sums to the compiled residual add + RMSNorm after them
# (`fp8_matmul_planes`, models/llama.py planes_sum) at PLANES_MIN_ROWS to MAX_ROWS rows, as kernels/pdl_matmul.py's
# PLANES_INTO_NORM does for bf16, so that split_k's add launch (one a layer: o_proj's 64-row tile does not split)
# is gone. Only the 64-row bucket, whose down_proj tile splits K in four (16 and 32 rows split in eight): one
# count of planes for every step the compiled graph serves. Not yet measured on a GPU:
# benchmarks/profile_decode.py --fp8-planes-into-norm on|off.
PLANES_INTO_NORM = False
PLANES_MIN_ROWS = 33


def planes_for(n: int, k: int) -> int:
    """The planes an (n, k) projection hands on at PLANES_MIN_ROWS to MAX_ROWS rows: its tile's split there, or 1
    (nothing to hand on) where cuBLASLt serves it."""
    tiles = [fp8_tile(rows, n, k) for rows in buckets_between(PLANES_MIN_ROWS, MAX_ROWS)]
    return max(1 if tile is None else tile.split_k for tile in tiles)


@direct_op
def fp8_matmul_planes(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                      planes: int) -> torch.Tensor:
    """fp8_matmul as (planes, M, N) fp32 partial sums, for the caller to add in plane order (models/llama.py
    planes_sum): this kernel where its tile splits K into at most `planes`, the planes past its split zeros;
    otherwise the whole product in plane 0 and zeros."""
    tile = fp8_tile(xq.shape[0], weight.shape[0], xq.shape[1])
    if tile is None or tile.split_k > planes:
        out = xq.new_zeros(planes, xq.shape[0], weight.shape[0], dtype=torch.float32)
        out[0] = fp8_matmul(xq, x_scale, weight, weight_scale, torch.float32)
        return out
    return fp8_matmul_with(xq.contiguous(), x_scale, weight, weight_scale, torch.float32, tile, planes=planes)


@torch.library.register_fake(fp8_matmul_planes)
def _(xq, x_scale, weight, weight_scale, planes):
    return xq.new_empty(planes, xq.shape[0], weight.shape[0], dtype=torch.float32)
