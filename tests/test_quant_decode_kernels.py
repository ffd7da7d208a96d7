"""The quantized decode kernels compute what the fp8 and int4 layers they replace compute.

  - kernels/skinny_matmul.py's fused kernels (RMSNorm prologue, residual and SwiGLU epilogues) reading fp8
    (W8A8, x quantized per token inside the kernel) and int4 weights, against the layers' own forward;
  - kernels/fp8_matmul.py and kernels/int4_matmul.py under every tile form the benchmark sweeps
    (broadcast, tl.dot, split-K), against the dequantized reference;
  - a quantized model's fused decode step (models/llama_decode.py) against its forward + compute_logits.

Runs on CUDA (the gpu-marked test also in a CUDA graph); on a CPU-only machine only under Triton's
interpreter (TRITON_INTERPRET=1 with triton installed), otherwise skips.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU)", allow_module_level=True)

from kvtriton.backend.kernels import fp8_matmul, int4_matmul, skinny_matmul  # noqa: E402
from kvtriton.backend.kernels.fp8_matmul import fp8_matmul_with  # noqa: E402
from kvtriton.backend.kernels.fp8_quant import silu_mul_per_token_fp8  # noqa: E402
from kvtriton.backend.kernels.int4_matmul import int4_matmul_with  # noqa: E402
from kvtriton.backend.kernels.tile_config import ROW_BUCKETS, Tile  # noqa: E402
from kvtriton.backend.models.fp8 import FP8_MAX, MIN_SCALE, Fp8Linear, fp8_supported, per_token_fp8_reference  # noqa: E402
from kvtriton.backend.models.int4 import Int4Linear, quantize_groupwise  # noqa: E402
from kvtriton.backend.models.llama import LlamaMLP, RMSNorm  # noqa: E402
from kvtriton.backend.models.llama_decode import decode_weight  # noqa: E402

from tests.tiny_model import decode_step_both_ways, small_decode_model  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# bf16 is what the GPU runs; the interpreter's tl.dot is wrong in bf16, so on the CPU the kernels run in fp16.
DTYPE = torch.bfloat16 if CUDA else torch.float16
FP8_OK = not CUDA or torch.cuda.get_device_capability() >= (8, 9)


# Triton's interpreter rounds fp32 -> e4m3 differently from the GPU's and torch's round-to-nearest-even, but
# converts values that e4m3 holds exactly. So on the CPU the fp8 tests feed activations that quantize exactly:
# e4m3 values times 2^-7 with one at 448 in every row (so the per-token scale is the power of two 2^-7).
INTERPRETED = not CUDA


def close(a, b, atol=3e-2, rtol=3e-2):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def e4m3_exact(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    """(m, k) values x with x / (max|x| / 448) exact in e4m3, and x exact in fp16/bf16."""
    v = (torch.randn(m, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn).float()
    v[:, 0] = 448.0
    return v * 2.0**-7


def quantized_layer(kind: str, n: int, k: int, seed: int = 0, offset: bool = False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    if kind == "fp8":
        linear = torch.nn.Linear(k, n, bias=False)
        linear.weight.data = w
        return Fp8Linear.from_linear(linear).to(DEVICE)
    q = quantize_groupwise(w, 32)
    if offset:  # GGUF Q4_1's form: zero point 0 and a float offset per group
        q.zero_point = torch.zeros_like(q.zero_point)
        q.offset = (torch.randn(q.scale.shape, generator=g) * 0.01).to(torch.float16)
    return Int4Linear.from_group_quantized(q, device=DEVICE)


def layer_forward(layer, x):
    """What the layer stands for, in fp32, rounded to x's dtype: int4, x times the dequantized weight; fp8, the
    per-token quantized x (PyTorch's form of kernels/fp8_quant.py) times the e4m3 weight, both scaled."""
    if isinstance(layer, Int4Linear):
        return (x.float() @ layer.dequantized_weight().to(x.device).T).to(x.dtype)
    xq, x_scale = per_token_fp8_reference(x)
    w = layer.weight.float() * layer.weight_scale.reshape(-1, 1)  # (N16, K)
    return ((xq.float() * x_scale) @ w.T)[:, :layer.out_features].to(x.dtype)


@pytest.mark.skipif(not FP8_OK, reason="fp8 needs compute capability 8.9+")
@pytest.mark.parametrize("kind", ["fp8", "int4"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n, k, blocks", [(96, 256, None), (40, 576, None), (64, 512, (4, 256, 1)),
                                         (96, 256, (16, 256, 8)), (40, 576, (8, 1024, 2))])
def test_skinny_linear_with_residual_reads_quantized_weights(kind, m, n, k, blocks):
    """(64, 512, BLOCK_K 256): a tile sees half of each row, so fp8 takes its activation scale in a first pass.
    (16, 256, 8) and (8, 1024, 2): the forms of skinny_matmul.TILES' one-row fp8 tiles (whole rows, many rows
    a program on 8 warps, or few on 2)."""
    layer = quantized_layer(kind, n, k, offset=kind == "int4" and n == 40)
    g = torch.Generator().manual_seed(1)
    x = e4m3_exact(m, k, g) if kind == "fp8" and INTERPRETED else torch.randn(m, k, generator=g) * 2
    x, res = x.to(DEVICE, DTYPE), torch.randn(m, n, generator=g).to(DEVICE, DTYPE)
    got = skinny_matmul.linear(x, decode_weight(layer), residual=res, blocks=blocks)
    assert got.shape == (m, n) and got.dtype == DTYPE
    close(got, res.float() + layer_forward(layer, x).float())


@pytest.mark.skipif(not FP8_OK, reason="fp8 needs compute capability 8.9+")
@pytest.mark.parametrize("kind", ["fp8", "int4"])
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("blocks", [None, (16, 256, 8)], ids=str)  # the heuristic's tile, and a TILES form
def test_skinny_rms_norm_linear_and_swiglu_read_quantized_weights(kind, m, blocks):
    k, n = 192, 80  # K not a power of two: the int4 tile masks the groups past K
    g = torch.Generator().manual_seed(2)
    eps = 1e-5
    norm = RMSNorm(k, eps)
    norm.weight.data = 1 + 0.1 * torch.randn(k, generator=g)
    x = 3 * torch.randn(m, k, generator=g)
    if kind == "fp8" and INTERPRETED:  # rows of +-1/4 normalise to +-1 exactly; the norm weight quantizes exactly
        eps, norm.eps = 0.0, 0.0
        x = torch.where(x > 0, 0.25, -0.25)
        norm.weight.data = e4m3_exact(1, k, g)[0]
    norm, x = norm.to(DEVICE, DTYPE), x.to(DEVICE, DTYPE)
    layer = quantized_layer(kind, 2 * n, k, seed=3)
    xn = norm(x)
    logits = skinny_matmul.rms_norm_linear(x, norm.weight, eps, decode_weight(layer), out_dtype=torch.float32,
                                           blocks=blocks)
    assert logits.dtype == torch.float32 and logits.shape == (m, 2 * n)
    close(logits, layer_forward(layer, xn))
    gate, up = layer_forward(layer, xn).split(n, dim=-1)
    close(skinny_matmul.rms_norm_swiglu(x, norm.weight, eps, decode_weight(layer), blocks=blocks), F.silu(gate) * up)


@pytest.mark.parametrize("gemv", [("gemv", 1, None), ("gemv", 8, 1, 2), ("gemv", 4, 2, 1)], ids=str)
@pytest.mark.parametrize("k, offset", [(576, True), (1024, False)])  # 576: 18 groups, the last step masked
def test_one_row_int4_gemv_computes_every_fused_op(gemv, k, offset):
    """kernels/int4_gemv.py (the int4 one-row kernel: fp16 pairs on CUDA, fp32 under the interpreter) through
    skinny_matmul's entry points: linear + residual, RMSNorm + linear in fp32, RMSNorm + SwiGLU; 2n = 86 rows is
    no multiple of 4, so the last program's rows are masked."""
    n, eps = 43, 1e-5
    g = torch.Generator().manual_seed(7)
    layer = quantized_layer("int4", 2 * n, k, seed=5, offset=offset)
    norm = RMSNorm(k, eps)
    norm.weight.data = 1 + 0.1 * torch.randn(k, generator=g)
    norm = norm.to(DEVICE, DTYPE)
    x = (torch.randn(1, k, generator=g) * 3).to(DEVICE, DTYPE)
    res = torch.randn(1, 2 * n, generator=g).to(DEVICE, DTYPE)
    weight = decode_weight(layer)
    close(skinny_matmul.linear(x, weight, residual=res, blocks=gemv), res.float() + layer_forward(layer, x).float())
    xn = norm(x)
    logits = skinny_matmul.rms_norm_linear(x, norm.weight, eps, weight, out_dtype=torch.float32, blocks=gemv)
    assert logits.dtype == torch.float32 and logits.shape == (1, 2 * n)
    close(logits, layer_forward(layer, xn))
    gate, up = layer_forward(layer, xn).split(n, dim=-1)
    close(skinny_matmul.rms_norm_swiglu(x, norm.weight, eps, weight, blocks=gemv), F.silu(gate) * up)


@pytest.mark.parametrize("k", [1024, 2048])  # one step (x converted once a program), two steps a block
def test_one_row_int4_gemv_persistent_programs_cover_every_block(k):
    """More row blocks than programs (300 rows in blocks of 2, one program an SM): each program walks several
    blocks, loading the next block's weights ahead; every output row is computed once, none is lost."""
    layer = quantized_layer("int4", 300, k, seed=9)
    norm = RMSNorm(k, 1e-5).to(DEVICE, DTYPE)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(10)).to(DEVICE, DTYPE)
    got = skinny_matmul.rms_norm_linear(x, norm.weight, 1e-5, decode_weight(layer), blocks=("gemv", 2, 1, 1))
    close(got, layer_forward(layer, norm(x)))


