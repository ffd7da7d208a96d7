"""The qkv projection of a decode batch (3-64 rows) as a Triton matmul that lets the attention kernel launch at
its start (programmatic dependent launch, kernels/pdl.py).

The paged decode attention kernel loads its first tile of past K/V before it waits for q, k and v
(kernels/paged_decode_attention.py): at short contexts that is most of what it reads. It can only do so while
the projection before it runs if that projection lets it launch early, and cuBLAS's kernels do not: in the
64-row step the attention kernel took 17.6 us a layer after cuBLAS's qkv GEMM ended (H100, 192-token contexts,
benchmarks/profile_decode.py --profile), against 11.6 us a launch when attention kernels follow each other
(benchmarks/paged_attention_bench.py), where each one's loads overlap the previous one. So the qkv GEMM of
decode batches runs here, with the same tensor-core tiles a cuBLAS kernel uses, and triggers its dependents
first. Its numbers: bf16 products summed in fp32 along K in tl.dot's order, rounded once (cuBLAS sums in
another order: the last bits differ, as between cuBLAS's own kernels at different batch sizes).

With CHAIN (below) the layer's other 16-bit projections take it too, each launched with PDL itself: cuBLAS's
kernels neither start before the kernel ahead of them ends nor let the next start early, so at 64 rows a bf16
step has a launch gap at each of them that the fp8 step, on Triton kernels throughout, does not. A narrow
projection (o_proj, down_proj: 2,048 outputs) splits K across programs as the fp8 kernel does. The gate_up
projection then ends in the SwiGLU (`pdl_swiglu_linear`): each program multiplies x by a tile of the gate's rows
and the same tile of the up's, and stores silu(gate) * up, so the product is formed in registers and the MLP's
elementwise kernel (and half of gate_up's output) is gone, as TensorRT-LLM's gated-activation GEMM epilogue does.

Steps of more rows (prefill) keep cuBLAS. Never autotuned: a decode step's launch is fixed before CUDA-graph
capture (kernels/tile_config.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels import pdl
from kvtriton.backend.kernels.direct_op import direct_op
from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_supported
from kvtriton.backend.kernels.split_k import (
    finished,
    k_bounds,
    output_buffer,
    output_tile,
    row_tile,
    store_tile,
    zero_planes,
)
from kvtriton.backend.kernels.tile_config import ROWS_NOT_SPECIALIZED, Tile, buckets_between, lookup

MAX_ROWS = 64  # decode batches; more rows are a prefill's, where cuBLAS's large tiles win
SWIGLU_BLOCK = 1024  # outputs per program of _swiglu
# Whether a decode layer's other 16-bit projections (o_proj, gate_up_proj, down_proj) take this kernel too, every
# one of them launched in kernels/pdl.py's chain (resident while the kernel before it ends, waiting in-kernel for
# its x), where a cuBLAS kernel starts only once the kernel before it has ended and lets none start early; from
# CHAIN_MIN_ROWS rows, below 16 on the 16-row tiles with their rows masked (tile_for). On an H100 (2026-12-07,
# benchmarks/profile_decode.py --context 192) the 1B-class step with the chain from 9 rows on TILES below, against
# the chain from 33 rows on stop 63's 64-row tiles: 16 rows 1.127-1.128 ms against 1.195-1.201, 32 rows
# 1.211-1.216 against 1.270-1.275, 64 rows 1.312 against 1.341-1.347; then from 3 rows on the 16-row tiles against
# cuBLAS below 9 (stop 65): 4 rows 1.088 against 1.148 ms, 8 rows 1.107 against 1.170 (the heuristic tile had
# lost 8-10% there).
CHAIN = True
CHAIN_MIN_ROWS = 3
# Whether, with CHAIN, o_proj and down_proj (2,048 outputs at the 1B-class shapes, split along K) hand their fp32
# partial sums to the compiled residual add + RMSNorm after them (`pdl_linear_planes`), which adds them in plane
# order as split_k._add_planes does: that launch (~1.4 us on the 64-row step's critical path, two a layer) is gone.
# From PLANES_MIN_ROWS rows: on an H100 (stop 65, profile_decode.py --planes-into-norm off / on, alternated twice)
# 32 rows 1.228 -> 1.200 ms, 64 rows 1.319 -> 1.287-1.288; at 16 rows 1.154 -> 1.171, slower (its o_proj tile
# does not split, and fp32 planes are twice the bytes of its bf16 output), so the 16-row bucket keeps the adds.
PLANES_INTO_NORM = True
PLANES_MIN_ROWS = 17
# Whether, with CHAIN, the gate_up projection ends in the SwiGLU (pdl_swiglu_linear); benchmarks/profile_decode.py
# --bf16-swiglu on|off.
SWIGLU_EPILOGUE = True
# ("bf16", rows bucket, N, K) -> Tile fields; otherwise `heuristic_tile`. Swept on an H100 (2026-12-07,
# benchmarks/quant_kernels_bench.py --device cuda --rows 16,32,64 --formats bf16), each the fastest alone; against
# cuBLAS at 64 rows: gate_up 25.2 us (cuBLAS 25.7), down 15.5 (16.3), o_proj 6.4 (6.4), qkv 7.7 (7.4). At 16 and
# 32 rows o_proj and down lose alone (down 17.1 against 15.4 at 16 rows) and win in the step, by the launches they
# overlap. qkv keeps the heuristic tile at 16 and 32 rows: the sweep's fastest there splits K, and the split's
# _add_planes launch between qkv and attention takes away attention's early start (the step 1.203-1.207 ms at 16
# rows against 1.195-1.198 on the heuristic tile).
TILES: dict[tuple[str, int, int, int], tuple] = {
    ('bf16', 16, 2048, 2048): (16, 64, 128, 1, 4, True, 4),
    ('bf16', 16, 16384, 2048): (16, 128, 64, 1, 4, True, 4),
    ('bf16', 16, 2048, 8192): (16, 32, 128, 4, 4, True, 4),
    ('bf16', 32, 2048, 2048): (32, 32, 128, 4, 4, True, 4),
    ('bf16', 32, 16384, 2048): (32, 128, 128, 1, 8, True, 4),
    ('bf16', 32, 2048, 8192): (32, 32, 128, 4, 4, True, 4),
    ('bf16', 64, 3072, 2048): (64, 64, 128, 1, 4, True, 4),
    ('bf16', 64, 2048, 2048): (64, 32, 128, 4, 4, True, 4),
    ('bf16', 64, 16384, 2048): (64, 128, 128, 1, 4, True, 4),
    ('bf16', 64, 2048, 8192): (64, 32, 128, 4, 4, True, 4),
    # gate_up ending in the SwiGLU, N its outputs (the intermediate size); a program streams 2 x block_n weight
    # rows, block_n of the gate's and the same of the up's.
    ('bf16-swiglu', 16, 8192, 2048): (16, 64, 64, 1, 4, True, 4),
    ('bf16-swiglu', 32, 8192, 2048): (32, 64, 128, 1, 4, True, 4),
    ('bf16-swiglu', 64, 8192, 2048): (64, 64, 128, 1, 4, True, 4),
}


@triton.jit(do_not_specialize=[ROWS_NOT_SPECIALIZED])
def _pdl_matmul(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                EVEN_K: tl.constexpr, PDL: tl.constexpr, WAIT: tl.constexpr, FP32_DOT: tl.constexpr,
                SWIGLU: tl.constexpr, PLANES: tl.constexpr):
    # x (M, K), w (N, K), bias (N,), out (M, N), all 16-bit, or with SPLIT_K > 1 (SPLIT_K, M, N) fp32 partial sums
    # (the bias in split 0's). PDL: the next kernel launches now; it waits for this one's completion before it
    # reads what this one writes (kernels/pdl.py's invariant). WAIT: launched with PDL itself (kernels/pdl.py
    # CHAIN), resident before the kernel that writes x has ended.
    # SWIGLU: w is (2N, K), the gate's N rows then the up's, and out = silu(x @ gate^T) * (x @ up^T), each product
    # rounded to out's dtype first, as an unfused gate_up's output is (then the SwiGLU in fp32, as the compiled
    # elementwise kernel computes it); SPLIT_K 1.
    # PLANES > SPLIT_K: out is (PLANES, M, N) fp32 partial sums whatever SPLIT_K (pdl_linear_planes), the planes past
    # SPLIT_K zeros.
    if PDL:
        gdc_launch_dependents()
    if WAIT:
        gdc_wait()
    m, m_ok, n, n_ok, split = output_tile(M, N, BLOCK_M, BLOCK_N)
    first, end = k_bounds(K, split, SPLIT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)  # SWIGLU's
    for k0 in range(first, end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        w = row_tile(w_ptr, n, n_ok, k, k_ok, K, EVEN_K)  # (BLOCK_N, BLOCK_K)
        x = row_tile(x_ptr, m, m_ok, k, k_ok, K, EVEN_K)  # (BLOCK_M, BLOCK_K)
        if FP32_DOT:  # Triton's CPU interpreter multiplies 16-bit tl.dot operands wrongly (triton 3.6)
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc)
        if SWIGLU:
            w_up = row_tile(w_ptr, N + n, n_ok, k, k_ok, K, EVEN_K)
            if FP32_DOT:
                w_up = w_up.to(tl.float32)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up)
    if SWIGLU:
        gate = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        acc = gate * tl.sigmoid(gate) * acc_up.to(out_ptr.dtype.element_ty).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok & (split == 0), other=0.0).to(tl.float32)[None, :]
    store_tile(out_ptr, acc, m, m_ok, n, n_ok, split, M, N, SPLIT_K)
    if PLANES > SPLIT_K:
        zero_planes(out_ptr, m, m_ok, n, n_ok, split, M, N, SPLIT_K, PLANES)


def heuristic_tile(m: int) -> Tile:
    """Shapes TILES lacks: all of a decode batch's rows in one tile (16-64), 32 outputs by 128
    inputs, as the bf16 64-row sweep of 2026-12-05 found best for qkv (6.9 us against cuBLAS's 6.3 alone); 4
    pipeline stages. In the step it wins by what it lets attention overlap (H100, 2026-12-06: the 64-row step
    1.444 -> 1.409 ms, profile_decode.py --early-attention off / on; docs/performance-gpu.md)."""
    return Tile(max(16, triton.next_power_of_2(m)), 32, 128, 1, 4, True, 4)


def tile_for(form: str, m: int, n: int, k: int) -> Tile:
    """The tile of an (m, n, k) call of one form ("bf16", or "bf16-swiglu" with n its outputs): TILES' measured one
    for m's rows bucket (below 16 rows the 16-row bucket's, its rows masked), else the heuristic's."""
    return lookup(TILES, form, max(m, 16), n, k) or heuristic_tile(m)


