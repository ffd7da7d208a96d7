"""The decode kernels compile for Hopper (sm_90) without a GPU: Triton's front end, its GPU passes and the
ptxas it ships, with the specializations its launcher makes (16-byte aligned pointers, N and K multiples of 16).

The CPU interpreter (tests/test_kernels.py, tests/test_quant_decode_kernels.py) checks what the kernels
compute but not that they compile: it accepts what the GPU compiler refuses (a plain Python global read in
a kernel, a shape held in a tuple variable). This catches those before a GPU run. Skips without triton, and
on a machine with a GPU, where the other kernel tests compile and run the kernels for real (and the Triton
there may be another version, with another ahead-of-time compile API).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
if torch.cuda.is_available():
    pytest.skip("a GPU is here: tests/test_kernels.py and test_quant_decode_kernels.py compile and run the kernels",
                allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kvtriton.backend.kernels import fp8_matmul, int4_matmul, skinny_matmul  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
SKINNY = dict(x_ptr="*bf16", out_ptr="*bf16", norm_ptr="*bf16", bias_ptr="*bf16", res_ptr="*bf16", zero_ptr="*u8",
              offset_ptr="*fp16", M="i32", N="i32", K="i32", eps="fp32")
WEIGHT_TYPES = {0: ("*bf16", "*bf16"), 1: ("*fp8e4nv", "*fp32"), 2: ("*u8", "*fp16")}  # (w_ptr, ws_ptr)


def compile_for_hopper(fn, types: dict, constants: dict, warps: int = 4):
    signature = {name: "constexpr" if name in constants else types[name] for name in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name in ("N", "K")}
    return triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs), target=HOPPER,
                          options=dict(num_warps=warps))


@pytest.mark.parametrize("weight", [0, 1, 2], ids=["bf16", "fp8", "int4"])
@pytest.mark.parametrize("op", ["rms_norm_linear", "rms_norm_swiglu", "linear+residual", "linear+residual, K > tile"])
def test_skinny_matmul_compiles_for_every_weight_format(weight, op):
    w_ptr, ws_ptr = WEIGHT_TYPES[weight]
    norm, whole = op.startswith("rms_norm"), not op.endswith("K > tile")
    constants = dict(BLOCK_M=2, BLOCK_N=2, BLOCK_K=2048, NORM=norm, SWIGLU=op == "rms_norm_swiglu", HAS_BIAS=False,
                     HAS_RESIDUAL=not norm, PDL=True, WEIGHT=weight, GROUP=32 if weight == 2 else 1,
                     HAS_OFFSET=weight == 2, WHOLE_ROWS=whole)
    kernel = compile_for_hopper(skinny_matmul._skinny_matmul, dict(SKINNY, w_ptr=w_ptr, ws_ptr=ws_ptr), constants)
    assert "griddepcontrol" in kernel.asm["ptx"]  # PDL survives


@pytest.mark.parametrize("block_m, block_n, block_k, split_k, dot", [(1, 4, 1024, 1, False), (4, 8, 256, 2, False),
                                                                    (16, 16, 256, 2, True), (64, 64, 128, 1, True),
                                                                    (64, 16, 256, 1, True)])  # a narrow sweep tile
def test_int4_and_fp8_matmuls_compile_under_every_tile_form(block_m, block_n, block_k, split_k, dot):
    out = "*fp32" if split_k > 1 else "*bf16"
    int4 = compile_for_hopper(int4_matmul._int4_dot_matmul if dot else int4_matmul._int4_matmul, dict(
        x_ptr="*bf16", q_ptr="*u8", scale_ptr="*fp16", zero_ptr="*u8", offset_ptr="*fp16", out_ptr=out, M="i32",
        N="i32", K="i32"), dict(GROUP=32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                                HAS_OFFSET=True, **(dict(STAGES=4) if dot else {})))
    if dot:
        assert "mma" in int4.asm["ptx"]
    kernel = compile_for_hopper(fp8_matmul._fp8_matmul, dict(
        xq_ptr="*fp8e4nv", xs_ptr="*fp32", w_ptr="*fp8e4nv", ws_ptr="*fp32", out_ptr=out, M="i32", N="i32",
        K="i32"), dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, USE_DOT=dot, EVEN_K=True,
                       PDL=True, WAIT=True, FP32_DOT=False, PLANES=max(split_k, 2 if dot else 1)))
    if dot:  # the fp8 product runs on the tensor cores (wgmma on Hopper)
        assert "wgmma" in kernel.asm["ptx"] or "mma" in kernel.asm["ptx"]
    assert "griddepcontrol.wait" in kernel.asm["ptx"]  # kernels/pdl.py CHAIN: it waits in-kernel for its x


def test_the_chained_quantizer_and_split_k_add_compile():
    """kernels/pdl.py CHAIN's other two kernels of the fp8 layer: each triggers its dependents and waits."""
    from kvtriton.backend.kernels import fp8_quant, split_k

    quantizers = [compile_for_hopper(fp8_quant._per_token_fp8, dict(x_ptr="*bf16", q_ptr="*fp8e4nv",
                                                                    scale_ptr="*fp32", K="i32"),
                                     dict(FP8_MAX=448.0, MIN_SCALE=1e-12, BLOCK_K=block_k, PDL=True, SWIGLU=swiglu),
                                     warps=warps)
                  for block_k, swiglu, warps in ((2048, False, 4), (8192, True, 8))]  # o_proj's, down_proj's
    planes = compile_for_hopper(split_k._add_planes, dict(planes_ptr="*fp32", out_ptr="*bf16", MN="i32"),
                                dict(SPLIT_K=4, BLOCK=1024, PDL=True))
    for kernel in (*quantizers, planes):
        assert "griddepcontrol.launch_dependents" in kernel.asm["ptx"]
        assert "griddepcontrol.wait" in kernel.asm["ptx"]