def test_one_row_int4_gemv_keeps_large_activations_finite():
    """The fp16 pairs hold x / 64: activations in the thousands (LLMs' outlier features) stay finite and close."""
    layer = quantized_layer("int4", 64, 512, seed=6)
    x = torch.randn(1, 512, generator=torch.Generator().manual_seed(8))
    x[0, ::37] = 3000.0
    x = x.to(DEVICE, DTYPE)
    got = skinny_matmul.linear(x, decode_weight(layer), blocks=("gemv", 2, None))
    assert torch.isfinite(got).all()
    expected = layer_forward(layer, x).float()
    close(got, expected, atol=3e-2 * expected.abs().max().item(), rtol=3e-2)


TILES = [Tile(1, 4, 128), Tile(4, 8, 64, split_k=2, warps=1), Tile(16, 16, 64, split_k=4, dot=True),
         Tile(32, 32, 128, dot=True), Tile(64, 64, 256, split_k=2, dot=True, stages=4),
         Tile(64, 32, 256, dot=True, stages=4)]  # fp8_matmul.TILES' 64-row qkv and o_proj tile


@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_int4_matmul_every_tile_form(tile, m):
    layer = quantized_layer("int4", 72, 512, offset=True)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(4)).to(DEVICE, DTYPE)
    got = int4_matmul_with(x, layer.qweight, layer.scale, layer.zero_point, layer.offset, 32, tile)
    assert got.shape == (m, 72) and got.dtype == DTYPE
    close(got, layer_forward(layer, x))


