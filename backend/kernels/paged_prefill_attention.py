"""Varlen paged attention (Triton): every new token of a step attends to its sequence's context in place.

A step's new tokens arrive packed and unpadded: sequence s owns rows
query_start[s] .. query_start[s + 1] of q (N, H, D), and they are the last
q_len of its context_lens[s] tokens, whose K/V (these new ones included) are
already in the paged pools. A token sees the whole cached prefix and, among
the new tokens, itself and those before it. So one launch per layer serves a
whole prefill step: fresh prompts, chunked-prefill continuations, prefix-cache
hits, and the one-token decodes of a mixed step. GQA: a program takes
BLOCK_M tokens x the GROUP query heads of one KV head as the rows of its tile,
so each K/V tile it reads serves all of them.

Programs: (query tile, KV head), the query tiles numbered across the step's
sequences (sequence s owns cdiv(q_len_s, BLOCK_M) of them, after those of the
sequences before it), so the grid grows with the step's tokens, not with its
longest query times its sequence count: a mixed step of one 500-token chunk and
63 decodes launches ~80 tiles a KV head, not 16 x 64, and a CUDA graph captured
for N tokens and B sequences launches cdiv(N, BLOCK_M) + B, whatever the split
of its tokens. Each program finds its sequence from the query starts (a prefix
sum of tile counts over at most a few hundred sequences); slots past the step's
last tile return at once. Key tiles wholly before the tile's first query
position need no mask, the rest (the diagonal) are masked causally.

The same kernel serves the fixed-stride layout of a CUDA-graph verify step
(paged_uniform_attention): sequence s owns rows s * Q .. s * Q + Q, of which
the first query_lens[s] are real (a plain decode has 1, a verify 1 + its
proposals) and the rest padding. A graph fixes every tensor's shape, so the
step's shape is (batch bucket, Q) whatever each sequence holds; padding rows
get zeros and are never read back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels.attention_shapes import unsupported_shape

LOG2E = 1.4426950408889634
# The tile, from a sweep on an H200 (benchmarks/paged_attention_bench.py --sweep), 64 prompts of 128
# tokens, 32/8 heads of 64: 60 us a layer (torch's varlen_attn on contiguous K/V: 74 us); 64 rows and 64
# keys with 4 warps took 132 us.
ROWS = 128  # query rows (tokens x group heads) per program
BLOCK_N = 32  # keys per tile
NUM_WARPS, NUM_STAGES = 8, 2
# Sequences a program reads at a time while it finds its own (a constant, so that no step's sequence count compiles
# a variant of its own mid-serving).
SEQS_PER_PASS = 64


@triton.jit
def _kv_tile(k_pool, v_pool, tables_ptr, seq, h, t0, end, stride_table, row_stride: tl.constexpr,
             HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             ACT: tl.constexpr):
    # Keys t0 .. t0 + BLOCK_N of the sequence, through its block table: k (BLOCK_N, D), v (BLOCK_N, D), as the
    # dots' operand type ACT (an fp8 pool's values widen here).
    t = t0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    if MASKED:
        t_ok = t < end
        block = tl.load(tables_ptr + seq * stride_table + t // BLOCK_SIZE, mask=t_ok, other=0)
        rows = (block * BLOCK_SIZE + t % BLOCK_SIZE)[:, None] * row_stride + h * HEAD_DIM + d[None, :]
        k = tl.load(k_pool + rows, mask=t_ok[:, None], other=0.0)
        v = tl.load(v_pool + rows, mask=t_ok[:, None], other=0.0)
    else:
        block = tl.load(tables_ptr + seq * stride_table + t // BLOCK_SIZE)
        rows = (block * BLOCK_SIZE + t % BLOCK_SIZE)[:, None] * row_stride + h * HEAD_DIM + d[None, :]
        k = tl.load(k_pool + rows)
        v = tl.load(v_pool + rows)
    return k.to(ACT), v.to(ACT), t


# A step's block-table width is its longest context's, so stride_table takes new values step after step; Triton
# specializes integer arguments (== 1, divisible by 16) and compiled a new variant mid-serving the first time a
# step's width crossed those classes (H200, the prefill kernel: 0.57 s at width 16, 0.89 s at width 1, after
# width 8). The stride only scales one load's address. Likewise pointers, on 16-byte alignment: an eager step's
# context lengths are a view into its packed int64 inputs (aligned when its token count is even), a graph's a view
# into its static buffer, so each alignment would be a variant of its own (on an H100 an eager 20-token step after
# the graphs' captures compiled one, 0.76 s, in a benchmark that skips the start-up's eager profile pass). These
# are read a value a sequence, where alignment buys nothing.
@triton.jit(do_not_specialize=["num_seqs", "stride_table"],
            do_not_specialize_on_alignment=["tables_ptr", "query_start_ptr", "context_lens_ptr"])
def _paged_prefill_attention(q_ptr, k_pool, v_pool, out_ptr, tables_ptr, query_start_ptr, context_lens_ptr,
                             qk_scale, num_seqs, stride_qn, stride_qh, stride_on, stride_oh, stride_table,
                             NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                             HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, QUERY_STRIDE: tl.constexpr):
    # QUERY_STRIDE 0: varlen, query_start_ptr holds the (B + 1,) row offsets, and program (p, 0, h) takes the
    # step's p-th query tile. Else: fixed stride, query_start_ptr holds the (B,) query_lens, program (tile, seq, h)
    # takes that tile of that sequence, and the rows past a sequence's q_len (up to the stride) are padding.
    h = tl.program_id(2)
    if QUERY_STRIDE == 0:
        tile_id = tl.program_id(0)
        # The sequence whose tiles come first past those of the sequences before it, the tile tile_id among them.
        seq = 0
        before = 0  # the tiles of the sequences before seq
        for s0 in range(0, num_seqs, BLOCK_S):  # BLOCK_S sequences at a time: one compiled variant for any B
            seqs = s0 + tl.arange(0, BLOCK_S)
            seqs_ok = seqs < num_seqs
            q_lens = (tl.load(query_start_ptr + seqs + 1, mask=seqs_ok, other=0)
                      - tl.load(query_start_ptr + seqs, mask=seqs_ok, other=0))
            tiles = tl.cdiv(q_lens, BLOCK_M).to(tl.int32)  # (BLOCK_S,) query tiles of each sequence
            passed = before + tl.cumsum(tiles, axis=0) <= tile_id  # sequences whose tiles all come before it
            seq += tl.sum(passed.to(tl.int32), axis=0)
            before += tl.sum(tl.where(passed, tiles, 0), axis=0)
        if seq >= num_seqs:  # past the step's last tile
            return
        tile = tile_id - before
        q_start = tl.load(query_start_ptr + seq)
        q_len = tl.load(query_start_ptr + seq + 1) - q_start
        stored = q_len  # rows of this sequence the program writes
    else:
        tile = tl.program_id(0)
        seq = tl.program_id(1)
        q_start = seq * QUERY_STRIDE
        q_len = tl.load(query_start_ptr + seq)
        stored = QUERY_STRIDE  # padding rows too, as zeros: a graph's output buffer holds stale values
        if tile * BLOCK_M >= stored:
            return
    ctx = tl.load(context_lens_ptr + seq)
    prefix = ctx - q_len  # cached tokens before the first new one
    row_stride: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
    ROWS: tl.constexpr = BLOCK_M * BLOCK_G
    r = tl.arange(0, ROWS)
    tok = tile * BLOCK_M + r // BLOCK_G  # (ROWS,) index among the sequence's new tokens
    g = r % BLOCK_G
    row_ok = (tok < q_len) & (g < GROUP)
    head = h * GROUP + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + tok)[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)  # (ROWS, D)
    if k_pool.dtype.element_ty != q.dtype:  # an fp8 pool: the dots in fp16, its one-instruction widening on sm89+
        q = q.to(tl.float16)
    q_pos = prefix + tok  # (ROWS,) position of each row's token in its context

    m_i = tl.full((ROWS,), float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, HEAD_DIM), tl.float32)
    # The tile's first query position: every row sees the keys before it. A tile of padding rows only (fixed
    # stride) stops at the last real one: no key past the context is read.
    first = prefix + tl.minimum(tile * BLOCK_M, q_len - 1)
    end = tl.minimum(first + BLOCK_M, ctx)  # one past its last query position
    unmasked_end = (first // BLOCK_N) * BLOCK_N
    # Every tile processed first holds key 0, which every row sees: m_i is finite from then on.
    for t0 in range(0, unmasked_end, BLOCK_N):
        k, v, t = _kv_tile(k_pool, v_pool, tables_ptr, seq, h, t0, end, stride_table, row_stride, HEAD_DIM,
                           BLOCK_SIZE, BLOCK_N, False, q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # (ROWS, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    for t0 in range(unmasked_end, end, BLOCK_N):
        k, v, t = _kv_tile(k_pool, v_pool, tables_ptr, seq, h, t0, end, stride_table, row_stride, HEAD_DIM,
                           BLOCK_SIZE, BLOCK_N, True, q.dtype)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(t[None, :] <= q_pos[:, None], s, float("-inf"))  # causal; t < end follows for real rows
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # padding rows may see no key at all
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = tl.where(row_ok[:, None], acc / tl.where(row_ok, l_i, 1.0)[:, None], 0.0)
    store_ok = (tok < stored) & (g < GROUP)
    tl.store(out_ptr + (q_start + tok)[:, None] * stride_on + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=store_ok[:, None])


def supported(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """None if the kernel serves this shape, else why not (one line, for the log). head_dim >= 16: q @ k.T
    is one tl.dot over the whole head."""
    return unsupported_shape("paged prefill attention kernel", 16, num_heads, num_kv_heads, head_dim, dtype)


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                            query_start: torch.Tensor, context_lens: torch.Tensor, scale: float, rows: int = ROWS,
                            block_n: int = BLOCK_N, num_warps: int = NUM_WARPS,
                            num_stages: int = NUM_STAGES) -> torch.Tensor:
    """q (N, H, D): the step's new tokens, packed; pools (blocks, block_size, Hkv, D) already holding their
    K/V; tables (B, W); query_start (B + 1,) with sequence s's tokens at rows query_start[s] ..
    query_start[s + 1] (a sequence may have none: a CUDA graph's padding); context_lens (B,) with the new
    tokens counted. Nothing is read back to the host: the grid follows from N and B alone. Returns the attention
    output (N, H, D). rows, block_n, num_warps, num_stages: the tile shape (benchmarks sweep them)."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    assert q.stride(2) == 1, "q's head_dim must be contiguous"
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_m = max(1, rows // block_g)  # tokens per program
    out = torch.empty(n, num_heads, head_dim, dtype=q.dtype, device=q.device)
    b = context_lens.shape[0]
    # Every sequence's tiles: at most N / BLOCK_M whole ones, plus one partial a sequence.
    grid = (triton.cdiv(n, block_m) + b, 1, num_kv_heads)
    _paged_prefill_attention[grid](
        q, k_pool, v_pool, out, tables, query_start, context_lens, scale * LOG2E, b,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_pool.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=SEQS_PER_PASS,
        QUERY_STRIDE=0, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def paged_uniform_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor,
                            query_lens: torch.Tensor, context_lens: torch.Tensor, scale: float,
                            num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """The fixed-stride layout (a CUDA-graph verify step): q (B * Q, H, D), sequence s's rows at s * Q ..
    s * Q + Q, the first query_lens[s] of them its new tokens (the last query_lens[s] of its context_lens[s]
    tokens, K/V already in the pools), the rest padding (output zeros); tables (B, W). Every shape is fixed by
    B and Q, and nothing is read back to the host, so a CUDA graph captures it. One query tile per sequence
    and KV head: Q is small (1 + the proposals), so a tile holds at most 16 tokens x the GQA group."""
    b = query_lens.shape[0]
    n, num_heads, head_dim = q.shape
    stride = n // b
    assert stride * b == n and q.stride(2) == 1, "q: (B * Q, H, D) with head_dim contiguous"
    num_kv_heads = k_pool.shape[2]
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_m = max(triton.next_power_of_2(min(stride, 16)), triton.cdiv(16, block_g))  # tl.dot takes >= 16 rows
    out = torch.empty(n, num_heads, head_dim, dtype=q.dtype, device=q.device)
    _paged_prefill_attention[(triton.cdiv(stride, block_m), b, num_kv_heads)](
        q, k_pool, v_pool, out, tables, query_lens, context_lens, scale * LOG2E, b,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_pool.shape[1], BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_S=1, QUERY_STRIDE=stride,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
