"""One-row INT4 matmul for batch-1 decode, with the skinny kernels' fusions (Triton).

At one row an int4 matmul on an H200 is bound by instructions, not bytes: HBM delivers ~9.6e12 int4 weights/s
and the SMs issue ~33e12 thread-instructions/s, so a kernel spending more than ~3.5 instructions a weight falls
behind memory. The products are done as TensorRT-LLM's weight-only GEMV and Marlin do them, in fp16 pairs:
  - nibbles i and i + 4 of a word, masked into the two halves and OR-ed into the bits of 1024.0, are the fp16
    pair (1024 + q_i, 1024 + q_i+4): one LOP3 after a shift, no int->float conversion;
  - minus (1024 + z, 1024 + z): q - z, exact;
  - an fp16x2 FMA with the matching pair of x (x times 1/64, so that a lane's eight products stay finite for
    |x| up to ~30000);
  - per element (32 inputs, four words), the lanes added in fp32, times the group's scale, into an fp32
    accumulator (and times 64 once a row, at the end).
That is ~60 instructions for 32 weights; the SASS of the inner loop spends ~2.7 a weight in all. The rest is
kept off the per-weight path:
  - an element is one thread's: each row's four code words (one 16-byte load), its group's scale and zero
    point, and the element's x (four 16-byte loads) are read with inline PTX loads into the same register
    layout, so Triton inserts no layout conversion (shared memory, barriers) between them;
  - programs are persistent, over blocks of ROWS rows (for SwiGLU also their "up" rows); when a step covers
    K (ONE_STEP: K <= 1024 x warps) a program loads x, takes RMSNorm's 1 / rms from the same registers, and
    converts it once for all its blocks;
  - the next block's codes and group numbers are loaded before this block's are used (a register double
    buffer), so no block waits a full HBM round trip; with PDL the first block's stream in before the
    previous kernel has finished.
Measured on an H200 (benchmarks/quant_kernels_bench.py --device cuda --rows 1, g32, 1B-class shapes): gate_up
10.1 us and lm_head 20.4 us, against 13.4 and 44.0 for this file's former one-word-a-thread kernel; down now
runs here too (7.0 us against the skinny kernel's 7.6).
Numerics: the weight's q - z is exact; x is rounded to fp16 (exact for bf16 values in fp16's normal range) and
an element's products and partial sums to fp16 (11 bits: a relative error of about 2^-11 per element); all
sums across elements are fp32. Triton's CPU interpreter runs no PTX: there the same loop runs in fp32, with
ordinary loads.

Layout: models/int4.py's codes (N, K/2) bytes read as int32 words (N, K/8): word c of a row holds inputs
8c..8c+7, input 8c + i in nibble i (the low nibble of each byte comes first). A block's tile is (ROWS, E): E =
32 x num_warps elements a step, one a thread, each thread holding all ROWS rows of its element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtriton.backend.kernels.pdl import gdc_launch_dependents, gdc_wait, launch_options, pdl_supported
from kvtriton.backend.kernels.skinny_epilogue import rms_normalized, store_outputs
from kvtriton.backend.kernels.tile_config import multiprocessors

# (N, K) -> (ROWS, num_warps, programs per SM or None: one a block) for the shapes where this kernel beat
# skinny_matmul's int4 form at one row, measured on an NVIDIA H200 (torch 2.11, triton 3.6) by
# benchmarks/quant_kernels_bench.py --device cuda --rows 1 (N: the output width; for SwiGLU the intermediate
# size). Other shapes stay with skinny_matmul: at qkv and o it still wins by 0-0.4 us.
TILES: dict[tuple[int, int], tuple] = {
    (8192, 2048): (2, 2, 16),
    (2048, 8192): (8, 4, None),
    (49152, 2048): (8, 2, 8),
}
MAGIC_BITS = tl.constexpr(0x4B000000)  # 2^23: a 4-bit code OR-ed into its mantissa is the float 2^23 + q
X_SCALE = tl.constexpr(1.0 / 64)  # x in fp16 times this: |x| up to ~30000 stays finite over an element's products


def _dot_word(code: int, first_x: int, z2: int, acc: str) -> list[str]:
    """PTX for one word's four fp16x2 FMAs into acc: operand numbers of the code, its first x pair and z2."""
    out = []
    for i in range(4):
        src = f"${code}" if i == 0 else "t"
        if i:
            out.append(f"shr.u32 t, ${code}, {4 * i};")
        # (src & 0x000F000F) | 0x64006400: the fp16 pair (1024 + q_i, 1024 + q_i+4)
        out += [f"lop3.b32 q, {src}, 983055, 1677747200, 234;", f"sub.rn.f16x2 q, q, ${z2};",
                f"fma.rn.f16x2 {acc}, q, ${first_x + i}, {acc};"]
    return out


