"""INT8 weight-only quantization of an exported step graph: int8 initializers + per-channel DequantizeLinear.

Every MatMul whose right operand is a 2-D float initializer `(in, out)` (the
exporter's layout of an nn.Linear weight) gets `MatMul(x, DequantizeLinear(Wq,
scale, 0, axis=1))`: one scale per output channel, symmetric, the same numbers
as backend/models/int8.py. Explicit Q/DQ is how precision is expressed for
TensorRT 10+ (implicit INT8 calibration is gone), and onnxruntime runs it
as is. The embedding table stays float: its Gather reads only the step's rows.
"""

from __future__ import annotations

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
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    new_nodes = []
    done = 0
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None or len(weight.dims) != 2 or weight.data_type not in FLOAT_TYPES:
            new_nodes.append(node)
            continue
        if users[weight.name] != 1:
            raise ValueError(f"initializer {weight.name} feeds {users[weight.name]} nodes; cannot quantize in place")
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


def raw_tensor(name: str, tensor: torch.Tensor, data_type: int):
    """An initializer from raw bytes (numpy has no bfloat16)."""
    from onnx import helper

    raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, data_type, list(tensor.shape), raw, raw=True)
