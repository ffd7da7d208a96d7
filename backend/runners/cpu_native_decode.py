"""NativeDecodeLayers: a CPU decode step's decoder layers in one C++ call, for models whose every projection runs
one of the CPU's weight-only kernels: kvtriton's int4 GEMV (the default model served from its GGUF), int8 groups
as two 4-bit planes through it (GGUF Q8_0 and Q6_K blocks), or int8 per channel through ATen's
_weight_int8pack_mm (a fused projection whose parts a GGUF stores in mixed types: a Q4_K_M file's qkv with a Q6_K
v), each with its bias where it has one (Qwen2's q/k/v), and Qwen3's QK-norm.

Inductor's graphs (runners/cpu_compiled_decode.py) leave Python between the kernels they call: at one sequence
the default model's step was ~10 ms, ~5 of it the GEMV's memory-bound matmuls and ~2 of it Python (dynamo's
guards, inductor's wrapper, op dispatch), while the second core waited (perf, 2-core Sapphire Rapids).
kernels/cpu_decode_layers.cpp runs all 30 layers in one call: the same GEMV, and the RMSNorms, RoPE, K/V
writes, attention and SwiGLU in C++ between the matmuls, computing what the eager ops compute (that file says
how). The compiled graphs still serve the batches this does not: from the model's dense-copy rows on
(models/loader.py add_dense_weights), where the matmuls are the dense copies'.

LoRA adapters (models/lora.py) ride along: a step whose rows carry adapters passes each row's adapter, and the
C++ layers add each projection's StackedLoRA addition through kernels/cpu_lora.cpp, the function the eager
steps' StackedLoRA.delta calls on the CPU, so an adapted token's numbers do not depend on the kind of step.
"""

from __future__ import annotations

import torch

from kvtriton.backend.models.int4 import Int4Linear
from kvtriton.backend.models.int8 import Int8Linear

PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
# How a projection multiplies, as kernels/cpu_decode_layers.cpp numbers them: (weights, scales) are the GEMV's
# (packed, scale_zeros) for the first two, (int8 codes, bf16 scales) for the third.
GEMV, TWO_PLANES, INT8_CHANNEL = 0, 1, 2


def _projection(module) -> tuple[int, torch.Tensor, torch.Tensor, int] | None:
    """(kind, weights, scales, group size) of a projection the C++ layers multiply as its own matmul does, or
    None (another precision or layer type, PyTorch's int4 kernel)."""
    if type(module) is Int4Linear and module.gemv_operands is not None:
        return (GEMV, *module.gemv_operands, module.group_size)
    if type(module) is Int8Linear and module.gemv_operands is not None:
        return (TWO_PLANES, *module.gemv_operands, module.group_size)
    if type(module) is Int8Linear and module._scale_bf16 is not None:
        return (INT8_CHANNEL, module.qweight, module._scale_bf16, 0)
    return None


def _norms(layer) -> list:
    """The layer's RMSNorms: the two around its blocks, and QK-norm's two where it has them."""
    attn = layer.self_attn
    return [layer.input_layernorm, layer.post_attention_layernorm,
            *((attn.q_norm, attn.k_norm) if attn.has_qk_norm else ())]


def _modules(model) -> list:
    return [layer.get_submodule(name) for layer in model.layers for name in PROJECTIONS]


def why_not_native(model, kv) -> str | None:
    """None when NativeDecodeLayers serves this model and KV cache, else why not (one phrase)."""
    if not hasattr(torch.ops.kvtriton, "decode_layers"):
        return "the CPU int4 kernels are not loaded"
    cfg = model.config
    if model.norm.weight.dtype != torch.float32:  # the activations' dtype (an embedding may be quantized)
        return "the activations are not fp32"
    if any(pool.dtype not in (torch.float32, torch.float8_e4m3fn) for pool in kv.k):
        return "the KV cache is neither fp32 nor fp8"
    if cfg.hidden_size % 16 or cfg.head_dim % 32 or cfg.head_dim > 256 or cfg.intermediate_size % 16:
        return "the hidden size, head_dim or MLP width is not a multiple of the kernel's vector (or head_dim > 256)"
    if any(_projection(module) is None for module in _modules(model)):
        return "a projection runs none of the CPU's int4/int8 kernels (another precision, or PyTorch's int4 kernel)"
    if any(module.bias is not None and module.bias.dtype != torch.float32 for module in _modules(model)):
        return "a projection's bias is not fp32"
    norms = [norm for layer in model.layers for norm in _norms(layer)]
    if len({norm.eps for norm in norms}) != 1:
        return "the layers' RMSNorm eps differ"
    return None


class NativeDecodeLayers:
    """layers(x, rope, slots, tables, mask) -> x after every decoder layer, the K/V written; see why_not_native."""

    def __init__(self, model, kv, scale: float):
        layers = model.layers
        self.norms = [norm.weight.detach() for layer in layers
                      for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        self.qk_norms = [norm.weight.detach() for layer in layers for norm in _norms(layer)[2:]]  # [] without
        modules = _modules(model)
        self.kinds, self.weights, self.scales, self.group_sizes = map(list, zip(*map(_projection, modules)))
        self.biases = [torch.empty(0) if m.bias is None else m.bias.detach() for m in modules]
        self.intermediate_size = model.config.intermediate_size
        # Each projection's stacked LoRA adapters (empty tensors where none adapts it; all empty without adapters).
        loras = [getattr(m, "lora", None) for m in modules]
        assert all(lora is None or lora.native for lora in loras), "the C++ layers add the adapters in fp32 only"
        empty = torch.empty(0)
        self.lora = ([empty if lora is None else lora.a for lora in loras],
                     [empty if lora is None else lora.b_t for lora in loras],
                     [empty.long() if lora is None else lora.columns for lora in loras],
                     [1 if lora is None else lora.block for lora in loras]) if any(loras) else ([], [], [], [])
        self._no_adapters = torch.empty(0, dtype=torch.int64)
        self.eps = layers[0].input_layernorm.eps
        self.num_heads = model.config.num_heads
        self.k_pools, self.v_pools = list(kv.k), list(kv.v)
        self.scale = scale
        # Batches from the dense copies' rows on multiply by the copies: the compiled graphs serve those.
        self.max_batch = model.dense_rows.decode - 1 if model.dense_rows is not None else None

    def serves(self, batch: int) -> bool:
        return self.max_batch is None or batch <= self.max_batch

    def __call__(self, x, rope, slots, tables, mask, token_adapters=None) -> torch.Tensor:
        """token_adapters: each row's LoRA adapter (B,) int64, 1-based (0: the base model), or None for none."""
        cos, sin = rope
        adapted = token_adapters is not None and self.lora[0]
        return torch.ops.kvtriton.decode_layers(
            x, cos.contiguous(), sin.contiguous(), self.norms, self.qk_norms, self.weights, self.scales, self.kinds,
            self.group_sizes, self.biases, self.k_pools, self.v_pools, slots, tables, mask.contiguous(),
            self.intermediate_size, self.eps, self.scale, self.num_heads,
            *(self.lora if adapted else ([], [], [], [])),
            token_adapters.contiguous() if adapted else self._no_adapters)
