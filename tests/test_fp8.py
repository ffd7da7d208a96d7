"""FP8 (e4m3) W8A8: per-channel weight scales, per-token activation scales, torch._scaled_mm.

On the CPU the real layer runs (this torch's CPU _scaled_mm) against an fp32 emulation written out
here as the test's reference; the Triton activation quantizer and CUDA graphs run with the gpu marker.
"""

from __future__ import annotations

import pytest
import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.models.fp8 import FP8, Fp8Linear, fp8_supported, per_token_fp8_reference, quantize_fp8_per_channel
from kvtriton.backend.models.loader import load_model

from tests.cuda_graph_helpers import replayed_on_new_input
from tests.tiny_model import make_tiny_model

CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
# The CPU layer runs this torch's CPU _scaled_mm, which some builds (torch 2.11) take with per-tensor scales only.
WHY_NOT_CPU = fp8_supported(torch.device("cpu"))
needs_cpu_fp8 = pytest.mark.skipif(WHY_NOT_CPU is not None, reason=str(WHY_NOT_CPU))


def emulated_w8a8(x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """The test reference: both operands rounded to e4m3 with their scales, multiplied in fp32."""
    w = linear.weight.float()
    w_scale = w.abs().amax(1, keepdim=True) / 448  # (N, 1)
    x_scale = x.float().abs().amax(1, keepdim=True) / 448  # (M, 1)
    wq = (w / w_scale).to(torch.float8_e4m3fn).float() * w_scale
    xq = (x.float() / x_scale).to(torch.float8_e4m3fn).float() * x_scale
    return xq @ wq.T


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_weights_and_activations_round_trip_within_e4m3_precision():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    wq, scale = quantize_fp8_per_channel(w)
    assert wq.dtype == FP8 and scale.shape == (64,)
    assert (wq.float().abs().amax(1) == 448).all()  # each row's largest weight lands on e4m3's largest value
    err = (wq.float() * scale[:, None] - w).abs() / w.abs().clamp(min=scale[:, None] * 2**-6)
    assert err.max() <= 2**-4  # 3 mantissa bits: half an ulp is 1/16 relative
    xq, x_scale = per_token_fp8_reference(torch.zeros(2, 16))
    assert (xq.float() == 0).all() and (x_scale > 0).all()  # an all-zero row: no 0/0


@needs_cpu_fp8
@pytest.mark.parametrize("m", [1, 5, 33])
def test_fp8_linear_equals_the_emulated_w8a8_matmul(m):
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(128, 96, bias=True)
    x = torch.randn(m, 128, generator=g).to(torch.bfloat16)
    layer = Fp8Linear.from_linear(linear)
    expected = emulated_w8a8(x, linear) + linear.bias.detach()
    got = layer(x)
    assert got.dtype == torch.bfloat16 and got.shape == (m, 96)
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=1e-2)  # bf16 output rounding
    dense = x.float() @ linear.weight.detach().T + linear.bias.detach()
    assert (got.float() - dense).abs().mean() < 0.05 * dense.abs().mean()  # and close to the unquantized layer


@needs_cpu_fp8
def test_fp8_pads_outputs_and_refuses_inputs_scaled_mm_cannot_take():
    linear = torch.nn.Linear(128, 10, bias=False)  # 10 outputs: padded to 16 inside, sliced off
    x = torch.randn(3, 128)
    torch.testing.assert_close(Fp8Linear.from_linear(linear)(x), emulated_w8a8(x, linear), atol=2e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="lm_head has 120 inputs; torch._scaled_mm needs a multiple of 16"):
        Fp8Linear.from_linear(torch.nn.Linear(120, 16), name="lm_head")


@needs_cpu_fp8
def test_fp8_model_decodes_like_the_float_model(tiny):
    """The tiny model's logits are sharp: fp8 weights and activations keep almost every greedy token."""
    reference = load_model(tiny)
    fp8 = load_model(tiny, quantization="fp8")
    assert sum(isinstance(m, Fp8Linear) for m in fp8.modules()) == 9
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    prompts = ["the quick brown fox", "paris is the capital of"]
    outputs = {}
    for quantization in ("none", "fp8"):
        engine = LLMEngine(EngineConfig(model=str(tiny), device="cpu", block_size=4, quantization=quantization))
        try:
            outputs[quantization] = [o.token_ids for o in engine.generate(prompts, params)]
        finally:
            engine.shutdown()
    same = sum(a == b for e, g in zip(outputs["none"], outputs["fp8"]) for a, b in zip(e, g))
    assert same >= 0.8 * sum(map(len, outputs["none"])), outputs
    del reference


def test_fp8_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="quantization must be none, auto, int8, int4 or fp8"):
        EngineConfig(quantization="fp4")
    with pytest.raises(ValueError, match="applies to the torch runner"):
        EngineConfig(quantization="fp8", runner="onnxruntime", engine_path="x.onnx")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")
def test_fp8_on_cuda_triton_quantizer_and_cuda_graph():
    from kvtriton.backend.kernels.fp8_quant import per_token_fp8
    from kvtriton.backend.models.fp8 import FP8_MAX, MIN_SCALE

    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16) * 3
    q, scale = per_token_fp8(x, FP8_MAX, MIN_SCALE)
    q_ref, scale_ref = per_token_fp8_reference(x)
    torch.testing.assert_close(scale, scale_ref)
    assert (q.float() != q_ref.float()).float().mean() < 1e-3  # fp32 division order: a rare last-bit tie
    linear = torch.nn.Linear(2048, 4096, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = Fp8Linear.from_linear(linear)
    static_x = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    static_out = replayed_on_new_input(layer, static_x)
    torch.testing.assert_close(static_out.float(), emulated_w8a8(static_x, linear), atol=5e-2, rtol=2e-2)
    moved = Fp8Linear.from_linear(torch.nn.Linear(64, 32)).to("cuda")  # made on the CPU: the kernels follow it
    assert moved.takes_swiglu and moved._matmul is not None


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with FP8 (compute capability 8.9+)")
@pytest.mark.parametrize("quantization", ["fp8", "int4"])
def test_quantized_engine_on_cuda_decodes_like_bf16(tiny, quantization, fresh_dynamo):
    """The whole CUDA path: torch.compile'd layers and CUDA-graph decode with the fp8 / int4 layers inside."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = ["the quick brown fox", "paris is the capital of", "one two three four"]
    outputs = {}
    for q in ("none", quantization):
        engine = LLMEngine(EngineConfig(model=str(tiny), device="cuda", block_size=4, num_kv_blocks=64,
                                        quantization=q))
        try:
            outputs[q] = [o.token_ids for o in engine.generate(prompts, params)]
        finally:
            engine.shutdown()
    same = sum(a == b for e, g in zip(outputs["none"], outputs[quantization]) for a, b in zip(e, g))
    assert same >= 0.8 * sum(map(len, outputs["none"])), outputs


def test_only_attention_output_projections_quantize_their_input_outside_the_compiled_graph(tiny):
    """o_proj's input is the attention kernel's output, which no compiled kernel makes: its layer quantizes
    with the one-launch Triton op even under torch.compile; the others leave it to inductor's fusion."""
    model = load_model(tiny, quantization="fp8")
    layer = model.layers[0]
    assert layer.self_attn.o_proj.unfused_input
    assert not any(m.unfused_input for m in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj))
