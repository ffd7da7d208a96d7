"""INT4 step graphs: a quantized model's stored weights (models/quantization.py) as ONNX, in each runtime's format.

export_step_graph traces the model with every QuantizedLinear swapped for a float nn.Linear that holds
its dequantized weight (`dense_linears`); `rewrite_quantized_matmuls` then puts the stored numbers back
in place of those MatMul weights (found by content), with nothing re-quantized:

  onnxruntime  com.microsoft MatMulNBits: bits 4 (or 8, for GGUF Q8_0 groups), block_size = the group
               size, B (N, K/g, g*bits/8) uint8 with the even input in the low nibble, scales (N, K/g) in
               the activations' dtype, zero points uint8 (N, ceil(K/g*bits/8)) packed like B. One fused
               kernel per layer on the CPU and CUDA execution providers.
  tensorrt     DequantizeLinear (opset 21) of a blocked INT4 (or INT8) initializer (K, N), block_size g
               along axis 0, then MatMul: TensorRT's weight-only GEMM. TensorRT takes symmetric blocks
               only (a non-zero zero point fails the parse), so codes are stored as q - 8.

What a block format leaves over, per group g and output n, is one float term:
    y[m, n] += sum_g (sum of x[m, k] over group g) * b[g, n]
computed as (x @ E) @ b with E (K, G) the 0/1 group-membership matrix: exact, and 1/g of the
weight's size. The tensorrt graph adds it wherever the zero point is not 8 (b = s (8 - zp) + offset);
the onnxruntime graph only for float offsets (GGUF Q4_1: b = m), since MatMulNBits takes integer zero
points in the kernel but float ones only on a slow path.
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch
from torch import nn

from kvtriton.backend.models.int4 import pack_nibbles
from kvtriton.backend.models.quantization import GroupQuantized, QuantizedLinear
from kvtriton.build.onnx_int8 import FLOAT_TYPES, check_sole_reader, matmul_weights, raw_tensor

TARGETS = ("onnxruntime", "tensorrt")
# MatMulNBits accuracy_level: 0 computes in the activations' dtype (exact to the dequantized weights);
# 4 quantizes activations to int8 per block on the fly: faster, but on the default model it took the
# text's perplexity from 106 to 143 and changed the top token at 16% of positions
# (benchmarks/precision_bench.py, "onnxruntime int4 level 4").
ACCURACY_EXACT, ACCURACY_INT8_ACTIVATIONS = 0, 4
OPSET = 21  # DequantizeLinear with block_size, and the INT4 type
_ELEM_TYPES = {dtype: elem for elem, dtype in FLOAT_TYPES.items()}  # torch dtype -> ONNX element type


def weight_key(weight_in_out: np.ndarray | torch.Tensor) -> str:
    """A MatMul weight (in, out) identified by its bytes: how the rewrite finds each layer after tracing."""
    data = weight_in_out.contiguous().view(torch.uint8).numpy() if isinstance(weight_in_out, torch.Tensor) \
        else np.ascontiguousarray(weight_in_out).view(np.uint8)
    return f"{tuple(weight_in_out.shape)}:{hashlib.sha256(data.tobytes()).hexdigest()}"


@contextlib.contextmanager
def dense_linears(model: nn.Module, dtype: torch.dtype):
    """Within: every QuantizedLinear of `model` is an nn.Linear holding its dequantized weight in `dtype`.
    Yields {weight_key of the (in, out) weight: the stored numbers}; restores the layers on exit."""
    swapped, stored = [], {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, QuantizedLinear):
            continue
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, dtype=dtype)
        with torch.no_grad():
            dense.weight.copy_(module.dequantized_weight().to(dtype))
            if module.bias is not None:
                dense.bias.copy_(module.bias.to(dtype))
        stored[weight_key(dense.weight.detach().T)] = module.group_quantized()
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, dense)
        swapped.append((parent, attr, module))
    try:
        yield stored
    finally:
        for parent, attr, module in swapped:
            setattr(parent, attr, module)


def rewrite_quantized_matmuls(proto, stored: dict[str, GroupQuantized], target: str,
                              accuracy_level: int = ACCURACY_EXACT) -> int:
    """Replace, in `proto` (onnx.ModelProto), every MatMul weight found in `stored` by its quantized form
    for `target`; returns how many. Every stored weight must be found (else the trace changed its bytes).
    accuracy_level: onnxruntime's, for the 4-bit layers."""
    from onnx import helper

    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    graph = proto.graph
    new_nodes, group_sums, done = [], {}, set()
    for node, weight in matmul_weights(graph):
        key = None if weight is None else weight_key(_initializer_tensor(weight))
        if key not in stored:  # not a float MatMul weight, or one the model keeps in float
            new_nodes.append(node)
            continue
        check_sole_reader(graph, weight)
        q, dtype, base = stored[key], FLOAT_TYPES[weight.data_type], weight.name
        graph.initializer.remove(weight)
        x, y = node.input[0], node.output[0]
        if target == "onnxruntime":
            main_out = _matmul_nbits(graph, new_nodes, q, dtype, base, x, accuracy_level)
            term = q.offset.float().T if q.offset is not None else None  # (G, N)
        else:
            main_out = _dequantize_matmul(graph, new_nodes, node, q, dtype, base, x)
            term = None
            if q.bits == 4 and (q.offset is not None or bool((q.zero_point != 8).any())):
                term = (q.scale.float() * (8 - q.zero_point.float())).T  # (G, N)
                if q.offset is not None:
                    term = term + q.offset.float().T
        if term is None:
            new_nodes[-1].output[0] = y
        else:
            sums = _group_sums(graph, new_nodes, group_sums, x, q.shape[1], q.group_size, dtype, weight.data_type)
            graph.initializer.append(raw_tensor(base + "_group_term", term.to(dtype), weight.data_type))
            new_nodes.append(helper.make_node("MatMul", [sums, base + "_group_term"], [base + "_term"],
                                              name=base + "_term_mm"))
            new_nodes.append(helper.make_node("Add", [main_out, base + "_term"], [y], name=base + "_add"))
        done.add(key)
    if missing := set(stored) - done:
        raise RuntimeError(f"{len(missing)} quantized weights were not found in the traced graph")
    del graph.node[:]
    graph.node.extend(new_nodes)
    if target == "onnxruntime":
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    else:
        for opset in proto.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, OPSET)
        proto.ir_version = max(proto.ir_version, 10)  # INT4 tensors
    return len(done)