def test_the_chained_bf16_matmul_compiles():
    """kernels/pdl_matmul.py CHAIN: the 16-bit decode matmul lets its dependents launch, waits in-kernel for its x,
    and runs on the tensor cores, split along K or not, or ending in the SwiGLU, or handing on 4 planes of partial
    sums whatever its split (PLANES_INTO_NORM)."""
    from kvtriton.backend.kernels import pdl_matmul

    for split_k, swiglu, block_n, planes in ((1, False, 128, 1), (4, False, 128, 4), (1, True, 128, 1),
                                             (1, False, 16, 1), (1, False, 32, 4), (2, False, 32, 4)):
        kernel = compile_for_hopper(pdl_matmul._pdl_matmul, dict(
            x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", out_ptr="*bf16" if planes == 1 else "*fp32", M="i32",
            N="i32", K="i32"), dict(HAS_BIAS=False, BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=64, SPLIT_K=split_k,
                                    EVEN_K=True, PDL=True, WAIT=True, FP32_DOT=False, SWIGLU=swiglu, PLANES=planes))
        assert "griddepcontrol.launch_dependents" in kernel.asm["ptx"]
        assert "griddepcontrol.wait" in kernel.asm["ptx"]
        assert "wgmma" in kernel.asm["ptx"] or "mma" in kernel.asm["ptx"]
    compile_for_hopper(pdl_matmul._swiglu, dict(gate_up_ptr="*bf16", out_ptr="*bf16", I="i32"), dict(BLOCK=1024))


def test_the_decode_matmuls_take_their_row_count_unspecialized():
    """A row count the graphs did not capture (an eager step's) must not compile a new variant mid-serving
    (tile_config.ROWS_NOT_SPECIALIZED)."""
    from kvtriton.backend.kernels import pdl_matmul

    for fn in (fp8_matmul._fp8_matmul, pdl_matmul._pdl_matmul, int4_matmul._int4_matmul,
               int4_matmul._int4_dot_matmul):
        assert [p.name for p in fn.params if p.do_not_specialize] == ["M"], fn.fn.__name__


def test_int4_dequantize_compiles():
    compile_for_hopper(int4_matmul._int4_dequantize, dict(
        q_ptr="*u8", scale_ptr="*fp16", zero_ptr="*u8", offset_ptr="*fp16", out_ptr="*bf16", N="i32", K="i32"),
        dict(GROUP=32, BLOCK_N=16, BLOCK_K=256, HAS_OFFSET=True))


def test_the_prefill_attention_kernel_takes_its_step_metadata_unspecialized():
    """Block-table widths, sequence counts and the alignment of the step's metadata views change from step to step;
    none may compile a variant mid-serving."""
    from kvtriton.backend.kernels import paged_prefill_attention as prefill

    params = prefill._paged_prefill_attention.params
    assert [p.name for p in params if p.do_not_specialize] == ["num_seqs", "stride_table"]
    assert [p.name for p in params if p.do_not_specialize_on_alignment] == ["tables_ptr", "query_start_ptr",
                                                                            "context_lens_ptr"]


@pytest.mark.parametrize("query_stride", [0, 4], ids=["varlen", "uniform"])
def test_the_prefill_attention_kernel_compiles(query_stride):
    """The varlen form's programs find their sequence in a loop over the query starts with an early return;
    the fixed-stride (verify) form keeps its grid of (tile, sequence)."""
    from kvtriton.backend.kernels import paged_prefill_attention as prefill

    types = dict(q_ptr="*bf16", k_pool="*bf16", v_pool="*bf16", out_ptr="*bf16", tables_ptr="*i64",
                 query_start_ptr="*i64", context_lens_ptr="*i64", qk_scale="fp32", num_seqs="i32", stride_qn="i32",
                 stride_qh="i32", stride_on="i32", stride_oh="i32", stride_table="i32")
    compile_for_hopper(prefill._paged_prefill_attention, types, dict(
        NUM_KV_HEADS=8, GROUP=4, BLOCK_G=4, HEAD_DIM=64, BLOCK_SIZE=16, BLOCK_M=32, BLOCK_N=32,
        BLOCK_S=prefill.SEQS_PER_PASS, QUERY_STRIDE=query_stride), warps=8)
