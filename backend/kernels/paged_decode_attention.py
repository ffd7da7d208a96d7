"""Paged decode attention (Triton): one new token per sequence attends to its whole context in place.

The PyTorch path gathers each sequence's blocks into a dense copy and calls
SDPA: several kernels and a full extra read and write of the context per
layer. This kernel reads K/V straight from the pools through the block table,
in one launch per layer, and also does the jobs around it: Qwen3's QK-norm and
RoPE on the new token's q and k (each optional: the caller may pass them
normalised and rotated) and storing its k and v at its slot.

Programs: (sequence, KV head, split). Each serves the GROUP query heads that
share its KV head (GQA), so each K/V tile is read once for all of them. The
past (context - 1 tokens) is cut into NUM_SPLITS chunks of whole BLOCK_T tiles,
one per split (flash-decoding): a small batch or a long context still puts
enough programs on the GPU to stream the KV cache at full bandwidth. Each split
streams its chunk with an online softmax; split 0 also stores the new token's
k/v and folds it in last from registers, so no program reads back what has
just been written. With more than one split, each writes its partial (running
max, sum, unnormalised output) and _combine_splits merges them; with one,
the kernel writes the output itself. A split's first tile is loaded before
waiting for the previous kernel (kernels/pdl.py): at short contexts that is
all of it.

The split count is fixed per launch (a CUDA graph fixes its grid), the chunk
length per sequence: a short context in a launch sized for long ones leaves
its later splits idle (they return at once), it does not spread thin.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels.attention_shapes import unsupported_shape
from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, pdl_supported
from kvtriton.backend.kernels.tile_config import multiprocessors

# The tile: (past tokens per tile, which is also the granule of a split's chunk; warps; pipeline stages).
# Launches of many (sequence, KV head) pairs stream long tiles with few warps: on an H200
# (benchmarks/paged_attention_bench.py --sweep, 32/8 heads of 64, KV read from HBM) batch 64 x 2048
# tokens took 69 us a layer (93% of the copy bandwidth) against 82 us with SMALL_TILE, and the 1B-class
# runner step (benchmarks/profile_decode.py) 2.23 against 2.43 ms; batch 16 x 2048, 1.43 against 1.51 ms.
# Small ones are latency-bound, split thin: batch 1 (32 splits of a 2048-token graph), 0.74 ms a step
# with SMALL_TILE against 0.79 ms with LARGE_TILE (16 splits). Batches 2-8 were measured with LARGE_TILE
# only (batch 2 and 4: 1.11 and 1.12 ms at 192 tokens); they take SMALL_TILE, like batch 1.
LARGE_TILE = (128, 2, 2)
SMALL_TILE = (64, 4, 3)
# A launch aims for up to this many warps of (sequence, KV head, split) programs per SM, in a power of two of
# splits: 4 programs of LARGE_TILE's 2 warps, 2 of SMALL_TILE's 4. Same sweep: batch 16 x 2048 tokens took 25
# us with 4 splits, 31 with 3, 72 with 1; batch 64 x 192 tokens, 11 us unsplit, 15 with 2 splits. The 1B-class
# runner step on an H200 (2026-12-04, graphs recaptured under each, alternated twice in one process), against a
# flat 4 programs an SM: SMALL_TILE batches at 2,048 tokens 1.021 -> 0.962 ms (batch 2), 1.201 -> 1.153 (4),
# 1.322 -> 1.273 (8), at 192 tokens within 1%; LARGE_TILE batches with 2 programs an SM lost (16 x 2,048: 1.372
# -> 1.423; 32 x 2,048: 1.657 -> 1.765); batch 1 unchanged (32 splits either way).
WARPS_PER_SM = 8
# Where an fp8 pool's e4m3 values widen to fp16 for the dots (benchmarks/paged_attention_bench.py
# --kv-cache-dtype fp8 measures both). True: in registers as they arrive from global memory, loaded as 16-bit
# pairs, so the fp16 tiles reach the tensor cores as bf16 pools' do (ldmatrix from shared memory). False: as
# Triton places the conversion by itself, at the dot operands: the e4m3 tiles staged in shared memory and read
# back a byte or two a load (ldmatrix has no 8-bit transposed form): in the sm_90 compile of the 128-token tile,
# 333 shared-memory loads against a bf16 pool's 47 + 88 ldmatrix (the pairs: 77 + 48). That form took 63.2 us a
# layer at batch 64 x 2,048 tokens on an H200 against 68.9 for bf16 pools, with half the bytes to read. On an
# H100 (2026-12-07, the kernel alone at its shipped tile, 64 x 2,048): registers 65.5 us, dot operands 69.6, bf16
# pools 95.8; the fp8 + fp8-KV step at batch 64 (profile_decode.py, alternated twice) 1.942 -> 1.818-1.825 ms at
# 2,048 tokens and 0.994 -> 0.955-0.965 at 192; batch 1 within 1%; outputs identical.
E4M3_WIDEN_IN_REGISTERS = True
MAX_SPLITS = 64  # measuring (benchmarks/profile_decode.py --max-splits) may lower it; 1 turns splitting off


@triton.jit
def _rotate(x1, x2, cos, sin, act: tl.constexpr):
    # HF rotate-half, computed in fp32 and rounded once, as models.rotary._rotate does.
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return (x1 * cos - x2 * sin).to(act), (x2 * cos + x1 * sin).to(act)


@triton.jit
def _rms_norm_head(x1, x2, w1, w2, eps, HEAD_DIM: tl.constexpr, act: tl.constexpr):
    # Qwen3's QK-norm over each head (rows of q, or k's one head), as models.llama.RMSNorm rounds it: normalised
    # in fp32, rounded to act, then times the weight (an act x act product, rounded).
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    ms = (tl.sum(x1 * x1, axis=-1, keep_dims=True) + tl.sum(x2 * x2, axis=-1, keep_dims=True)) / HEAD_DIM
    r = 1.0 / tl.sqrt(ms + eps)
    n1, n2 = (x1 * r).to(act).to(tl.float32), (x2 * r).to(act).to(tl.float32)
    return (w1 * n1).to(act), (w2 * n2).to(act)


@triton.jit
def _chunk(past, NUM_SPLITS: tl.constexpr, BLOCK_T: tl.constexpr):
    # Past tokens per split: whole tiles, so that a split never reads a partial tile it could have shared.
    return tl.cdiv(tl.cdiv(past, NUM_SPLITS), BLOCK_T) * BLOCK_T


@triton.jit
def _past_tile(k_pool, v_pool, tables_ptr, b, h, t0, end, stride_table, row_stride: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr, ACT: tl.constexpr,
               E4M3_PAIRS: tl.constexpr, PTX: tl.constexpr):
    # Tokens t0 .. t0 + BLOCK_T (those below end) read through the block table: k as two halves, v whole, as
    # the dots' operand type ACT (an fp8 pool's values widen here; with E4M3_PAIRS from 16-bit pairs).
    HALF: tl.constexpr = HEAD_DIM // 2
    t = t0 + tl.arange(0, BLOCK_T)
    t_ok = t < end
    block = tl.load(tables_ptr + b * stride_table + t // BLOCK_SIZE, mask=t_ok, other=0)
    rows = (block * BLOCK_SIZE + t % BLOCK_SIZE)[:, None] * row_stride + h * HEAD_DIM  # (BLOCK_T, 1)
    if E4M3_PAIRS:  # E4M3_WIDEN_IN_REGISTERS: rows and head offsets are even, so no pair straddles them
        k_pairs, v_pairs = k_pool.to(tl.pointer_type(tl.int16)), v_pool.to(tl.pointer_type(tl.int16))
        rows = rows // 2
        w = tl.arange(0, HALF // 2)
        k1 = tl.load(k_pairs + rows + w[None, :], mask=t_ok[:, None], other=0)  # (BLOCK_T, HALF / 2)
        k2 = tl.load(k_pairs + rows + HALF // 2 + w[None, :], mask=t_ok[:, None], other=0)
        v = tl.load(v_pairs + rows + tl.arange(0, HALF)[None, :], mask=t_ok[:, None], other=0)
        k1, k2 = _widen_e4m3_pairs(k1, BLOCK_T, HALF, PTX), _widen_e4m3_pairs(k2, BLOCK_T, HALF, PTX)
        v = _widen_e4m3_pairs(v, BLOCK_T, HEAD_DIM, PTX)
        return k1, k2, v, t_ok
    d = tl.arange(0, HALF)
    k1 = tl.load(k_pool + rows + d[None, :], mask=t_ok[:, None], other=0.0)  # (BLOCK_T, HALF)
    k2 = tl.load(k_pool + rows + HALF + d[None, :], mask=t_ok[:, None], other=0.0)
    v = tl.load(v_pool + rows + tl.arange(0, HEAD_DIM)[None, :], mask=t_ok[:, None], other=0.0)
    return k1.to(ACT), k2.to(ACT), v.to(ACT), t_ok


@triton.jit
def _widen_e4m3_pairs(pairs, ROWS: tl.constexpr, COLS: tl.constexpr, PTX: tl.constexpr):
    """(ROWS, COLS/2) int16, two e4m3 values each (the first in the low byte) -> (ROWS, COLS) fp16, exact. On
    CUDA (PTX) one cvt a pair, in inline PTX, which Triton does not move: a plain .to() it would place after
    shared memory, at the dot operands; Triton's interpreter, which runs no PTX, bitcasts each byte instead."""
    if PTX:
        first, second = tl.inline_asm_elementwise(
            "{ .reg .b32 t; cvt.rn.f16x2.e4m3x2 t, $2; mov.b32 {$0, $1}, t; }",
            "=h,=h,h", [pairs], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
    else:
        first = (pairs & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
        second = ((pairs >> 8) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float16)
    return tl.join(first, second).reshape(ROWS, COLS)


@triton.jit
def _softmax_update(q1, q2, k1, k2, v, t_ok, scale, m_i, l_i, acc):
    # Online softmax over one tile; a tile with no valid token leaves the state as it was (no NaN).
    s = (tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))) * scale  # (BLOCK_G, BLOCK_T) fp32
    s = tl.where(t_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


# A step's block-table width is its longest context's, so stride_table takes new values step after step; Triton
# specializes integer arguments (== 1, divisible by 16) and compiled a new variant mid-serving the first time a
# step's width crossed those classes (H200, the prefill kernel: 0.57 s at width 16, 0.89 s at width 1, after
# width 8). The stride only scales one load's address.
@triton.jit(do_not_specialize=["stride_table"])
def _paged_decode_attention(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, positions_ptr, k_pool, v_pool, slots_ptr,
                            tables_ptr, context_lens_ptr, out_ptr, part_ptr, stats_ptr, q_norm_ptr, k_norm_ptr,
                            scale, norm_eps, stride_q, stride_k, stride_v, stride_table,
                            NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                            NUM_SPLITS: tl.constexpr, ROPE: tl.constexpr, QK_NORM: tl.constexpr, PDL: tl.constexpr,
                            E4M3_PAIRS: tl.constexpr, PTX: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    act = q_ptr.dtype.element_ty
    kv_ty = k_pool.dtype.element_ty  # act, or fp8 e4m3
    # The dots' operand type: an fp8 pool widens to fp16, one hardware conversion per pair on sm89+ (to bf16 it
    # takes several); q and the probabilities in fp16 lose nothing a bf16 operand keeps (more mantissa bits).
    dot_ty: tl.constexpr = act if kv_ty == act else tl.float16
    row_stride: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
    # The past was written by earlier steps, not by the previous kernel: its first tile loads before the wait.
    past = tl.load(context_lens_ptr + b) - 1
    chunk = _chunk(past, NUM_SPLITS, BLOCK_T)
    start = split * chunk
    end = tl.minimum(past, start + chunk)
    if (split > 0) & (start >= past):  # nothing of this context is left for this split
        return
    pk1, pk2, pv, p_ok = _past_tile(k_pool, v_pool, tables_ptr, b, h, start, end, stride_table, row_stride,
                                    HEAD_DIM, BLOCK_SIZE, BLOCK_T, dot_ty, E4M3_PAIRS, PTX)
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HALF)  # q and k are handled as two halves: RoPE pairs dim i with i + HALF
    if ROPE:  # the step's positions and the model's tables: inputs, not the previous kernel's output
        position = tl.load(positions_ptr + b)
        cos = tl.load(cos_ptr + position * HALF + d)
        sin = tl.load(sin_ptr + position * HALF + d)
    if QK_NORM:  # the model's weights, not the previous kernel's output
        qw1, qw2 = tl.load(q_norm_ptr + d).to(tl.float32), tl.load(q_norm_ptr + HALF + d).to(tl.float32)
        kw1, kw2 = tl.load(k_norm_ptr + d).to(tl.float32), tl.load(k_norm_ptr + HALF + d).to(tl.float32)
    if PDL:  # see kernels/pdl.py: q, k, v are the previous kernel's output
        gdc_wait()

    dv = tl.arange(0, HEAD_DIM)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < GROUP
    heads = h * GROUP + g  # (BLOCK_G,) the query heads of KV head h
    q_rows = q_ptr + b * stride_q + heads[:, None] * HEAD_DIM
    q1 = tl.load(q_rows + d[None, :], mask=g_ok[:, None], other=0.0)  # (BLOCK_G, HALF)
    q2 = tl.load(q_rows + HALF + d[None, :], mask=g_ok[:, None], other=0.0)
    k_row = k_ptr + b * stride_k + h * HEAD_DIM
    k1 = tl.load(k_row + d)  # (HALF,)
    k2 = tl.load(k_row + HALF + d)
    v_new = tl.load(v_ptr + b * stride_v + h * HEAD_DIM + dv)  # (HEAD_DIM,)
    if QK_NORM:  # before RoPE, as the model's attention_inputs (Qwen3)
        q1, q2 = _rms_norm_head(q1, q2, qw1[None, :], qw2[None, :], norm_eps, HEAD_DIM, act)
        k1, k2 = _rms_norm_head(k1, k2, kw1, kw2, norm_eps, HEAD_DIM, act)
    if ROPE:
        q1, q2 = _rotate(q1, q2, cos[None, :], sin[None, :], act)
        k1, k2 = _rotate(k1, k2, cos, sin, act)
    if kv_ty != act:  # an fp8 pool: the new token attends as later steps will read it back (saturating cast)
        k1, k2 = k1.to(kv_ty).to(act), k2.to(kv_ty).to(act)
        v_new = v_new.to(kv_ty).to(act)
        q1, q2 = q1.to(dot_ty), q2.to(dot_ty)

    if split == 0:  # one program stores the new token's k and v (pool layout (blocks, BLOCK_SIZE, Hkv, D))
        new_row = tl.load(slots_ptr + b) * row_stride + h * HEAD_DIM
        tl.store(k_pool + new_row + d, k1.to(kv_ty))
        tl.store(k_pool + new_row + HALF + d, k2.to(kv_ty))
        tl.store(v_pool + new_row + dv, v_new.to(kv_ty))

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros((BLOCK_G,), tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    m_i, l_i, acc = _softmax_update(q1, q2, pk1, pk2, pv, p_ok, scale, m_i, l_i, acc)
    for t0 in range(start + BLOCK_T, end, BLOCK_T):
        pk1, pk2, pv, p_ok = _past_tile(k_pool, v_pool, tables_ptr, b, h, t0, end, stride_table, row_stride,
                                        HEAD_DIM, BLOCK_SIZE, BLOCK_T, dot_ty, E4M3_PAIRS, PTX)
        m_i, l_i, acc = _softmax_update(q1, q2, pk1, pk2, pv, p_ok, scale, m_i, l_i, acc)

    # The new token, from registers (never read back from the pool it was just stored in); split 0's alone.
    s_new = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], axis=1)
             + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], axis=1)) * scale  # (BLOCK_G,)
    s_new = tl.where(split == 0, s_new, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p_new = tl.exp(s_new - m_safe)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
    rows = b * NUM_KV_HEADS * GROUP + heads  # (BLOCK_G,) rows of the (B, H) output
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + dv[None, :], out.to(act), mask=g_ok[:, None])
    else:  # partials (B, H, NUM_SPLITS, D) and their (max, sum) (B, H, NUM_SPLITS, 2), all fp32
        part = rows * NUM_SPLITS + split
        tl.store(part_ptr + part[:, None] * HEAD_DIM + dv[None, :], acc, mask=g_ok[:, None])
        tl.store(stats_ptr + part * 2, m_new, mask=g_ok)
        tl.store(stats_ptr + part * 2 + 1, l_i, mask=g_ok)


