"""One-row INT4 matmul for batch-1 decode, with the skinny kernels' fusions (Triton).

At one row an int4 matmul on an H200 is bound by instructions, not bytes: HBM delivers ~9.6e12 int4
weights/s and the SMs issue ~33e12 thread-instructions/s, so a kernel spending more than ~3.5 instructions
a weight falls behind memory. kernels/skinny_matmul.py's int4 form spends ~10 (a bitfield extract, an OR,
a subtraction and a multiply by the scale per weight in fp32, x converted per weight, tiles reshaped
through shared memory). Here a word of 8 codes costs about 20 instructions, in fp16 pairs, as TensorRT-LLM's
weight-only GEMV and Marlin multiply:
  - nibbles i and i + 4 of the word, masked into the two halves and OR-ed into the bits of 1024.0, are the
    fp16 pair (1024 + q_i, 1024 + q_i+4): one LOP3 after a shift, no int->float conversion;
  - minus (1024 + z, 1024 + z): q - z, exact;
  - an fp16x2 FMA with the matching pair of x (x times 1/64, so that a lane's four products stay finite for
    |x| up to ~70000), four per word;
  - the two lanes added in fp32, times the group's scale (and 64), into an fp32 accumulator.
Numerics: the weight's q - z is exact; x is rounded to fp16 (exact for bf16 values in fp16's normal range)
and a word's products and partial sums to fp16 (11 bits: a relative error of about 2^-11 per word); all
sums across words are fp32. Triton's CPU interpreter runs no PTX: there the same loop runs in fp32.

Layout: models/int4.py's codes (N, K/2) bytes read as int32 words (N, K/8): word c of a row holds inputs
8c..8c+7, input 8c + i in nibble i (the low nibble of each byte comes first). A program owns ROWS output
rows (for SwiGLU also the ROWS "up" rows N further on) and walks K in steps of GT groups; in a step every
row is a (GT, GROUP/8) tile of words, one word a thread, in the same layout as the x values it multiplies
(read as a (GT, 4 GROUP/8) tile of 16-bit pairs and split in registers), so x is loaded and converted once
per step for all the rows, with no layout conversion. The next step's codes are loaded before this step's
are used (a register double buffer), and with PDL the first step's stream in before the previous kernel
has finished.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_supported
from kvtriton.backend.kernels.skinny_epilogue import rms_normalized, store_outputs

# (N, K) -> (ROWS, GT, num_warps or None) for the shapes where this kernel beat skinny_matmul's int4 form at one
# row, measured on an NVIDIA H200 (torch 2.11, triton 3.6) by benchmarks/quant_kernels_bench.py --device cuda
# --rows 1 (N: the output width; for SwiGLU the intermediate size). Other shapes stay with skinny_matmul.
TILES: dict[tuple[int, int], tuple] = {
    (8192, 2048): (4, 16, None),
    (49152, 2048): (4, 16, None),
}
MAGIC_BITS = tl.constexpr(0x4B000000)  # 2^23: a 4-bit code OR-ed into its mantissa is the float 2^23 + q


# $0 (fp32) = sum over the word's 8 inputs of x * (q - z), in fp16x2: $1 the word, $2..$5 x as fp16 pairs (inputs
# i and i + 4 of the word, scaled by X_SCALE), $6 the pair (1024 + z, 1024 + z). A pair of codes (nibbles i and
# i + 4, one in each half) OR-ed into 1024.0's bits is (1024 + q) in fp16; minus 1024 + z is q - z, exact.
DOT_WORD_HALF2 = tl.constexpr(" ".join([
    "{", ".reg .b32 t, q, acc;", ".reg .f16 lo, hi;", ".reg .f32 flo, fhi;",
    "lop3.b32 q, $1, 983055, 1677747200, 234;", "sub.rn.f16x2 q, q, $6;", "mul.rn.f16x2 acc, q, $2;",
    "shr.u32 t, $1, 4;", "lop3.b32 q, t, 983055, 1677747200, 234;", "sub.rn.f16x2 q, q, $6;",
    "fma.rn.f16x2 acc, q, $3, acc;",
    "shr.u32 t, $1, 8;", "lop3.b32 q, t, 983055, 1677747200, 234;", "sub.rn.f16x2 q, q, $6;",
    "fma.rn.f16x2 acc, q, $4, acc;",
    "shr.u32 t, $1, 12;", "lop3.b32 q, t, 983055, 1677747200, 234;", "sub.rn.f16x2 q, q, $6;",
    "fma.rn.f16x2 acc, q, $5, acc;",
    "mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;", "}"]))
X_SCALE = tl.constexpr(1.0 / 64)  # x in fp16 times this: |x| up to ~70000 stays finite over a word's 4 products


@triton.jit
def _nibble(codes, i: tl.constexpr, zero):
    """Input 8c + i of each word c as fp32, minus zero (= 2^23 + zero point): q - z, exact."""
    return (((codes >> (4 * i)) & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True) - zero


@triton.jit
def _row_codes(w_ptr, row, k0, word, N, K):
    """The (GT, GW) int32 words of `row` in the step starting at input k0 (zeros past K or N)."""
    c = k0 // 8 + word
    return tl.load(w_ptr + row * (K // 8) + c, mask=(c < K // 8) & (row < N), other=0)


@triton.jit
def _half2(low, high):
    """fp32 (low, high) * X_SCALE -> int32 holding them as an fp16 pair (low in the low half)."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [low * X_SCALE, high * X_SCALE],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _row_dot(codes, s_ptr, z_ptr, o_ptr, row, g, N, K, xs, xh, x_sum, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
             HALF2: tl.constexpr):
    """sum over the step of x times row's weights, per word: (GT, GW) fp32. g (GT, 1): the step's groups;
    xs: the 8 (GT, GW) tensors x[8c + i]; x_sum their sum (for the offset)."""
    groups = K // GROUP
    meta = row * groups + g
    ok = (g < groups) & (row < N)
    scale = tl.load(s_ptr + meta, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + meta, mask=ok, other=0).to(tl.int32)
    if HALF2:
        z2 = tl.broadcast_to(z | (z << 16) | 0x64006400, codes.shape)
        part = tl.inline_asm_elementwise(DOT_WORD_HALF2, "=f,r,r,r,r,r,r", [codes, xh[0], xh[1], xh[2], xh[3], z2],
                                         dtype=tl.float32, is_pure=True, pack=1)
        part = part * (scale * (1.0 / X_SCALE))
    else:
        zero = (z | MAGIC_BITS).to(tl.float32, bitcast=True)  # 2^23 + z
        part = _nibble(codes, 0, zero) * xs[0]
        for i in tl.static_range(1, 8):
            part += _nibble(codes, i, zero) * xs[i]
        part = part * scale
    if HAS_OFFSET:
        part += tl.load(o_ptr + meta, mask=ok, other=0.0).to(tl.float32) * x_sum
    return part


