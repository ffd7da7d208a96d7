"""INT4 weight-only matmul for decode batches: y = x W^T with W dequantized in registers (Triton).

W is stored as models/int4.py lays it out: qweight (N, K/2) uint8, two 4-bit codes per byte (the even
input in the low nibble), and per group of GROUP inputs an fp16 scale, a uint8 zero point and
optionally an fp16 offset:  w[n, k] = (q - zero_point) * scale + offset.

A decode step is bound by weight bytes, so each program streams a (BLOCK_N, BLOCK_K) tile of codes
(a quarter of the bf16 bytes), dequantizes it in registers, rounds it to the activation dtype (what
the dense reference `x @ W.to(x.dtype).T` multiplies by) and accumulates in fp32:
  rows <= SKINNY_ROWS  broadcast-multiply-sum, long narrow tiles, as kernels/skinny_matmul.py
  more rows (<= 64)    tl.dot on (BLOCK_M, BLOCK_K) x (BLOCK_K, BLOCK_N) tiles (tensor cores)
Prefill (more than MAX_ROWS rows) does not come here: `int4_dequantize` writes the weight once in the
activation dtype (the same tile code) and models/int4.py hands it to cuBLAS, compute-bound there anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 64  # the decode batch sizes this kernel serves
SKINNY_ROWS = 8  # up to here the broadcast-sum form; above, tl.dot (which wants tiles of >= 16 rows)


@triton.jit
def _dequantize_tile(q_ptr, scale_ptr, zero_ptr, offset_ptr, n, n_ok, k0, K, GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_OFFSET: tl.constexpr):
    """W[n, k0:k0 + BLOCK_K] (BLOCK_N, BLOCK_K) in fp32 from the packed codes and the group numbers."""
    groups = K // GROUP
    pair = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(q_ptr + n[:, None] * (K // 2) + pair[None, :], mask=n_ok[:, None], other=0)
    low = (packed & 0xF).to(tl.float32)  # (BLOCK_N, BLOCK_K/2): inputs 2j
    high = ((packed >> 4) & 0xF).to(tl.float32)  # inputs 2j + 1
    codes = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K // GROUP, GROUP))  # inputs in order
    g = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
    meta = n[:, None] * groups + g[None, :]  # (BLOCK_N, BLOCK_K/GROUP)
    scale = tl.load(scale_ptr + meta, mask=n_ok[:, None], other=0.0).to(tl.float32)
    zero = tl.load(zero_ptr + meta, mask=n_ok[:, None], other=0).to(tl.float32)
    w = (codes - zero[:, :, None]) * scale[:, :, None]
    if HAS_OFFSET:
        w += tl.load(offset_ptr + meta, mask=n_ok[:, None], other=0.0).to(tl.float32)[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _int4_matmul(x_ptr, q_ptr, scale_ptr, zero_ptr, offset_ptr, out_ptr, M, N, K,
                 GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 HAS_OFFSET: tl.constexpr, USE_DOT: tl.constexpr):
    # x (M, K), q (N, K/2) uint8, scale/zero/offset (N, K/GROUP), out (M, N); all contiguous.
    # BLOCK_K is a multiple of GROUP and divides K (the caller checks), so no K mask is needed.
    act = x_ptr.dtype.element_ty
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _dequantize_tile(q_ptr, scale_ptr, zero_ptr, offset_ptr, n, n_ok, k0, K, GROUP, BLOCK_N, BLOCK_K,
                             HAS_OFFSET).to(act)  # the weight the dense reference multiplies by
        k = k0 + tl.arange(0, BLOCK_K)
        xk = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None], other=0.0)  # (BLOCK_M, BLOCK_K)
        if USE_DOT:
            acc = tl.dot(xk, tl.trans(w), acc)
        else:
            acc += tl.sum(xk.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_dequantize(q_ptr, scale_ptr, zero_ptr, offset_ptr, out_ptr, N, K, GROUP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_OFFSET: tl.constexpr):
    # out (N, K) in the activation dtype; BLOCK_K divides K.
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k0 = tl.program_id(1) * BLOCK_K
    w = _dequantize_tile(q_ptr, scale_ptr, zero_ptr, offset_ptr, n, n_ok, k0, K, GROUP, BLOCK_N, BLOCK_K, HAS_OFFSET)
    k = k0 + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + n[:, None] * K + k[None, :], w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


def _blocks(m: int, n: int, k: int, group: int) -> tuple[int, int, int, int, bool]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, tl.dot). Skinny: as skinny_matmul's sweep found on an H200, long
    tiles along K and enough programs (~512+) to keep every SM streaming; BLOCK_K a power of two dividing K.
    Dot: 16-64 rows x 32 outputs x 128+ inputs, the usual W4A16 decode tile. Untuned beyond that:
    benchmarks/precision_bench.py --part gpu measures the result against bf16 cuBLAS."""
    block_k = group
    limit = 1024 if m <= SKINNY_ROWS else 256
    while block_k * 2 <= limit and k % (block_k * 2) == 0:
        block_k *= 2
    if m <= SKINNY_ROWS:
        block_m = triton.next_power_of_2(m)
        block_n = max(1, min(8192 // (block_m * block_k), n // 512))
        block_n = 1 << (block_n.bit_length() - 1)
        return block_m, block_n, block_k, 1 if block_m * block_n * block_k <= 4096 else 4, False
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    return block_m, 32, block_k, 4, True


# A custom op: torch.compile (the runner compiles each layer's work around attention, fullgraph) sees one
# opaque call with a known output shape instead of tracing the launch code over symbolic shapes.
@torch.library.custom_op("kvtriton::int4_matmul", mutates_args=())
def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                offset: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """x (M, K), M <= MAX_ROWS -> (M, N) in x's dtype; the weight in models/int4.py's layout."""
    m, k = x.shape
    n = qweight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"int4_matmul serves at most {MAX_ROWS} rows (decode batches), got {m}")
    if k % group_size or qweight.shape[1] * 2 != k:
        raise ValueError(f"x has {k} inputs, the weight {qweight.shape[1] * 2} in groups of {group_size}")
    x = x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k, warps, dot = _blocks(m, n, k, group_size)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _int4_matmul[grid](x, qweight, scale, zero_point, offset if offset is not None else scale, out, m, n, k,
                       GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       HAS_OFFSET=offset is not None, USE_DOT=dot, num_warps=warps)
    return out


@int4_matmul.register_fake
def _(x, qweight, scale, zero_point, offset, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("kvtriton::int4_dequantize", mutates_args=())
def int4_dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    offset: torch.Tensor | None, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The weight (N, K) in `dtype`, written once: prefill's operand for cuBLAS (no fp32 temporaries)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    block_n, block_k = 16, group_size
    while block_k < 256 and k % (block_k * 2) == 0:
        block_k *= 2
    _int4_dequantize[(triton.cdiv(n, block_n), k // block_k)](
        qweight, scale, zero_point, offset if offset is not None else scale, out, n, k, GROUP=group_size,
        BLOCK_N=block_n, BLOCK_K=block_k, HAS_OFFSET=offset is not None, num_warps=4)
    return out


@int4_dequantize.register_fake
def _(qweight, scale, zero_point, offset, group_size, dtype):
    return qweight.new_empty(qweight.shape[0], qweight.shape[1] * 2, dtype=dtype)