def pdl_matmul_with(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: Tile,
                    swiglu: bool = False, planes: int = 0) -> torch.Tensor:
    """x (M, K) 16-bit, contiguous; weight (N, K) of its dtype -> (M, N): x @ weight^T (+ bias). swiglu: weight
    (2N, K), the gate's rows then the up's, no bias, no split -> silu(x @ gate^T) * (x @ up^T). planes (at least
    the tile's split): -> (planes, M, N) fp32, partial sums whose sum is the product, not added here."""
    m, k = x.shape
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if swiglu and (bias is not None or tile.split_k > 1):
        raise ValueError("the SwiGLU epilogue takes no bias and no split along K")
    if planes and swiglu:
        raise ValueError("the SwiGLU epilogue's product cannot be handed on as planes")
    grid = (triton.cdiv(n, tile.block_n), triton.cdiv(m, tile.block_m), tile.split_k)
    out = output_buffer(m, n, x.dtype, tile.split_k, x.device, planes)
    chained = CHAIN and pdl.in_chain(x.device)
    _pdl_matmul[grid](x, weight, bias if bias is not None else x, out, m, n, k,
                      HAS_BIAS=bias is not None, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
                      SPLIT_K=tile.split_k, EVEN_K=k % (tile.block_k * tile.split_k) == 0,
                      PDL=pdl_supported(x.device), WAIT=chained, FP32_DOT=x.device.type != "cuda", SWIGLU=swiglu,
                      PLANES=planes or tile.split_k, num_warps=tile.warps, num_stages=tile.stages,
                      **pdl.launch_options(chained))
    return out if planes else finished(out, x.dtype)


