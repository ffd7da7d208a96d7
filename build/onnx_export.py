"""Export the step graph (backend/runners/step_graph.py) of a loaded model to ONNX, self-described by metadata.

Plain ONNX ops (Gather, MatMul, Softmax, Where, ...), so onnxruntime on any
execution provider and TensorRT's parser both take it; the one exception is
an int4 graph for onnxruntime, whose weights are com.microsoft MatMulNBits
(build/onnx_int4.py). The graph's metadata carries what a runner must agree
with (block size, KV shape and dtype, vocabulary): a runner refuses a graph
that disagrees with its engine config instead of producing garbage.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from kvtriton.backend.models.dtypes import DTYPE_NAMES
from kvtriton.backend.models.llama import LlamaForCausalLM
from kvtriton.backend.models.quantization import QuantizedLinear
from kvtriton.backend.runners.graph_spec import GraphSpec, set_metadata
from kvtriton.backend.runners.step_graph import DYNAMIC_AXES, INPUT_NAMES, OUTPUT_NAMES, StepGraph, example_inputs

OPSET = 19  # DequantizeLinear with fp16/bf16 scales needs >= 19 (fp32 scales: 13); int4 for tensorrt: 21
_TWO_GIB = 2**31  # protobuf's limit: larger models keep their weights in an external data file


# precision -> the dtype the model is loaded (and traced) in; int8's and int4's is their default activation dtype.
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32,
              "int4": torch.float32}
WEIGHT_ONLY = ("int8", "int4")  # traced in the activations' dtype, whichever it is


def export_step_graph(model: LlamaForCausalLM, path: str | Path, block_size: int, precision: str,
                      runtime: str = "onnxruntime") -> GraphSpec:
    """Trace `model` into an ONNX file at `path`; returns its spec.

    The model must already be in the precision's dtype (PRECISIONS). int8 and int4 are traced in
    the activations' dtype (the model's: fp32, fp16 or bf16). int8: a float model's MatMul weights
    become int8 + DequantizeLinear to that dtype (build/onnx_int8.py). int4: the model must be loaded
    quantized (load_model(..., quantization="int4")), and its stored weights become `runtime`'s
    format: MatMulNBits for onnxruntime, blocked DequantizeLinear for tensorrt (build/onnx_int4.py).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = next(model.parameters()).dtype
    if dtype != PRECISIONS[precision] and precision not in WEIGHT_ONLY:
        raise ValueError(f"precision {precision} needs the model in {PRECISIONS[precision]}, it is in {dtype}")
    quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
    if quantized != (precision == "int4"):
        raise ValueError("precision int4 exports a model loaded with quantization='int4'" if precision == "int4"
                         else f"precision {precision} exports a float model; this one is already quantized")
    cfg = model.config
    spec = GraphSpec(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, block_size,
                     DTYPE_NAMES[dtype], precision)
    path = Path(path)
    inputs = example_inputs(model, block_size=block_size, dtype=dtype)
    from kvtriton.build.onnx_int4 import dense_linears, rewrite_quantized_matmuls

    with torch.no_grad(), warnings.catch_warnings(), dense_linears(model, dtype) as stored:
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python values are expected
        torch.onnx.export(StepGraph(model).eval(), inputs, str(path), input_names=INPUT_NAMES,
                          output_names=OUTPUT_NAMES, dynamic_axes=DYNAMIC_AXES, opset_version=OPSET, dynamo=False)
    import onnx

    proto = onnx.load(str(path))
    if precision == "int8":
        from kvtriton.build.onnx_int8 import quantize_matmul_weights

        quantize_matmul_weights(proto)
    elif precision == "int4":
        rewrite_quantized_matmuls(proto, stored, runtime)
    _declare_output_shapes(proto, spec)
    set_metadata(proto, spec)
    save_onnx(proto, path)
    return spec


def _declare_output_shapes(proto, spec: GraphSpec) -> None:
    """The tracer leaves some static output dims symbolic; declare the contract exactly."""
    kv = [spec.num_layers, "batch", "tokens", spec.num_kv_heads, spec.head_dim]
    shapes = {"logits": ["batch", spec.vocab_size], "new_k": kv, "new_v": kv}
    for output in proto.graph.output:
        dims = output.type.tensor_type.shape.dim
        for dim, value in zip(dims, shapes[output.name], strict=True):
            if isinstance(value, int):
                dim.dim_value = value
            else:
                dim.dim_param = value


def save_onnx(proto, path: str | Path) -> None:
    """Save, checked; weights go to `<name>.data` beside it when they exceed protobuf's 2 GiB limit."""
    import onnx

    path = Path(path)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    large = weight_bytes >= _TWO_GIB - (64 << 20)  # headroom for the graph itself
    onnx.save_model(proto, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data" if large else None)
    onnx.checker.check_model(str(path))
