"""Paged decode attention (Triton): one new token per sequence attends to its whole context in place.

The PyTorch path gathers each sequence's blocks into a dense copy and calls
SDPA: several kernels and a full extra read and write of the context per
layer. This kernel reads K/V straight from the pools through the block table,
in one launch per layer, and also does the two jobs around it: RoPE on the new
token's q and k (optional: the caller may pass them rotated) and storing its k
and v at its slot.

One program per (sequence, KV head) serves the GROUP query heads that share
that KV head (GQA), so each K/V tile is read once for all of them. The past
(context - 1 tokens) streams from the pool with an online softmax; the new
token is folded in last from registers, so the kernel never reads back what it
has just written. The past's first tile is loaded before waiting for the
previous kernel (kernels/pdl.py): at short contexts that is all of it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_supported


@triton.jit
def _rotate(x1, x2, cos, sin, act: tl.constexpr):
    # HF rotate-half, computed in fp32 and rounded once, as models.rotary._rotate does.
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    return (x1 * cos - x2 * sin).to(act), (x2 * cos + x1 * sin).to(act)


@triton.jit
def _past_tile(k_pool, v_pool, tables_ptr, b, h, t0, past, stride_table, row_stride: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr):
    # Tokens t0 .. t0 + BLOCK_T of the past, read through the block table: k as two halves, v whole.
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HALF)
    t = t0 + tl.arange(0, BLOCK_T)
    t_ok = t < past
    block = tl.load(tables_ptr + b * stride_table + t // BLOCK_SIZE, mask=t_ok, other=0)
    rows = (block * BLOCK_SIZE + t % BLOCK_SIZE)[:, None] * row_stride + h * HEAD_DIM  # (BLOCK_T, 1)
    k1 = tl.load(k_pool + rows + d[None, :], mask=t_ok[:, None], other=0.0)  # (BLOCK_T, HALF)
    k2 = tl.load(k_pool + rows + HALF + d[None, :], mask=t_ok[:, None], other=0.0)
    v = tl.load(v_pool + rows + tl.arange(0, HEAD_DIM)[None, :], mask=t_ok[:, None], other=0.0)
    return k1, k2, v, t_ok


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


@triton.jit
def _paged_decode_attention(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, positions_ptr, k_pool, v_pool, slots_ptr,
                            tables_ptr, context_lens_ptr, out_ptr, scale, stride_q, stride_k, stride_v, stride_table,
                            NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                            HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                            ROPE: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    b = tl.program_id(0)
    h = tl.program_id(1)
    act = k_pool.dtype.element_ty
    row_stride: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
    # The past was written by earlier steps, not by the previous kernel: its first tile loads before the wait.
    past = tl.load(context_lens_ptr + b) - 1
    pk1, pk2, pv, p_ok = _past_tile(k_pool, v_pool, tables_ptr, b, h, 0, past, stride_table, row_stride,
                                    HEAD_DIM, BLOCK_SIZE, BLOCK_T)
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HALF)  # q and k are handled as two halves: RoPE pairs dim i with i + HALF
    if ROPE:  # the step's positions and the model's tables: inputs, not the previous kernel's output
        position = tl.load(positions_ptr + b)
        cos = tl.load(cos_ptr + position * HALF + d)
        sin = tl.load(sin_ptr + position * HALF + d)
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
    if ROPE:
        q1, q2 = _rotate(q1, q2, cos[None, :], sin[None, :], act)
        k1, k2 = _rotate(k1, k2, cos, sin, act)

    # Store the new token's k and v at its slot (pool layout (blocks, BLOCK_SIZE, KV heads, HEAD_DIM)).
    new_row = tl.load(slots_ptr + b) * row_stride + h * HEAD_DIM
    tl.store(k_pool + new_row + d, k1)
    tl.store(k_pool + new_row + HALF + d, k2)
    tl.store(v_pool + new_row + dv, v_new)

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # running max of the scores
    l_i = tl.zeros((BLOCK_G,), tl.float32)  # running sum of exp(score - m_i)
    acc = tl.zeros((BLOCK_G, HEAD_DIM), tl.float32)
    m_i, l_i, acc = _softmax_update(q1, q2, pk1, pk2, pv, p_ok, scale, m_i, l_i, acc)
    for t0 in range(BLOCK_T, past, BLOCK_T):
        pk1, pk2, pv, p_ok = _past_tile(k_pool, v_pool, tables_ptr, b, h, t0, past, stride_table, row_stride,
                                        HEAD_DIM, BLOCK_SIZE, BLOCK_T)
        m_i, l_i, acc = _softmax_update(q1, q2, pk1, pk2, pv, p_ok, scale, m_i, l_i, acc)

    # The new token, from registers (never read back from the pool it was just stored in).
    s_new = (tl.sum(q1.to(tl.float32) * k1.to(tl.float32)[None, :], axis=1)
             + tl.sum(q2.to(tl.float32) * k2.to(tl.float32)[None, :], axis=1)) * scale  # (BLOCK_G,)
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp(m_i - m_new)
    p_new = tl.exp(s_new - m_new)
    l_i = l_i * alpha + p_new
    acc = acc * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
    out = acc / l_i[:, None]
    out_rows = out_ptr + (b * NUM_KV_HEADS * GROUP + heads)[:, None] * HEAD_DIM
    tl.store(out_rows + dv[None, :], out.to(act), mask=g_ok[:, None])


def supported(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """None if the kernel serves this shape, else why not (one line, for the log)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return f"paged decode attention kernel needs bf16/fp16, not {dtype}"
    if head_dim < 32 or head_dim & (head_dim - 1):
        return f"paged decode attention kernel needs a power-of-two head_dim >= 32, not {head_dim}"
    if num_heads % num_kv_heads:
        return "paged decode attention kernel needs num_heads divisible by num_kv_heads"
    return None


def paged_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor,
                           v_pool: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float,
                           rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q (B, H, D), k/v (B, Hkv, D) of each sequence's one new token (views of the qkv output are fine);
    pools (blocks, block_size, Hkv, D); slots (B,), tables (B, W), context_lens (B,) with the new token
    counted; rotary: (cos table, sin table, positions) with tables (P, D/2) fp32 as in RotaryEmbedding and
    positions (B,), to rotate q and k here; None if they arrive rotated.
    Stores k/v at the slots and returns the attention output (B, H, D)."""
    b, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    for t in (q, k, v):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, "heads must be contiguous rows of head_dim"
    group = num_heads // num_kv_heads
    out = torch.empty(b, num_heads, head_dim, dtype=q.dtype, device=q.device)
    cos, sin, positions = rotary if rotary is not None else (q, q, slots)
    pdl = pdl_supported(q.device)
    _paged_decode_attention[(b, num_kv_heads)](
        q, k, v, cos, sin, positions, k_pool, v_pool, slots, tables, context_lens, out, scale,
        q.stride(0), k.stride(0), v.stride(0), tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, BLOCK_SIZE=k_pool.shape[1], BLOCK_T=64, ROPE=rotary is not None, PDL=pdl,
        num_warps=4, **({"launch_pdl": True} if pdl else {}),
    )
    return out