# $0 (fp32) = sum over the element's 32 inputs of x * (q - z), in fp16x2: $1..$4 the element's four words,
# $5..$20 x as fp16 pairs (inputs i and i + 4 of each word, scaled by X_SCALE), $21 the pair (1024 + z, 1024 + z).
# Words 0-1 and 2-3 sum into separate fp16 pairs (eight products a lane each), added in fp32.
DOT_ELEMENT_HALF2 = tl.constexpr(" ".join([
    "{", ".reg .b32 t, q, a, b;", ".reg .f16 a0, a1, b0, b1;", ".reg .f32 fa0, fa1, fb0, fb1;", "mov.b32 a, 0;",
    "mov.b32 b, 0;", *_dot_word(1, 5, 21, "a"), *_dot_word(2, 9, 21, "a"), *_dot_word(3, 13, 21, "b"),
    *_dot_word(4, 17, 21, "b"), "mov.b32 {a0, a1}, a;", "mov.b32 {b0, b1}, b;", "cvt.f32.f16 fa0, a0;",
    "cvt.f32.f16 fa1, a1;", "cvt.f32.f16 fb0, b0;", "cvt.f32.f16 fb1, b1;", "add.f32 fa0, fa0, fa1;",
    "add.f32 fb0, fb0, fb1;", "add.f32 $0, fa0, fb0;", "}"]))


