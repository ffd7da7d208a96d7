"""INT8 weight-only quantization of an exported step graph: int8 initializers + per-channel DequantizeLinear.

Every MatMul whose right operand is a 2-D float initializer `(in, out)` (the
exporter's layout of an nn.Linear weight) gets `MatMul(x, DequantizeLinear(Wq,
scale, 0, axis=1))`: one scale per output channel, symmetric, the same numbers
as backend/models/int8.py. Explicit Q/DQ is how precision is expressed for
TensorRT 10+ (implicit INT8 calibration is gone), and onnxruntime runs it
as is. The embedding table stays float: its Gather reads only the step's rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kvtriton.backend.models.int8 import quantize_per_channel

# ONNX element type -> torch dtype of the float weights this pass quantizes (scales keep that dtype;
# non-fp32 scales need opset >= 19, see onnx_export.OPSET).
FLOAT_TYPES = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16}


def quantize_matmul_weights(proto) -> int:
    """Rewrite `proto` (onnx.ModelProto) in place; returns how many weights were quantized."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    new_nodes = []
    done = 0
    for node, weight in matmul_weights(graph):
        if weight is None:
            new_nodes.append(node)
            continue
        check_sole_reader(graph, weight)
        dtype = FLOAT_TYPES[weight.data_type]
        w = torch.frombuffer(bytearray(weight.raw_data), dtype=dtype).view(*weight.dims)  # (in, out)
        q, scale = quantize_per_channel(w.T)  # (out, in), (out,) fp32
        base = weight.name
        graph.initializer.remove(weight)
        graph.initializer.extend([
            numpy_helper.from_array(q.T.contiguous().numpy(), base + "_int8"),  # (in, out) int8
            raw_tensor(base + "_scale", scale.to(dtype), weight.data_type),  # (out,) in the weights' dtype
            numpy_helper.from_array(np.zeros(scale.shape[0], dtype=np.int8), base + "_zero_point"),
        ])
        new_nodes.append(helper.make_node("DequantizeLinear", [base + "_int8", base + "_scale", base + "_zero_point"],
                                          [base + "_dequantized"], name=base + "_dq", axis=1))
        node.input[1] = base + "_dequantized"
        new_nodes.append(node)
        done += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    return done


def matmul_weights(graph) -> Iterator[tuple[Any, Any]]:
    """Each node of `graph` (onnx.GraphProto), in order, with the weight a pass may quantize: the 2-D float
    initializer a MatMul multiplies by on the right (the exporter's layout of an nn.Linear weight, (in, out)),
    else None."""
    initializers = {t.name: t for t in graph.initializer}
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        quantizable = weight is not None and len(weight.dims) == 2 and weight.data_type in FLOAT_TYPES
        yield node, weight if quantizable else None


def check_sole_reader(graph, weight) -> None:
    """A pass replaces `weight` in place, in its MatMul: no other node of `graph` may read it."""
    readers = sum(name == weight.name for node in graph.node for name in node.input)
    if readers != 1:
        raise ValueError(f"initializer {weight.name} feeds {readers} nodes; cannot quantize in place")


def raw_tensor(name: str, tensor: torch.Tensor, data_type: int):
    """An initializer from raw bytes (numpy has no bfloat16)."""
    from onnx import helper

    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, data_type, list(tensor.shape), raw, raw=True)