def serves(m: int, min_rows: int) -> bool:
    """Whether m rows take this kernel: min_rows (at least 3) to MAX_ROWS; other row counts keep cuBLAS."""
    return max(3, min_rows) <= m <= MAX_ROWS


# An operator (kernels/direct_op.py), as kernels/fp8_matmul.py's: the compiled per-layer function (symbolic row
# counts) sees one opaque call, and the choice between this kernel and cuBLAS by row count happens in here at run
# time.
@direct_op
def pdl_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, min_rows: int = 3) -> torch.Tensor:
    """x (M, K) @ weight^T (+ bias): this kernel for min_rows (3+) to MAX_ROWS rows, cuBLAS otherwise."""
    m = x.shape[0]
    if not serves(m, min_rows):
        return torch.nn.functional.linear(x, weight, bias)
    return pdl_matmul_with(x.contiguous(), weight, bias, tile_for("bf16", m, *weight.shape))


@torch.library.register_fake(pdl_linear)
def _(x, weight, bias, min_rows=3):
    return x.new_empty(x.shape[0], weight.shape[0])


def chain_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """CHAIN's projections (a layer's `decode_matmul`): this kernel from CHAIN_MIN_ROWS rows."""
    return pdl_linear(x, weight, bias, CHAIN_MIN_ROWS)


