"""INT4 step graphs from a quantized model's stored numbers: MatMulNBits for onnxruntime, blocked INT4
DequantizeLinear (opset 21) for TensorRT; both compute exactly the dequantized weights' math."""

from __future__ import annotations

import collections

import pytest
import torch

from kvtriton.backend.models.gguf_checkpoint import convert_gguf
from kvtriton.backend.models.int4 import pack_nibbles
from kvtriton.backend.models.loader import load_model
from kvtriton.backend.models.quantization import QuantizedLinear
from kvtriton.backend.runners.graph_spec import read_spec
from kvtriton.backend.runners.step_graph import INPUT_NAMES, StepGraph, example_inputs
from kvtriton.build.model_builder import BuildConfig
from kvtriton.build.onnx_export import export_step_graph

from tests.test_gguf_checkpoint import write_tiny_gguf
from tests.test_int4 import BF16_LOGITS, QUANT_TYPES
from tests.test_onnx_runner import greedy, prompts

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

BLOCK = 4


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(root / "tiny.gguf", quant_types=QUANT_TYPES)
    return root / "tiny.gguf", convert_gguf(root / "tiny.gguf", root / "hf")


def export(model, path, target):
    """-> the graph, and its op counts with "group term" counting the layers that carry a group term."""
    export_step_graph(model, path, block_size=BLOCK, precision="int4", runtime=target)
    proto = onnx.load(str(path))
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    ops["group term"] = sum(node.name.endswith("_term_mm") for node in proto.graph.node)
    return proto, ops


def outputs(model, path=None, kernels=True):
    """The step's outputs (logits, new_k, new_v) from onnxruntime on `path` (as written: no fusions), or from
    torch on `model`: through its CPU kernels, or (kernels=False) through the dequantized weights in fp32."""
    inputs = example_inputs(model, batch=2, tokens=3, block_size=BLOCK)
    if path is not None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        feed = {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)}
        return [torch.from_numpy(o) for o in ort.InferenceSession(str(path), options).run(None, feed)]
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    saved = [(m._packed, m.qweight) for m in layers]
    try:
        if not kernels:  # the stored codes back (a served CPU model reads them from the kernel's copy), no kernel
            for m in layers:
                q = m.group_quantized()
                m.qweight, m._packed = pack_nibbles(q.codes) if q.bits == 4 else q.codes, None
        with torch.no_grad():
            return list(StepGraph(model)(*inputs))
    finally:
        for m, (packed, qweight) in zip(layers, saved):
            m._packed, m.qweight = packed, qweight


def max_diff(got, expected) -> list[float]:
    return [(g - e).abs().max().item() for g, e in zip(got, expected)]


def test_onnxruntime_graph_is_matmulnbits_over_the_stored_codes(tiny_folder, tmp_path):
    model = load_model(tiny_folder, quantization="int4")
    proto, ops = export(model, tmp_path / "int4.onnx", "onnxruntime")
    onnx.checker.check_model(proto)
    assert ops["MatMulNBits"] == 2 * 4 + 1 and ops["DequantizeLinear"] == 0  # every Linear, lm_head included
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (4, 32, 0)
    b = onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == nodes[0].input[1]))
    qkv = model.layers[0].self_attn.qkv_proj
    assert b.shape == (qkv.out_features, qkv.in_features // 32, 16)
    stored = pack_nibbles(qkv.group_quantized().codes)  # the codes, as stored (on the CPU: read back from the GEMV's)
    assert (torch.from_numpy(b.copy()).reshape(qkv.out_features, -1) == stored).all()
    assert read_spec(tmp_path / "int4.onnx").precision == "int4"
    # Integer zero points live in the kernel: no group term. The graph is the dequantized weights' math.
    assert ops["group term"] == 0
    assert max(max_diff(outputs(model, tmp_path / "int4.onnx"), outputs(model, kernels=False))) < 1e-4
    got, expected = outputs(model, tmp_path / "int4.onnx")[0], outputs(model)[0]  # vs the torch int4 kernels
    assert (got - expected).abs().max() < BF16_LOGITS * expected.abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_tensorrt_graph_is_symmetric_blocked_int4_dequantize(tiny_folder, tmp_path):
    model = load_model(tiny_folder, quantization="int4", group_size=64)
    proto, ops = export(model, tmp_path / "int4.onnx", "tensorrt")
    onnx.checker.check_model(proto, full_check=True)
    assert {(o.domain or "ai.onnx", o.version) for o in proto.opset_import} == {("ai.onnx", 21)}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 9 and ops["MatMulNBits"] == 0
    assert all({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} == {"axis": 0, "block_size": 64}
               for n in dq)
    assert all(len(n.input) == 2 for n in dq)  # no zero point: TensorRT refuses non-zero ones
    inits = {t.name: t for t in proto.graph.initializer}
    assert {inits[n.input[0]].data_type for n in dq} == {onnx.TensorProto.INT4}
    # Asymmetric groups: (q - 8) in the blocks, the rest of the zero point as one group term per layer.
    assert ops["group term"] == 9
    assert max(max_diff(outputs(model, tmp_path / "int4.onnx"), outputs(model, kernels=False))) < 1e-4


@pytest.mark.parametrize("target", ["onnxruntime", "tensorrt"])
def test_gguf_blocks_export_as_stored(tiny_gguf, tmp_path, target):
    """Q4_1 (float offsets: a group term in both graphs), Q4_0, and the Q8_0 lm_head as 8-bit groups."""
    gguf_path, folder = tiny_gguf
    model = load_model(folder, quantization="int4", gguf=gguf_path)
    proto, ops = export(model, tmp_path / f"{target}.onnx", target)
    got, expected = outputs(model, tmp_path / f"{target}.onnx"), outputs(model, kernels=False)
    if target == "onnxruntime":
        bits = [onnx.helper.get_attribute_value(a) for n in proto.graph.node if n.op_type == "MatMulNBits"
                for a in n.attribute if a.name == "bits"]
        assert sorted(bits) == [4] * 8 + [8]
        assert ops["group term"] == 7  # the Q4_1 layers (Q4_0's zero point 8 is in the kernel)
        # 8-bit groups run with int8 activations (see onnx_int4): the logits are close, the layers exact.
        assert (got[0] - expected[0]).abs().max() < 1e-2 * expected[0].abs().max()
        assert max(max_diff(got[1:], expected[1:])) < 1e-4
    else:
        inits = {t.name: t.data_type for t in proto.graph.initializer}
        types = collections.Counter(inits[n.input[0]] for n in proto.graph.node if n.op_type == "DequantizeLinear")
        assert types == {onnx.TensorProto.INT4: 8, onnx.TensorProto.INT8: 1}
        assert ops["group term"] == 7  # Q4_1's offsets; Q4_0 (q - 8) and Q8_0 are symmetric
        assert max(max_diff(got, expected)) < 1e-4


def test_engine_decodes_an_int4_graph_like_the_torch_int4_runner(tiny_folder, tmp_path):
    """onnxruntime computes in fp32, the torch kernels in bf16: on the tiny model's sharp logits the greedy
    tokens still agree."""
    path = tmp_path / "int4.onnx"
    export_step_graph(load_model(tiny_folder, quantization="int4"), path, block_size=BLOCK, precision="int4")
    batch = prompts(4)
    expected = greedy(tiny_folder, batch, quantization="int4")
    got = greedy(tiny_folder, batch, runner="onnxruntime", engine_path=str(path))
    agree = sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e)) / sum(map(len, expected))
    assert agree >= 0.9, agree