@pytest.mark.parametrize("tile", [t for t in TILES if t.dot], ids=str)
def test_int4_dot_form_takes_fp32_activations(tile):
    """The dot form splits 16-bit activations from 32-bit words of x; fp32 ones it reads with stride 2."""
    layer = quantized_layer("int4", 72, 512)
    x = torch.randn(33, 512, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    got = int4_matmul_with(x, layer.qweight, layer.scale, layer.zero_point, layer.offset, 32, tile)
    assert got.dtype == torch.float32
    close(got, layer_forward(layer, x))


@pytest.mark.parametrize("table", [fp8_matmul, int4_matmul], ids=lambda module: module.__name__.rsplit(".", 1)[-1])
def test_every_captured_batch_size_has_a_measured_tile_for_each_shape_the_table_knows(table):
    """The runner captures a decode graph per ROW_BUCKETS size; a bucket missing from a table takes the kernel's
    heuristic, untimed (the 8-row bucket once did: the 1B fp8 step at batch 5-8 ran at 3.4 ms against 0.9 at 16)."""
    shapes = {(kernel, n, k) for kernel, _, n, k in table.TILES}
    missing = [(kernel, rows, n, k) for kernel, n, k in sorted(shapes) for rows in ROW_BUCKETS
               if rows <= table.MAX_ROWS and (kernel, rows, n, k) not in table.TILES]
    assert not missing


@pytest.mark.parametrize("rows", [3, 4, 5, 8])
def test_unmeasured_shapes_past_two_rows_take_a_tensor_core_tile(rows):
    """The broadcast tile holds ~8K weights: at 8 rows one output wide, every program re-reading all of x."""
    assert fp8_matmul.heuristic_tile(rows, 576, 576).dot
    assert int4_matmul.heuristic_tile(rows, 576, 576, 32).dot


@pytest.mark.skipif(not FP8_OK, reason="fp8 needs compute capability 8.9+")
def test_quantized_matmuls_at_six_rows_of_an_unmeasured_shape_compute_their_products():
    x = torch.randn(6, 192, generator=torch.Generator().manual_seed(8)).to(DEVICE, DTYPE)
    fp8_layer, int4_layer = quantized_layer("fp8", 80, 192), quantized_layer("int4", 80, 192, offset=True)
    xq, x_scale = per_token_fp8_reference(x)
    close(fp8_matmul.fp8_matmul(xq, x_scale, fp8_layer.weight, fp8_layer.weight_scale, DTYPE)[:, :80],
          layer_forward(fp8_layer, x))
    got = int4_matmul.int4_matmul(x, int4_layer.qweight, int4_layer.scale, int4_layer.zero_point, int4_layer.offset, 32)
    close(got, layer_forward(int4_layer, x))


@pytest.mark.skipif(not (CUDA and FP8_OK), reason="the 1B-class shapes need a GPU of compute capability 8.9+")
@pytest.mark.parametrize("key", sorted(k for k, v in fp8_matmul.TILES.items() if v != fp8_matmul.CUBLAS))
def test_every_measured_fp8_tile_computes_its_product(key):
    """Each fp8_matmul.TILES entry (swept at its own shape: split-K, pipeline depth) at that shape."""
    _, bucket, n, k = key
    m = max(1, bucket - 3)  # a partial row tile where the bucket has one
    layer = quantized_layer("fp8", n, k, seed=bucket)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n)).to(DEVICE, DTYPE)
    xq, x_scale = per_token_fp8_reference(x)
    got = fp8_matmul_with(xq, x_scale, layer.weight, layer.weight_scale, DTYPE, Tile(*fp8_matmul.TILES[key]))
    close(got[:, :n], layer_forward(layer, x))


