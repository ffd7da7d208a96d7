"""INT8 weight-only: per-channel symmetric quantization, the torch Int8Linear and the ONNX DequantizeLinear graph."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

from kvtriton.backend.models.int8 import Int8Linear, quantize_per_channel
from kvtriton.backend.models.loader import load_model
from kvtriton.backend.models.quantization import quantize_linears
from kvtriton.backend.runners.graph_spec import read_spec
from kvtriton.backend.runners.step_graph import INPUT_NAMES, StepGraph, example_inputs
from kvtriton.build.onnx_export import export_step_graph

from tests.onnx_reference import half_graph_vs_fp32

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")


def test_quantize_per_channel_error_is_at_most_half_a_step_per_row():
    w = torch.randn(32, 64) * torch.logspace(-3, 1, 32)[:, None]  # rows of very different range
    w[5] = 0.0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (32,)
    assert q.abs().max() <= 127 and (q.abs().amax(1)[torch.arange(32) != 5] == 127).all()
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert (q[5] == 0).all() and scale[5] == 1.0


def test_int8_linear_matches_its_dequantized_weight():
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(3, 7, 96)
    expected = nn.functional.linear(x, q.dequantized_weight(), lin.bias)
    got = q(x)
    assert got.shape == (3, 7, 40) and got.dtype == torch.float32
    # bf16 activations in the CPU kernel: relative error of a few bf16 ulps.
    assert (got - expected).abs().max() < 2e-2 * expected.abs().max()


def test_quantize_linears_replaces_every_projection_and_keeps_the_embedding(tiny_folder):
    model = load_model(tiny_folder)
    names = quantize_linears(model, "int8")
    assert len(names) == 2 * 4 + 1  # qkv, o, gate_up, down per layer + lm_head
    assert set(names.values()) == {"int8 per channel"}
    loaded = load_model(tiny_folder, quantization="int8")
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == len(names)
    assert torch.equal(loaded.lm_head.qweight, model.lm_head.qweight)
    assert isinstance(model.lm_head, Int8Linear) and model.embed_tokens.weight.dtype == torch.float32
    ids = torch.tensor([1, 2, 3])
    assert model.compute_logits(model.embed_tokens(ids)).shape == (3, model.config.vocab_size)


def test_onnx_int8_graph_computes_with_the_dequantized_weights(tiny_folder, tmp_path):
    """ORT on the int8 graph == torch on a model whose Linear weights were replaced by q * scale."""
    path = tmp_path / "int8.onnx"
    export_step_graph(load_model(tiny_folder), path, block_size=4, precision="int8")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert ops["DequantizeLinear"] == ops["MatMul"] - 2 * 2  # all weight MatMuls; 2 attention matmuls per layer
    int8 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 9 and read_spec(path).precision == "int8"

    reference = load_model(tiny_folder)
    with torch.no_grad():
        for module in list(reference.modules()):
            if isinstance(module, nn.Linear):
                q, scale = quantize_per_channel(module.weight)
                module.weight = nn.Parameter(q.float() * scale[:, None])  # unties lm_head from the embedding
    inputs = example_inputs(reference, batch=2, tokens=3, block_size=4)
    with torch.no_grad():
        expected = StepGraph(reference)(*inputs)
    feed = {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)}
    # The graph as written (no fusions): exactly the dequantized weights' math.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    got = ort.InferenceSession(str(path), options).run(None, feed)
    for g, e in zip(got, expected):
        assert abs(g - e.numpy()).max() < 1e-4
    # onnxruntime's default CPU fusion (MatMulNBits, activations quantized per block on the fly,
    # 16x faster than fp32 compute on the 135M model) stays within a fraction of a percent of the logits.
    fused = ort.InferenceSession(str(path)).run(None, feed)[0]
    assert abs(fused - expected[0].numpy()).max() < 5e-3 * abs(expected[0].numpy()).max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int8_graph_with_half_activations_dequantizes_to_half(tiny_folder, tmp_path, dtype):
    """For GPUs: int8 weights, fp16/bf16 activations and KV; the scales are in the activation dtype."""
    path = tmp_path / "int8_half.onnx"
    export_step_graph(load_model(tiny_folder, dtype=dtype), path, block_size=4, precision="int8")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    elem = {torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}[dtype]
    scales = [t for t in proto.graph.initializer if t.name.endswith("_scale")]
    assert len(scales) == 9 and {t.data_type for t in scales} == {elem}
    spec = read_spec(path)
    assert spec.precision == "int8" and spec.kv_dtype == str(dtype).removeprefix("torch.")
    if dtype == torch.float16:  # onnxruntime on the CPU has the fp16 kernels, not bf16 ones
        got, expected = half_graph_vs_fp32(path, tiny_folder)
        assert (got.argmax(-1) == expected.argmax(-1)).all()
        assert abs(got - expected).max() < 0.02 * abs(expected).max()