@triton.jit
def _combine_splits(part_ptr, stats_ptr, context_lens_ptr, out_ptr, NUM_HEADS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                    BLOCK_T: tl.constexpr, PDL: tl.constexpr):
    # One program per (sequence, query head): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s over the
    # splits that had work (the idle ones wrote nothing; split 0 always has the new token, so M is finite).
    if PDL:
        gdc_launch_dependents()
    b = tl.program_id(0)
    row = b * NUM_HEADS + tl.program_id(1)
    past = tl.load(context_lens_ptr + b) - 1
    chunk = _chunk(past, NUM_SPLITS, BLOCK_T)
    active = tl.where(chunk > 0, tl.cdiv(past, tl.maximum(chunk, 1)), 1)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < active
    d = tl.arange(0, HEAD_DIM)
    if PDL:
        gdc_wait()
    part = row * NUM_SPLITS + s
    m = tl.load(stats_ptr + part * 2, mask=s_ok, other=float("-inf"))  # (BLOCK_S,)
    l = tl.load(stats_ptr + part * 2 + 1, mask=s_ok, other=0.0)
    acc = tl.load(part_ptr + part[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)  # (BLOCK_S, D)
    w = tl.exp(m - tl.max(m, axis=0))
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(out_ptr + row * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


def default_tile(batch: int, num_kv_heads: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_T, num_warps, num_stages): LARGE_TILE once the unsplit launch fills half the SMs."""
    return LARGE_TILE if 2 * batch * num_kv_heads >= multiprocessors(device) else SMALL_TILE


def default_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device,
                       tile: tuple[int, int, int]) -> int:
    """Splits per (sequence, KV head) for a launch of `batch` sequences whose contexts reach max_context
    tokens under `tile` (BLOCK_T, num_warps, num_stages): the largest power of two that keeps within
    WARPS_PER_SM warps of programs on every SM, and no more than the longest context has tiles (a CUDA graph
    captured for a block-table width serves every context up to it)."""
    block_t, num_warps, _ = tile
    want = WARPS_PER_SM * multiprocessors(device) // (num_warps * batch * num_kv_heads)
    want = 1 << (max(1, want).bit_length() - 1)
    return max(1, min(want, -(-max_context // block_t), MAX_SPLITS))


def supported(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """None if the kernel serves this shape, else why not (one line, for the log). head_dim >= 32: q and k
    are multiplied as two halves (RoPE pairs dim i with i + HALF), each a tl.dot of at least 16."""
    return unsupported_shape("paged decode attention kernel", 32, num_heads, num_kv_heads, head_dim, dtype)


def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                           v_pool: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                           num_splits: int | None = None, tile: tuple[int, int, int] | None = None,
                           qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """q (B, H, D), k/v (B, Hkv, D) of each sequence's one new token (views of the qkv output are fine);
    pools (blocks, block_size, Hkv, D); slots (B,), tables (B, W), context_lens (B,) with the new token
    counted, each at most W * block_size; rotary: (cos table, sin table, positions) with tables (P, D/2)
    fp32 as in RotaryEmbedding and positions (B,), to rotate q and k here; None if they arrive rotated.
    qk_norm: (q's norm weight (D,), k's, eps) to RMS-normalise each head of q and k first (Qwen3's QK-norm,
    for callers that did not: the fused decode step); None if they arrive normalised or the model has none.
    num_splits: programs per (sequence, KV head), default_num_splits if None. tile: (BLOCK_T, num_warps,
    num_stages), default_tile if None (benchmarks sweep it).
    Stores k/v at the slots and returns the attention output (B, H, D)."""
    b, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    for t in (q, k, v):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, "heads must be contiguous rows of head_dim"
    group = num_heads // num_kv_heads
    block_size = k_pool.shape[1]
    tile = tile or default_tile(b, num_kv_heads, q.device)
    block_t, num_warps, num_stages = tile
    splits = num_splits or default_num_splits(b, num_kv_heads, tables.shape[1] * block_size, q.device, tile)
    out = torch.empty(b, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if splits > 1:
        part = torch.empty(b, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        stats = torch.empty(b, num_heads, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part = stats = out  # unused
    cos, sin, positions = rotary if rotary is not None else (q, q, slots)
    q_norm, k_norm, norm_eps = qk_norm if qk_norm is not None else (q, q, 0.0)
    pdl = pdl_supported(q.device)
    launch = launch_options(pdl)
    _paged_decode_attention[(b, num_kv_heads, splits)](
        q, k, v, cos, sin, positions, k_pool, v_pool, slots, tables, context_lens, out, part, stats, q_norm, k_norm,
        scale, norm_eps, q.stride(0), k.stride(0), v.stride(0), tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_T=block_t, NUM_SPLITS=splits, ROPE=rotary is not None,
        QK_NORM=qk_norm is not None, PDL=pdl, E4M3_PAIRS=E4M3_WIDEN_IN_REGISTERS and k_pool.dtype != q.dtype,
        PTX=q.device.type == "cuda", num_warps=num_warps, num_stages=num_stages, **launch,
    )
    if splits > 1:
        _combine_splits[(b, num_heads)](
            part, stats, context_lens, out, NUM_HEADS=num_heads, HEAD_DIM=head_dim, NUM_SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_T=block_t, PDL=pdl, num_warps=1, **launch,
        )
    return out
