"""FP16/BF16 step graphs: weights and matmuls in half precision, RMSNorm statistics and softmax in fp32."""

from __future__ import annotations

import pytest
import torch

from kvtriton.backend.models.loader import load_model
from kvtriton.backend.runners.graph_spec import read_spec
from kvtriton.build.onnx_export import export_step_graph

from tests.onnx_reference import half_graph_vs_fp32

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")


def input_types(proto) -> dict[str, dict[str, int]]:
    """op type -> {node name: element type of its first input}, from ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.initializer]
             if hasattr(v, "type")}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    out: dict[str, dict[str, int]] = {}
    for node in inferred.graph.node:
        out.setdefault(node.op_type, {})[node.name] = types.get(node.input[0]) if node.input else None
    return out


@pytest.mark.parametrize("precision, dtype, elem", [
    ("fp16", torch.float16, onnx.TensorProto.FLOAT16), ("bf16", torch.bfloat16, onnx.TensorProto.BFLOAT16)])
def test_half_graph_accumulates_norms_and_softmax_in_fp32(tiny_folder, tmp_path, precision, dtype, elem):
    path = tmp_path / f"{precision}.onnx"
    export_step_graph(load_model(tiny_folder, dtype=dtype), path, block_size=4, precision=precision)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    weights = [t for t in proto.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == elem for t in weights)
    types = input_types(proto)
    F = onnx.TensorProto.FLOAT
    assert len(types["Softmax"]) == 2 and set(types["Softmax"].values()) == {F}  # one per layer, in fp32
    assert len(types["ReduceMean"]) == 5 and set(types["ReduceMean"].values()) == {F}  # 2 norms/layer + final
    assert set(types["MatMul"].values()) == {elem}  # projections and attention products in half
    spec = read_spec(path)
    assert (spec.kv_dtype, spec.precision) == ({"fp16": "float16", "bf16": "bfloat16"}[precision], precision)
    graph_output = {o.name: o.type.tensor_type.elem_type for o in proto.graph.output}
    assert graph_output == {"logits": F, "new_k": elem, "new_v": elem}


def test_fp16_graph_in_onnxruntime_stays_close_to_fp32(tiny_folder, tmp_path):
    path = tmp_path / "fp16.onnx"
    export_step_graph(load_model(tiny_folder, dtype=torch.float16), path, block_size=4, precision="fp16")
    got, expected = half_graph_vs_fp32(path, tiny_folder)
    assert abs(got - expected).max() < 2e-3 * abs(expected).max() + 1e-2
    assert (got.argmax(-1) == expected.argmax(-1)).all()