@pytest.mark.skipif(not FP8_OK, reason="fp8 needs compute capability 8.9+")
@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize("m, k", [(1, 512), (5, 480), (33, 512)])  # 480: a K tail inside the last tile
def test_fp8_matmul_every_tile_form(tile, m, k):
    layer = quantized_layer("fp8", 72, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(5)).to(DEVICE, DTYPE)
    xq, x_scale = per_token_fp8_reference(x)
    got = fp8_matmul_with(xq, x_scale, layer.weight, layer.weight_scale, DTYPE, tile)[:, :72]
    assert got.dtype == DTYPE
    close(got, layer_forward(layer, x))


@pytest.mark.skipif(not FP8_OK, reason="fp8 needs compute capability 8.9+")
@pytest.mark.parametrize("m, i", [(1, 2048), (3, 8192), (5, 96)])  # 96: a row tail masked off
def test_the_swiglu_quantizer_equals_the_swiglu_then_the_per_token_quantizer(m, i):
    g = torch.Generator().manual_seed(m)
    # Gates of 32 (silu(32) is 32 in fp32) times e4m3_exact ups: each h / scale is exact in e4m3, so the codes
    # must equal the reference's under any rounding (the interpreter's is not round-to-nearest-even).
    gate_up = torch.cat([torch.full((m, i), 32.0), e4m3_exact(m, i, g)], dim=1).to(DEVICE, DTYPE)
    hq, scale = silu_mul_per_token_fp8(gate_up, FP8_MAX, MIN_SCALE)
    assert hq.shape == (m, i) and hq.dtype == torch.float8_e4m3fn
    hq_ref, scale_ref = per_token_fp8_reference(32.0 * gate_up[:, i:].float())
    assert torch.equal(hq.float(), hq_ref.float()) and torch.equal(scale, scale_ref)
    # Random gates: silu's negative side and small values; the scales (each row's largest |silu(gate) * up|)
    # are the reference's, and on the GPU the codes too, but for a rare last-bit tie of the division.
    gate_up = (torch.randn(m, 2 * i, generator=g) * 3).to(DEVICE, DTYPE)
    hq, scale = silu_mul_per_token_fp8(gate_up, FP8_MAX, MIN_SCALE)
    gate, up = gate_up.float().split(i, dim=1)
    hq_ref, scale_ref = per_token_fp8_reference(F.silu(gate) * up)  # in fp32, as the kernel (and Inductor)
    torch.testing.assert_close(scale, scale_ref)
    if CUDA:
        assert (hq.float() != hq_ref.float()).float().mean() < 1e-3