@triton.jit
def _x_words(ptr, k0, GT: tl.constexpr, GW: tl.constexpr, K, act: tl.constexpr):
    """The step's inputs as 8 fp32 (GT, GW) tensors: the i-th is input 8c + i of each word c. Read from a
    16-bit tensor as int32 pairs, a word's four pairs at once (a (GT, 4 GW) tile, split in registers), so the
    tensors come out in the same layout as the words' codes."""
    pair = k0 // 2 + tl.arange(0, GT)[:, None] * (4 * GW) + tl.arange(0, 4 * GW)[None, :]
    v = tl.load(ptr + pair, mask=pair < K // 2, other=0)
    v01, v23 = tl.split(tl.reshape(v, (GT, GW, 2, 2)))  # pairs 2a + b: split on b, then on a
    p0, p2 = tl.split(v01)
    p1, p3 = tl.split(v23)
    x0, x1 = _halves(p0, act)
    x2, x3 = _halves(p1, act)
    x4, x5 = _halves(p2, act)
    x6, x7 = _halves(p3, act)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _rows_codes(w_ptr, row0, k0, word, N, K, ROWS: tl.constexpr):
    """The codes of rows row0 .. row0 + ROWS - 1 (ROWS in 1, 2, 4) at step k0; unused ones repeat row0's."""
    c0 = _row_codes(w_ptr, row0, k0, word, N, K)
    c1, c2, c3 = c0, c0, c0
    if ROWS > 1:
        c1 = _row_codes(w_ptr, row0 + 1, k0, word, N, K)
    if ROWS > 2:
        c2 = _row_codes(w_ptr, row0 + 2, k0, word, N, K)
        c3 = _row_codes(w_ptr, row0 + 3, k0, word, N, K)
    return c0, c1, c2, c3


@triton.jit
def _rows_step(a0, a1, a2, a3, c0, c1, c2, c3, w_ptr, s_ptr, z_ptr, o_ptr, row0, ahead, g, word, N, K, xs, xh,
               x_sum, ROWS: tl.constexpr, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, HALF2: tl.constexpr):
    """One step of K for ROWS rows: each row's accumulator plus its codes times this step's x, and the codes of
    the step ahead, each row's loaded before its current codes are used (the register double buffer)."""
    n0 = _row_codes(w_ptr, row0, ahead, word, N, K)
    a0 += _row_dot(c0, s_ptr, z_ptr, o_ptr, row0, g, N, K, xs, xh, x_sum, GROUP, HAS_OFFSET, HALF2)
    n1, n2, n3 = n0, n0, n0
    if ROWS > 1:
        n1 = _row_codes(w_ptr, row0 + 1, ahead, word, N, K)
        a1 += _row_dot(c1, s_ptr, z_ptr, o_ptr, row0 + 1, g, N, K, xs, xh, x_sum, GROUP, HAS_OFFSET, HALF2)
    if ROWS > 2:
        n2 = _row_codes(w_ptr, row0 + 2, ahead, word, N, K)
        n3 = _row_codes(w_ptr, row0 + 3, ahead, word, N, K)
        a2 += _row_dot(c2, s_ptr, z_ptr, o_ptr, row0 + 2, g, N, K, xs, xh, x_sum, GROUP, HAS_OFFSET, HALF2)
        a3 += _row_dot(c3, s_ptr, z_ptr, o_ptr, row0 + 3, g, N, K, xs, xh, x_sum, GROUP, HAS_OFFSET, HALF2)
    return a0, a1, a2, a3, n0, n1, n2, n3


@triton.jit
def _halves(v, act: tl.constexpr):
    """int32 holding two 16-bit act values -> (low, high) in fp32."""
    return ((v & 0xFFFF).to(tl.int16).to(act, bitcast=True).to(tl.float32),
            (v >> 16).to(tl.int16).to(act, bitcast=True).to(tl.float32))


@triton.jit
def _int4_gemv(x_ptr, w_ptr, out_ptr, norm_ptr, bias_ptr, res_ptr, s_ptr, z_ptr, o_ptr, N, K, eps,
               act: tl.constexpr, ROWS: tl.constexpr, GT: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr,
               SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr,
               PDL: tl.constexpr, HALF2: tl.constexpr):
    # x (K,) and norm (K,) 16-bit, read as int32 pairs; w (N or 2N, K/8) int32 words; out (N,). ROWS in 1, 2, 4.
    if PDL:  # let the next kernel launch now; it waits for this one before reading what we write
        gdc_launch_dependents()
    GW: tl.constexpr = GROUP // 8
    STEP: tl.constexpr = GT * GROUP
    row0 = tl.program_id(0) * ROWS
    g_in_step = tl.arange(0, GT)[:, None]
    word = g_in_step * GW + tl.arange(0, GW)[None, :]  # (GT, GW): word index within a step
    zeros = tl.zeros((GT, GW), tl.float32)
    # Row r's accumulators a<r> (u<r>: its up row) and the codes of the step ahead c<r> (d<r>). Weights never
    # depend on the previous kernel: the first step's stream in before gdc_wait.
    a0, a1, a2, a3, u0, u1, u2, u3 = zeros, zeros, zeros, zeros, zeros, zeros, zeros, zeros
    c0, c1, c2, c3 = _rows_codes(w_ptr, row0, 0, word, N, K, ROWS)
    d0, d1, d2, d3 = c0, c1, c2, c3
    up_w, up_s, up_z, up_o = w_ptr + N * (K // 8), s_ptr + N * (K // GROUP), z_ptr + N * (K // GROUP), \
        o_ptr + N * (K // GROUP)  # SwiGLU's up rows: rows N.. of the (2N, K) gate_up weight
    if SWIGLU:
        d0, d1, d2, d3 = _rows_codes(up_w, row0, 0, word, N, K, ROWS)
    if PDL:
        gdc_wait()
    rstd = 1.0
    if NORM:  # one pass over x (from L2) for RMSNorm's 1 / rms
        squares = tl.zeros((STEP // 2,), tl.float32)
        for k0 in range(0, K // 2, STEP // 2):
            pair = k0 + tl.arange(0, STEP // 2)
            low, high = _halves(tl.load(x_ptr + pair, mask=pair < K // 2, other=0), act)
            squares += low * low + high * high
        rstd = 1.0 / tl.sqrt(tl.sum(squares) / K + eps)
    for k0 in range(0, K, STEP):
        # this step's x, once for every row: xs[i] = x[8c + i]
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_words(x_ptr, k0, GT, GW, K, act)
        if NORM:
            g0, g1, g2, g3, g4, g5, g6, g7 = _x_words(norm_ptr, k0, GT, GW, K, act)
            x0, x1 = rms_normalized(x0, g0, rstd, act), rms_normalized(x1, g1, rstd, act)
            x2, x3 = rms_normalized(x2, g2, rstd, act), rms_normalized(x3, g3, rstd, act)
            x4, x5 = rms_normalized(x4, g4, rstd, act), rms_normalized(x5, g5, rstd, act)
            x6, x7 = rms_normalized(x6, g6, rstd, act), rms_normalized(x7, g7, rstd, act)
        xs = (x0, x1, x2, x3, x4, x5, x6, x7)
        xh = (word, word, word, word)
        if HALF2:
            xh = (_half2(x0, x4), _half2(x1, x5), _half2(x2, x6), _half2(x3, x7))
        x_sum = zeros
        if HAS_OFFSET:
            x_sum = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7
        g = k0 // GROUP + g_in_step
        ahead = k0 + STEP
        a0, a1, a2, a3, c0, c1, c2, c3 = _rows_step(a0, a1, a2, a3, c0, c1, c2, c3, w_ptr, s_ptr, z_ptr, o_ptr, row0,
                                                    ahead, g, word, N, K, xs, xh, x_sum, ROWS, GROUP, HAS_OFFSET,
                                                    HALF2)
        if SWIGLU:
            u0, u1, u2, u3, d0, d1, d2, d3 = _rows_step(u0, u1, u2, u3, d0, d1, d2, d3, up_w, up_s, up_z, up_o,
                                                        row0, ahead, g, word, N, K, xs, xh, x_sum, ROWS, GROUP,
                                                        HAS_OFFSET, HALF2)
    # (1, ROWS) sums for the shared epilogue
    r = tl.arange(0, ROWS)[None, :]
    acc = tl.where(r == 0, tl.sum(a0), tl.where(r == 1, tl.sum(a1), tl.where(r == 2, tl.sum(a2), tl.sum(a3))))
    acc_up = acc
    if SWIGLU:
        acc_up = tl.where(r == 0, tl.sum(u0), tl.where(r == 1, tl.sum(u1), tl.where(r == 2, tl.sum(u2), tl.sum(u3))))
    m = tl.arange(0, 1)
    n = row0 + tl.arange(0, ROWS)
    store_outputs(acc, acc_up, m, m < 1, n, n < N, N, out_ptr, bias_ptr, res_ptr, act, SWIGLU, HAS_BIAS, HAS_RESIDUAL)


def serves(x: torch.Tensor, group_size: int) -> bool:
    """Whether int4_gemv takes this call: one row of 16-bit activations on CUDA (or the interpreter)."""
    return x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16) and group_size % 8 == 0


def int4_gemv(x, qweight, scale, zero_point, offset, group_size, out_features, *, norm=None, eps=0.0, bias=None,
              residual=None, swiglu=False, out_dtype=None, rows=None, groups_per_step=None, warps=None) -> torch.Tensor:
    """x (1, K) -> (1, out_features); the weight in models/int4.py's layout ((2 out_features, K/2) with swiglu).
    rows / groups_per_step: ROWS and GT, to override the heuristic (the benchmark's sweep)."""
    k = x.shape[1]
    x = x.contiguous()
    out = torch.empty(1, out_features, dtype=out_dtype or x.dtype, device=x.device)
    rows = rows or (4 if out_features >= 8192 else 2)
    gt = groups_per_step or max(1, min(triton.next_power_of_2(k // group_size), 1024 // group_size))
    act = tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16
    pdl = pdl_supported(x.device)
    spare = x  # any pointer, for the operands a variant does not read
    _int4_gemv[(triton.cdiv(out_features, rows),)](
        x.view(torch.int32), qweight.view(torch.int32), out,
        norm.contiguous().view(torch.int32) if norm is not None else spare, bias if bias is not None else spare,
        residual.contiguous() if residual is not None else spare, scale, zero_point,
        offset if offset is not None else scale, out_features, k, eps,
        act=act, ROWS=rows, GT=gt, GROUP=group_size, NORM=norm is not None, SWIGLU=swiglu,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, HAS_OFFSET=offset is not None, PDL=pdl,
        HALF2=x.device.type == "cuda", num_warps=warps or max(1, min(8, gt * group_size // 8 // 32)),
        **({"launch_pdl": True} if pdl else {}))
    return out