def test_precision_and_model_must_agree(tiny_folder, tmp_path):
    with pytest.raises(ValueError, match="precision int4 exports a model loaded with quantization='int4'"):
        export_step_graph(load_model(tiny_folder), tmp_path / "a.onnx", BLOCK, "int4")
    with pytest.raises(ValueError, match="precision fp32 exports a float model"):
        export_step_graph(load_model(tiny_folder, quantization="int4"), tmp_path / "b.onnx", BLOCK, "fp32")
    with pytest.raises(ValueError, match="--group-size applies to --precision int4 only"):
        BuildConfig(checkpoint="x", out="y", precision="int8", group_size=64)
    with pytest.raises(ValueError, match="--group-size must be one of 32, 64, 128"):
        BuildConfig(checkpoint="x", out="y", precision="int4", group_size=16)
    assert BuildConfig(checkpoint="x", out="y", precision="int4", runtime="tensorrt").model_dtype == torch.float16


def test_manifest_records_the_quantization_and_a_mismatched_runner_refuses_it(tiny_gguf, tiny_folder, tmp_path,
                                                                               monkeypatch):
    """The manifest says format, group size, where the numbers came from and the layout; onnxruntime refuses
    weights laid out for TensorRT (and the reverse) in one line naming the rebuild."""
    import dataclasses

    from kvtriton.backend.config import EngineConfig
    from kvtriton.backend.engine.llm_engine import LLMEngine
    from kvtriton.backend.runners.manifest import Manifest, check_quantization
    from kvtriton.build.model_builder import build_model

    monkeypatch.setenv("KVTRITON_CACHE", str(tmp_path / "cache"))
    gguf_path, gguf_folder = tiny_gguf
    model_dir = build_model(BuildConfig(checkpoint=str(gguf_path), out=str(tmp_path / "a"), precision="int4",
                                        block_size=BLOCK), say=lambda _: None)
    manifest = Manifest.read(model_dir / "1")
    assert manifest.quantization == {
        "format": "int4", "group_size": 32, "layout": "MatMulNBits", "runtime": "onnxruntime",
        "source": {"gguf Q4_0 blocks as stored (lossless, g32)": 1, "gguf Q4_1 blocks as stored (lossless, g32)": 7,
                   "gguf Q8_0 blocks as stored (lossless, g32)": 1}}
    floats = build_model(BuildConfig(checkpoint=str(tiny_folder), out=str(tmp_path / "b"), precision="int4",
                                     group_size=64, block_size=BLOCK), say=lambda _: None)
    assert Manifest.read(floats / "1").quantization["source"] == {"int4 g64 quantized from float weights": 9}
    assert Manifest.read(floats / "1").quantization["group_size"] == 64

    graph = str(model_dir / "1" / "model.onnx")
    for_tensorrt = dataclasses.replace(manifest, runner="tensorrt", quantization={
        **manifest.quantization, "layout": "DequantizeLinear blocked int4 (opset 21)", "runtime": "tensorrt"})
    for_tensorrt.write(model_dir / "1")
    with pytest.raises(ValueError, match=r"int4 weights are laid out as DequantizeLinear blocked int4 \(opset 21\) "
                                         r"for runner=tensorrt, not onnxruntime; .*--runtime onnxruntime$"):
        LLMEngine(EngineConfig(model=str(gguf_folder), device="cpu", block_size=BLOCK, runner="onnxruntime",
                               engine_path=graph))
    with pytest.raises(ValueError, match="laid out as MatMulNBits for runner=onnxruntime, not tensorrt"):
        check_quantization(manifest, "tensorrt", graph)
    with pytest.raises(ValueError, match="no quantization record; rebuild"):
        check_quantization(dataclasses.replace(manifest, quantization={}), "onnxruntime", graph)
    with pytest.raises(ValueError, match="precision int4 but quantization format none"):
        check_quantization(dataclasses.replace(manifest, quantization={"format": "none"}), "onnxruntime", graph)