@pytest.mark.skipif(not FP8_OK, reason="fp8 needs compute capability 8.9+")
@pytest.mark.skipif(not CUDA and fp8_supported(torch.device("cpu")) is not None, reason="no CPU fp8 _scaled_mm here")
def test_an_fp8_mlp_forms_and_quantizes_its_swiglu_in_one_kernel():
    torch.manual_seed(0)
    mlp = LlamaMLP(SimpleNamespace(hidden_size=128, intermediate_size=256)).to(DEVICE)  # the two sizes it reads
    for name in ("gate_up_proj", "down_proj"):  # quantized where they live: a CUDA layer takes the Triton kernels
        setattr(mlp, name, Fp8Linear.from_linear(getattr(mlp, name)))
    down = mlp.down_proj
    if not CUDA:  # a CPU layer has no Triton kernels of its own; under the interpreter it may take this one
        down._quantize_swiglu = silu_mul_per_token_fp8
    routed = []
    fused = down.swiglu_forward
    down.swiglu_forward = lambda gate_up, planes=False: routed.append(gate_up.shape) or fused(gate_up, planes)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2)).to(DEVICE, DTYPE)
    got = mlp(x)
    assert routed == [(3, 512)]
    hq, h_scale = silu_mul_per_token_fp8(mlp.gate_up_proj(x), FP8_MAX, MIN_SCALE)  # its codes: see the test above
    w = down.weight.float() * down.weight_scale.reshape(-1, 1)
    close(got, ((hq.float() * h_scale) @ w.T).to(DTYPE))
    assert mlp(x.float()).dtype == torch.float32  # the caller's dtype, as the unfused form (the matmul writes bf16)
    # A step with adapters, one on the down projection: its delta needs h itself, so the unfused form serves.
    seen = []
    down.lora = SimpleNamespace(delta=lambda h, adapters: seen.append(h.shape) or torch.zeros_like(got))
    mlp(x, adapters=object())
    assert routed == [(3, 512)] * 2 and seen == [(3, 256)]


@pytest.mark.skipif(not FP8_OK, reason="fp8 needs compute capability 8.9+")
@pytest.mark.parametrize("quantization", [
    pytest.param("fp8", marks=pytest.mark.skipif(
        INTERPRETED, reason="the interpreter's e4m3 rounding is not round-to-nearest-even (the kernel tests above "
                            "cover fp8 on the CPU)")),
    "int4"])
@pytest.mark.parametrize("batch", [1, 2])
def test_quantized_decode_step_equals_the_model_forward(quantization, batch, request):
    if INTERPRETED and quantization == "int4":  # kvtriton's CPU GEMV takes fp32 or bf16, not the fp16 model here
        request.getfixturevalue("torch_int4_kernels")
    from kvtriton.backend.models.llama_decode import fusable

    model = small_decode_model(DTYPE, DEVICE, quantization=quantization)
    assert fusable(model) is None
    got, expected, _, _ = decode_step_both_ways(model, [7 + 9 * i for i in range(batch)], blocks_per_seq=2)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    close(got, expected, atol=6e-2, rtol=6e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or not FP8_OK, reason="needs a CUDA GPU with fp8 (compute capability 8.9+)")
@pytest.mark.parametrize("kind", ["fp8", "int4"])
def test_quantized_skinny_and_decode_matmuls_replay_in_a_cuda_graph(kind):
    """No host sync and no autotuning: the kernels capture, and the replay follows new inputs."""
    layer = quantized_layer(kind, 2048, 2048)
    x = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
    skinny_matmul.linear(x, decode_weight(layer), residual=res)  # compile outside the capture
    layer(torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16))
    x16 = torch.randn(16, 2048, device="cuda", dtype=torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused = skinny_matmul.linear(x, decode_weight(layer), residual=res)
        unfused = layer(x16)
    x.copy_(torch.randn_like(x))
    x16.copy_(torch.randn_like(x16))
    graph.replay()
    close(fused, res.float() + layer_forward(layer, x).float())
    close(unfused, layer_forward(layer, x16), atol=5e-2)