def planes_for(n: int, k: int, min_rows: int) -> int:
    """The planes a projection of n outputs and k inputs hands on (pdl_linear_planes) at min_rows to MAX_ROWS rows:
    the most any of those buckets' tiles split K into, so that every decode step of the compiled graph has one
    shape."""
    return max(tile_for("bf16", b, n, k).split_k for b in buckets_between(max(3, min_rows), MAX_ROWS))


@direct_op
def pdl_linear_planes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, min_rows: int,
                      planes: int) -> torch.Tensor:
    """x (M, K) @ weight^T (+ bias) as (planes, M, N) fp32 partial sums, for the caller to add in plane order
    (models/llama.py's planes_sum): this kernel for min_rows to MAX_ROWS rows, the planes past its tile's split
    zeros; otherwise cuBLAS's product in plane 0 and zeros."""
    m = x.shape[0]
    if not serves(m, min_rows):
        out = x.new_zeros(planes, m, weight.shape[0], dtype=torch.float32)
        out[0] = torch.nn.functional.linear(x, weight, bias)
        return out
    return pdl_matmul_with(x.contiguous(), weight, bias, tile_for("bf16", m, *weight.shape), planes=planes)


@torch.library.register_fake(pdl_linear_planes)
def _(x, weight, bias, min_rows, planes):
    return x.new_empty(planes, x.shape[0], weight.shape[0], dtype=torch.float32)


def planes_min_rows() -> int:
    """The fewest rows whose o_proj and down_proj hand on planes: PLANES_MIN_ROWS, and never below the chain's
    (the runner's delta_planes and chain_linear_planes both take it, so the planes' count is one)."""
    return max(3, CHAIN_MIN_ROWS, PLANES_MIN_ROWS)


def chain_linear_planes(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """PLANES_INTO_NORM's projections (a layer's `decode_planes`): (planes, M, N) fp32 partial sums from
    planes_min_rows() rows, planes_for the weight's shape."""
    min_rows = planes_min_rows()
    return pdl_linear_planes(x, weight, bias, min_rows, planes_for(*weight.shape, min_rows))


@triton.jit
def _swiglu(gate_up_ptr, out_ptr, I, BLOCK: tl.constexpr):
    # out[row, i] = silu(gate) * up, gate_up (M, 2I) the gate's I columns then the up's; in fp32, rounded once, as
    # the compiled MLP's elementwise kernel. Grid (M, I / BLOCK).
    row = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = i < I
    gate = tl.load(gate_up_ptr + row * 2 * I + i, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * I + I + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * I + i, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=ok)


@direct_op
def pdl_swiglu_linear(x: torch.Tensor, weight: torch.Tensor, min_rows: int = 3) -> torch.Tensor:
    """x (M, K), weight (2I, K) the gate's rows then the up's -> silu(x @ gate^T) * (x @ up^T) (M, I): this kernel's
    SwiGLU epilogue for min_rows (3+) to MAX_ROWS rows; otherwise cuBLAS, then the SwiGLU in one pass (_swiglu, as
    the compiled MLP's own kernel would: this op hides the product from the compiler)."""
    m = x.shape[0]
    if not serves(m, min_rows):
        gate_up = torch.nn.functional.linear(x, weight)
        out = gate_up.new_empty(m, weight.shape[0] // 2)
        _swiglu[(m, triton.cdiv(out.shape[1], SWIGLU_BLOCK))](gate_up, out, out.shape[1], BLOCK=SWIGLU_BLOCK)
        return out
    tile = tile_for("bf16-swiglu", m, weight.shape[0] // 2, weight.shape[1])
    return pdl_matmul_with(x.contiguous(), weight, None, tile, swiglu=True)


@torch.library.register_fake(pdl_swiglu_linear)
def _(x, weight, min_rows=3):
    return x.new_empty(x.shape[0], weight.shape[0] // 2)


def chain_swiglu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """CHAIN's gate_up ending in the SwiGLU (its `swiglu_matmul`): this kernel from CHAIN_MIN_ROWS rows."""
    return pdl_swiglu_linear(x, weight, CHAIN_MIN_ROWS)