def _matmul_nbits(graph, nodes, q: GroupQuantized, dtype, base, x, accuracy_level) -> str:
    from onnx import helper, numpy_helper

    n, k = q.shape
    g, groups = q.group_size, k // q.group_size
    if g & (g - 1) or g < 16:
        raise ValueError(f"{base}: MatMulNBits needs a power-of-two group size >= 16, got {g}")
    if q.bits == 4:
        b = pack_nibbles(q.codes).reshape(n, groups, g // 2)
        zp = q.zero_point if q.zero_point is not None else torch.full(q.scale.shape, 8, dtype=torch.uint8)
        if groups % 2:
            zp = torch.cat([zp, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
        zero_points = pack_nibbles(zp)  # (N, ceil(G / 2))
    else:
        b = (q.codes.to(torch.int16) + 128).to(torch.uint8).reshape(n, groups, g)
        zero_points = torch.full((n, groups), 128, dtype=torch.uint8)
    elem = _ELEM_TYPES[dtype]
    graph.initializer.extend([
        numpy_helper.from_array(b.contiguous().numpy(), base + "_q"),
        raw_tensor(base + "_scales", q.scale.to(dtype), elem),
        numpy_helper.from_array(zero_points.contiguous().numpy(), base + "_zero_points"),
    ])
    out = base + "_nbits"
    # 8-bit: MLAS has no fp32-compute kernel for it (measured 170-200 ms for the 135M model's lm_head vs
    # 1-4 ms with int8 activations), so those quantize activations per block of 32 on the fly.
    level = accuracy_level if q.bits == 4 else ACCURACY_INT8_ACTIVATIONS
    nodes.append(helper.make_node("MatMulNBits", [x, base + "_q", base + "_scales", base + "_zero_points"], [out],
                                  name=base + "_matmul_nbits", domain="com.microsoft", K=k, N=n, bits=q.bits,
                                  block_size=g, accuracy_level=level))
    return out


def _dequantize_matmul(graph, nodes, matmul, q: GroupQuantized, dtype, base, x) -> str:
    from onnx import TensorProto, helper

    elem = _ELEM_TYPES[dtype]
    codes_in_out = q.codes.T.contiguous()  # (K, N)
    if q.bits == 4:
        signed = (codes_in_out.to(torch.int16) - 8).to(torch.uint8) & 0x0F  # two's complement nibbles
        flat = signed.reshape(1, -1)
        if flat.shape[1] % 2:
            flat = torch.cat([flat, torch.zeros(1, 1, dtype=torch.uint8)], dim=1)
        weights = helper.make_tensor(base + "_int4", TensorProto.INT4, list(codes_in_out.shape),
                                     pack_nibbles(flat).numpy().tobytes(), raw=True)
    else:
        weights = helper.make_tensor(base + "_int8", TensorProto.INT8, list(codes_in_out.shape),
                                     codes_in_out.to(torch.int8).numpy().tobytes(), raw=True)
    graph.initializer.extend([weights, raw_tensor(base + "_scale", q.scale.T.contiguous().to(dtype), elem)])
    nodes.append(helper.make_node("DequantizeLinear", [weights.name, base + "_scale"], [base + "_dequantized"],
                                  name=base + "_dq", axis=0, block_size=q.group_size))
    out = base + "_mm"
    nodes.append(helper.make_node("MatMul", [x, base + "_dequantized"], [out], name=matmul.name or base + "_matmul"))
    return out


def _group_sums(graph, nodes, cache: dict, x: str, k: int, g: int, dtype, elem) -> str:
    """x (..., K) -> (..., K/g): each group's sum, as x @ E; one E per (K, g) and one product per x."""
    from onnx import helper

    if (x, k, g) in cache:
        return cache[(x, k, g)]
    name = f"group_membership_{k}_{g}"
    if name not in {t.name for t in graph.initializer}:
        membership = torch.zeros(k, k // g, dtype=dtype)
        membership[torch.arange(k), torch.arange(k) // g] = 1
        graph.initializer.append(raw_tensor(name, membership, elem))
    out = f"{x}_group_sums_{g}"
    nodes.append(helper.make_node("MatMul", [x, name], [out], name=out))
    cache[(x, k, g)] = out
    return out


def _initializer_tensor(t) -> torch.Tensor:
    dtype = FLOAT_TYPES[t.data_type]
    if t.raw_data:
        return torch.frombuffer(bytearray(t.raw_data), dtype=dtype).view(*t.dims)
    from onnx import numpy_helper

    return torch.from_numpy(numpy_helper.to_array(t).copy()).view(*t.dims)