@triton.jit
def _load_quad(addr, NC: tl.constexpr):
    """Four consecutive int32 words at each int64 address: one 16-byte load a thread, in the address tensor's
    own layout (Triton's own loads may pick another, and a conversion through shared memory between them). NC:
    the non-coherent path, for the weights, which no kernel writes; x is written by the previous kernel."""
    if NC:
        v = tl.inline_asm_elementwise("ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [addr],
                                      dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        v = tl.inline_asm_elementwise("ld.global.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [addr],
                                      dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    return v


@triton.jit
def _quad(ptr, HALF2: tl.constexpr, NC: tl.constexpr):
    """The four int32 words at ptr (a tensor of pointers): _load_quad on CUDA, four loads in the interpreter."""
    if HALF2:
        v = _load_quad(ptr.to(tl.int64, bitcast=True), NC)
    else:
        v = tl.load(ptr), tl.load(ptr + 1), tl.load(ptr + 2), tl.load(ptr + 3)
    return v


@triton.jit
def _load_meta(ptr, ok, HALF2: tl.constexpr):
    """A group's scale, zero point or offset per (row, element): 16-bit floats as fp32, 8-bit codes as int32
    (0 where not ok). On CUDA an inline PTX load from a clamped address: a tl.load of this (ROWS, E) gather
    makes Triton lay the whole tile out along the rows, spreading each thread over elements (and their x)
    instead of rows."""
    BITS: tl.constexpr = ptr.dtype.element_ty.primitive_bitwidth
    if not HALF2:
        v = tl.load(ptr, mask=ok, other=0)
        v = v.to(tl.int32) if BITS == 8 else v.to(tl.float32)
    elif BITS == 8:
        v = tl.inline_asm_elementwise("ld.global.nc.u8 $0, [$1];", "=r,l", [ptr.to(tl.int64, bitcast=True)],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        v = tl.inline_asm_elementwise("ld.global.nc.u16 $0, [$1];", "=r,l", [ptr.to(tl.int64, bitcast=True)],
                                      dtype=tl.int32, is_pure=True, pack=1)
        v = v.to(tl.int16).to(ptr.dtype.element_ty, bitcast=True).to(tl.float32)
    return v


@triton.jit
def _halves(v, act: tl.constexpr):
    """int32 holding two 16-bit act values -> (low, high) in fp32."""
    return ((v & 0xFFFF).to(tl.int16).to(act, bitcast=True).to(tl.float32),
            (v >> 16).to(tl.int16).to(act, bitcast=True).to(tl.float32))


@triton.jit
def _word(ptr, word, ok, act: tl.constexpr, HALF2: tl.constexpr, NC: tl.constexpr):
    """The 8 inputs of a 16-bit vector's word `word` ((1, E) word indices, clamped into K) in fp32, from its
    four int32 pairs (one 16-byte load); 0 where not ok (past K) unless ok is None."""
    p0, p1, p2, p3 = _quad(ptr + word * 4, HALF2, NC)
    x0, x1 = _halves(p0, act)
    x2, x3 = _halves(p1, act)
    x4, x5 = _halves(p2, act)
    x6, x7 = _halves(p3, act)
    if ok is not None:
        x0, x1, x2, x3 = tl.where(ok, x0, 0.0), tl.where(ok, x1, 0.0), tl.where(ok, x2, 0.0), tl.where(ok, x3, 0.0)
        x4, x5, x6, x7 = tl.where(ok, x4, 0.0), tl.where(ok, x5, 0.0), tl.where(ok, x6, 0.0), tl.where(ok, x7, 0.0)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _words(ptr, k0, e, K, act: tl.constexpr, HALF2: tl.constexpr, NC: tl.constexpr, EVEN_K: tl.constexpr):
    """The step's four words of a 16-bit vector (each thread's element: words k0 / 8 + 4 e .. + 3), each as 8
    fp32 (1, E) tensors; 0 past K."""
    word = k0 // 8 + 4 * e
    w0 = _word(ptr, tl.minimum(word, K // 8 - 1), None if EVEN_K else word < K // 8, act, HALF2, NC)
    w1 = _word(ptr, tl.minimum(word + 1, K // 8 - 1), None if EVEN_K else word + 1 < K // 8, act, HALF2, NC)
    w2 = _word(ptr, tl.minimum(word + 2, K // 8 - 1), None if EVEN_K else word + 2 < K // 8, act, HALF2, NC)
    w3 = _word(ptr, tl.minimum(word + 3, K // 8 - 1), None if EVEN_K else word + 3 < K // 8, act, HALF2, NC)
    return w0, w1, w2, w3


@triton.jit
def _squares(xw):
    """A word's 8 inputs' sum of squares (RMSNorm's)."""
    s = xw[0] * xw[0]
    for i in tl.static_range(1, 8):
        s += xw[i] * xw[i]
    return s


@triton.jit
def _normed(xw, gw, rstd, act: tl.constexpr):
    """A word's 8 inputs through RMSNorm (gw: the norm's weights of those inputs)."""
    return rms_normalized(xw[0], gw[0], rstd, act), rms_normalized(xw[1], gw[1], rstd, act), \
        rms_normalized(xw[2], gw[2], rstd, act), rms_normalized(xw[3], gw[3], rstd, act), \
        rms_normalized(xw[4], gw[4], rstd, act), rms_normalized(xw[5], gw[5], rstd, act), \
        rms_normalized(xw[6], gw[6], rstd, act), rms_normalized(xw[7], gw[7], rstd, act)


@triton.jit
def _half2(low, high, scale: tl.constexpr):
    """fp32 (low, high) * scale -> int32 holding them as an fp16 pair (low in the low half)."""
    if scale != 1.0:
        low, high = low * scale, high * scale
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [low, high], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _word_pairs(xw, scale: tl.constexpr):
    """A word's 8 fp32 inputs times scale as the 4 fp16 pairs (inputs i, i + 4) its nibble pairs multiply."""
    return _half2(xw[0], xw[4], scale), _half2(xw[1], xw[5], scale), _half2(xw[2], xw[6], scale), \
        _half2(xw[3], xw[7], scale)


@triton.jit
def _nibble(codes, i: tl.constexpr, zero):
    """Input 8c + i of each word c as fp32, minus zero (= 2^23 + zero point): q - z, exact."""
    return (((codes >> (4 * i)) & 0xF) | MAGIC_BITS).to(tl.float32, bitcast=True) - zero


@triton.jit
def _word_dot(codes, xw, zero):
    """fp32: one word's 8 products, in the interpreter's fp32 form."""
    part = _nibble(codes, 0, zero) * xw[0]
    for i in tl.static_range(1, 8):
        part += _nibble(codes, i, zero) * xw[i]
    return part


@triton.jit
def _operands(w_ptr, s_ptr, z_ptr, o_ptr, row, k0, e, N, K, GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr,
              HALF2: tl.constexpr):
    """A block's weights at step k0, (ROWS, E) each: the four code words of each row's element, its group's
    scale (fp32), zero point (int32) and offset (fp32, or the scale when there is none). Loaded a block ahead
    of their use, the group's numbers with the codes: waited for behind the dots, one HBM round trip would
    cost every block. Rows and elements are clamped into the weight (rows past N are never stored; inputs
    past K are 0)."""
    c = tl.minimum(k0 // 8 + 4 * e, K // 8 - 4)
    row = tl.minimum(row, N - 1)
    codes = _quad(w_ptr + row * (K // 8) + c, HALF2, True)
    groups = K // GROUP
    meta = row * groups + tl.minimum((k0 + 32 * e) // GROUP, groups - 1)  # an element lies in one group
    ok = (k0 + 32 * e) // GROUP < groups
    scale = _load_meta(s_ptr + meta, ok, HALF2)
    offset = scale
    if HAS_OFFSET:
        offset = _load_meta(o_ptr + meta, ok, HALF2)
    return codes, scale, _load_meta(z_ptr + meta, ok, HALF2), offset


@triton.jit
def _row_dots(operands, xs, xh, x_sum, HAS_OFFSET: tl.constexpr, HALF2: tl.constexpr):
    """(ROWS, E) fp32: each row's element (_operands) times x's. xs: the element's four words' inputs (8 fp32
    each); xh: them as fp16 pairs (4 a word); x_sum: their sum (for the offset)."""
    codes, scale, z, offset = operands
    c0, c1, c2, c3 = codes
    if HALF2:
        z2 = z | (z << 16) | 0x64006400
        h0, h1, h2, h3 = xh
        part = tl.inline_asm_elementwise(
            DOT_ELEMENT_HALF2, "=f" + ",r" * 21,
            [c0, c1, c2, c3, h0[0], h0[1], h0[2], h0[3], h1[0], h1[1], h1[2], h1[3], h2[0], h2[1], h2[2], h2[3],
             h3[0], h3[1], h3[2], h3[3], z2], dtype=tl.float32, is_pure=True, pack=1)
    else:
        zero = (z | MAGIC_BITS).to(tl.float32, bitcast=True)  # 2^23 + z
        part = _word_dot(c0, xs[0], zero) + _word_dot(c1, xs[1], zero) + _word_dot(c2, xs[2], zero) + \
            _word_dot(c3, xs[3], zero)
    part = part * scale  # and 1 / X_SCALE once a row, at the end
    if HAS_OFFSET:
        part += offset * x_sum
    return part


@triton.jit
def _sum8(v):
    """A word's 8 inputs' sum (the offsets' multiplier)."""
    return v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7]


@triton.jit
def _rstd_pass(x_ptr, e, K, eps, act: tl.constexpr, STEP: tl.constexpr, HALF2: tl.constexpr, EVEN_K: tl.constexpr):
    """RMSNorm's 1 / rms of x, from a pass over it (from L2) before the steps; ONE_STEP kernels instead take it
    from the step's words they hold."""
    squares = tl.zeros((1, STEP // 32), tl.float32)
    for k0 in range(0, K, STEP):
        w0, w1, w2, w3 = _words(x_ptr, k0, e, K, act, HALF2, False, EVEN_K)
        squares += _squares(w0) + _squares(w1) + _squares(w2) + _squares(w3)
    return 1.0 / tl.sqrt(tl.sum(squares) / K + eps)


@triton.jit
def _step_inputs(w0, w1, w2, w3, g, rstd, act: tl.constexpr, NORM: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 HALF2: tl.constexpr):
    """The step's inputs for every row, from its four words of x (and g, the norm's): xs (4 words x 8 fp32,
    each (1, E)), xh (them as 4 x 4 fp16 pairs times X_SCALE: under NORM rstd carries it, exactly, as a power
    of two commutes with rounding) and x_sum (the inputs' sum in the units of the products, for the offsets)."""
    if NORM:
        w0, w1, w2, w3 = _normed(w0, g[0], rstd, act), _normed(w1, g[1], rstd, act), \
            _normed(w2, g[2], rstd, act), _normed(w3, g[3], rstd, act)
    xh = (rstd, rstd, rstd, rstd)
    if HALF2:
        PAIR_SCALE: tl.constexpr = 1.0 if NORM else X_SCALE
        xh = (_word_pairs(w0, PAIR_SCALE), _word_pairs(w1, PAIR_SCALE), _word_pairs(w2, PAIR_SCALE),
              _word_pairs(w3, PAIR_SCALE))
    x_sum = 0.0
    if HAS_OFFSET:
        x_sum = (_sum8(w0) + _sum8(w1) + _sum8(w2) + _sum8(w3)) * (X_SCALE if HALF2 and not NORM else 1.0)
    return (w0, w1, w2, w3), xh, x_sum


@triton.jit
def _int4_gemv(x_ptr, w_ptr, out_ptr, norm_ptr, bias_ptr, res_ptr, s_ptr, z_ptr, o_ptr, N, K, eps,
               act: tl.constexpr, ROWS: tl.constexpr, E: tl.constexpr, GROUP: tl.constexpr, NORM: tl.constexpr,
               SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr,
               PDL: tl.constexpr, HALF2: tl.constexpr, EVEN_K: tl.constexpr, ONE_STEP: tl.constexpr):
    # x (K,) and norm (K,) 16-bit, read as int32 pairs; w (N or 2N, K/8) int32 words; out (N,). E: 32 x warps.
    # Programs are persistent: program p takes row blocks p, p + programs, ... With ONE_STEP (K <= 32 E) its x
    # is loaded, normalised and converted once, for all its blocks.
    if PDL:  # let the next kernel launch now; it waits for this one before reading what we write
        gdc_launch_dependents()
    STEP: tl.constexpr = 32 * E
    programs = tl.num_programs(0)
    blocks = tl.cdiv(N, ROWS)
    e = tl.arange(0, E)[None, :]
    r = tl.arange(0, ROWS)[:, None]
    up_w, up_s, up_z, up_o = w_ptr + N * (K // 8), s_ptr + N * (K // GROUP), z_ptr + N * (K // GROUP), \
        o_ptr + N * (K // GROUP)  # SwiGLU's up rows: rows N.. of the (2N, K) gate_up weight
    # Weights never depend on the previous kernel: the first block's stream in before gdc_wait.
    row = tl.program_id(0) * ROWS + r
    ops = _operands(w_ptr, s_ptr, z_ptr, o_ptr, row, 0, e, N, K, GROUP, HAS_OFFSET, HALF2)
    ops_up = ops
    if SWIGLU:
        ops_up = _operands(up_w, up_s, up_z, up_o, row, 0, e, N, K, GROUP, HAS_OFFSET, HALF2)
    g = (0.0, 0.0, 0.0, 0.0)
    if NORM and ONE_STEP:  # the norm's weights are constant too
        g = _words(norm_ptr, 0, e, K, act, HALF2, True, EVEN_K)
    if PDL:
        gdc_wait()
    w0, w1, w2, w3 = _words(x_ptr, 0, e, K, act, HALF2, False, EVEN_K)
    rstd = 1.0
    if NORM:
        if ONE_STEP:  # x is read once: its squares come from the words the step multiplies
            rstd = 1.0 / tl.sqrt(tl.sum(_squares(w0) + _squares(w1) + _squares(w2) + _squares(w3)) / K + eps)
        else:
            rstd = _rstd_pass(x_ptr, e, K, eps, act, STEP, HALF2, EVEN_K)
            g = _words(norm_ptr, 0, e, K, act, HALF2, True, EVEN_K)
        if HALF2:
            rstd *= X_SCALE
    # the first step's inputs; ONE_STEP kernels keep them for every block
    xs, xh, x_sum = _step_inputs(w0, w1, w2, w3, g, rstd, act, NORM, HAS_OFFSET, HALF2)
    for block in range(tl.program_id(0), blocks, programs):
        row = block * ROWS + r
        acc = tl.zeros((ROWS, E), tl.float32)
        acc_up = acc
        for k0 in range(0, K, STEP):
            if not ONE_STEP:
                w0, w1, w2, w3 = _words(x_ptr, k0, e, K, act, HALF2, False, EVEN_K)
                if NORM:
                    g = _words(norm_ptr, k0, e, K, act, HALF2, True, EVEN_K)
                xs, xh, x_sum = _step_inputs(w0, w1, w2, w3, g, rstd, act, NORM, HAS_OFFSET, HALF2)
            # the weights ahead (this block's next step, or the next block's first), loaded before these are used
            last = k0 + STEP >= K
            ahead_row = tl.where(last, row + programs * ROWS, row)
            ahead_k = tl.where(last, 0, k0 + STEP)
            ahead = _operands(w_ptr, s_ptr, z_ptr, o_ptr, ahead_row, ahead_k, e, N, K, GROUP, HAS_OFFSET, HALF2)
            ahead_up = ahead
            if SWIGLU:
                ahead_up = _operands(up_w, up_s, up_z, up_o, ahead_row, ahead_k, e, N, K, GROUP, HAS_OFFSET, HALF2)
            acc += _row_dots(ops, xs, xh, x_sum, HAS_OFFSET, HALF2)
            if SWIGLU:
                acc_up += _row_dots(ops_up, xs, xh, x_sum, HAS_OFFSET, HALF2)
            ops, ops_up = ahead, ahead_up
        if HALF2:
            acc *= 1.0 / X_SCALE
            acc_up *= 1.0 / X_SCALE
        m = tl.arange(0, 1)
        n = block * ROWS + tl.arange(0, ROWS)
        store_outputs(tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :], m, m < 1, n, n < N, N,
                      out_ptr, bias_ptr, res_ptr, act, SWIGLU, HAS_BIAS, HAS_RESIDUAL)


def serves(x: torch.Tensor, group_size: int) -> bool:
    """Whether int4_gemv takes this call: one row of 16-bit activations on CUDA (or the interpreter)."""
    return x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16) and group_size % 32 == 0


def int4_gemv(x, qweight, scale, zero_point, offset, group_size, out_features, *, norm=None, eps=0.0, bias=None,
              residual=None, swiglu=False, out_dtype=None, rows=None, warps=None, per_sm=None) -> torch.Tensor:
    """x (1, K) -> (1, out_features); the weight in models/int4.py's layout ((2 out_features, K/2) with swiglu).
    rows / warps / per_sm: ROWS, num_warps and programs per SM (None: one per row block), to override the
    heuristic (the benchmark's sweep)."""
    k = x.shape[1]
    x = x.contiguous()
    out = torch.empty(1, out_features, dtype=out_dtype or x.dtype, device=x.device)
    rows = rows or 8
    warps = warps or 1
    act = tl.bfloat16 if x.dtype == torch.bfloat16 else tl.float16
    pdl = pdl_supported(x.device)
    spare = x  # any pointer, for the operands a variant does not read
    blocks = triton.cdiv(out_features, rows)
    programs = min(blocks, per_sm * multiprocessors(x.device)) if per_sm else blocks
    _int4_gemv[(programs,)](
        x.view(torch.int32), qweight.view(torch.int32), out,
        norm.contiguous().view(torch.int32) if norm is not None else spare, bias if bias is not None else spare,
        residual.contiguous() if residual is not None else spare, scale, zero_point,
        offset if offset is not None else scale, out_features, k, eps,
        act=act, ROWS=rows, E=32 * warps, GROUP=group_size, NORM=norm is not None, SWIGLU=swiglu,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, HAS_OFFSET=offset is not None, PDL=pdl,
        HALF2=x.device.type == "cuda", EVEN_K=k % (1024 * warps) == 0, ONE_STEP=k <= 1024 * warps, num_warps=warps,
        **launch_options(pdl))
    return out
