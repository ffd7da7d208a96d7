"""The Llama-family decoder (Llama 2/3, SmolLM, Qwen2/2.5, Mistral without sliding window).

Packed, batch-free layout: a step's new tokens from every scheduled sequence are
concatenated into one (N,) vector. Everything here is per token except
attention, which is delegated to an `AttentionContext` that knows the KV
layout (paged pools for the runners, a functional variant for ONNX export).
So one definition serves every runner and the exporter.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kvtriton.backend.models.fp32_logits import fp32_logits, writes_fp32
from kvtriton.backend.models.lora import StepAdapters
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.models.rotary import RotaryEmbedding, apply_rotary

# On the CPU, fp32 products of a few rows take W @ x^T, which streams the weight once, instead of the BLAS
# GEMM x @ W^T, which ran 2-5x slower than one row for 2-5 rows (measured on the default model's shapes, 30
# matrices each, a 2-core EPYC: gate_up 3072 x 576 at 3 rows 120 ms against 24 ms; both equal near 9 rows,
# the GEMM ahead at 17). A speculative verify step has 2 to k + 1 rows per sequence; so have small batches.
SKINNY_ROWS = 8
# compute_logits: up to this many rows take the weight-streaming product. The vocabulary-wide head gains
# further, up to about a hundred rows (the default model's 49152 x 576 head, a 2-core EPYC: 5 rows 39 against
# 100 ms, 32 rows 40 against 70, 64 rows 54 against 78, even from 128).
SKINNY_LOGITS_ROWS = 64
# compute_logits, a quantized head tied to the embedding, whose table stays float (a GGUF's Q8_0 token_embd
# dequantized, or an HF checkpoint's own): from this many rows the table streamed in fp32 beats PyTorch's CPU
# kernels, which do not tile for many rows (same head: 16 rows 38 against 39 ms, 32 rows 40 against 76).
# kvtriton's GEMV does (the same head at 32 rows 4.7 ms, 2-core Sapphire Rapids): a head on it never takes the table.
TIED_TABLE_ROWS = 16

log = logging.getLogger("kvtriton")


def skinny_product(layer: nn.Module, x: torch.Tensor, max_rows: int) -> bool:
    """Whether x @ layer.weight^T takes W @ x^T (see SKINNY_ROWS): a plain fp32 nn.Linear on the CPU, 2 to
    max_rows rows, not while tracing an export (the exported graph keeps the Linear: dynamic rows, quantizable)."""
    # The row count last: under torch.compile each test here is a guard, and one on the rows would split the
    # graph of a quantized model's batches for nothing.
    return (type(layer) is nn.Linear and x.device.type == "cpu" and x.dtype == layer.weight.dtype == torch.float32
            and not torch.jit.is_tracing() and 1 < x.shape[0] <= max_rows)


def linear(layer: nn.Module, x: torch.Tensor, adapters: StepAdapters | None = None,
           planes: bool = False) -> torch.Tensor:
    """layer(x) for x (M, in), through W @ x^T where skinny_product says so; plus each token's LoRA adapter's
    addition where the step has adapted tokens (models/lora.py). A layer given a `decode_matmul` (the CUDA runner
    gives the qkv projection kernels/pdl_matmul.py's) multiplies through it on CUDA. planes (a step the model's
    `delta_planes` covers, no adapters): the layer's `decode_planes`, split-K partial sums for planes_sum, where it
    has one; a layer without hands on its product whole (an fp8 o_proj, whose 64-row tile does not split)."""
    decode_planes = getattr(layer, "decode_planes", None) if planes else None
    if decode_planes is not None:
        return decode_planes(x, layer.weight, layer.bias)
    decode_matmul = getattr(layer, "decode_matmul", None)
    if decode_matmul is not None and x.is_cuda:
        out = decode_matmul(x, layer.weight, layer.bias)
    elif not skinny_product(layer, x, SKINNY_ROWS):
        out = layer(x)
    else:
        out = torch.mm(layer.weight, x.T).T.contiguous()
        out = out if layer.bias is None else out + layer.bias
    lora = getattr(layer, "lora", None) if adapters is not None else None
    return out if lora is None else out + lora.delta(x, adapters)


def planes_sum(delta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A projection's output: as it is (M, N), or its split-K partial sums (P, M, N) fp32 added in plane order and
    rounded once to dtype, as kernels/split_k.py's _add_planes adds them; compiled, inside the kernel that reads
    them (the residual add + RMSNorm)."""
    if delta.dim() == 2:
        return delta
    planes = delta.unbind(0)
    total = planes[0]
    for plane in planes[1:]:
        total = total + plane
    return total.to(dtype)


class AttentionContext(Protocol):
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (N, H, D), k/v (N, Hkv, D) for the step's new tokens -> (N, H, D).
        Implementations store k/v in their cache and attend causally over each sequence's context."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the activation dtype (fp16 overflows the sum of squares), round to
        # the activation dtype, then scale: HF's order. (Not F.rms_norm: ONNX export below opset 23 lacks it.)
        xf = x.float()
        xf = xf * torch.rsqrt(mean_square(xf) + self.eps)
        return self.weight * xf.to(x.dtype)


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """x.pow(2).mean(-1, keepdim=True) of fp32 x. On the CPU summed in fp64: each square is exact there and the
    sum's rounding (~1e-16) sits far below fp32's, so eager aten and a compiled graph's fused loop, which sum
    in different orders, round to the same fp32 mean (fp32 sums in another order differ by ~1 ulp, which the
    rounding to bf16 before an int4 matmul can turn into a moved greedy token). The CPU's compiled decode
    (runners/cpu_compiled_decode.py) thus fuses RMSNorm and still keeps the eager step's logits. Not while
    tracing an export: ONNX graphs stay fp32 (TensorRT has no fp64)."""
    if x.device.type == "cpu" and not torch.jit.is_tracing():
        return x.double().square().mean(-1, keepdim=True).float()
    return x.pow(2).mean(-1, keepdim=True)


class LlamaAttention(nn.Module):
    """The attention block's weights; the attention itself is the AttentionContext's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        # q, k and v fused into one matmul (one weight read per step on decode).
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: each head of q and k RMS-normalised (one weight for all heads) before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    @property
    def has_qk_norm(self) -> bool:
        return hasattr(self, "q_norm")


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, adapters: StepAdapters | None = None, planes: bool = False) -> torch.Tensor:
        """planes: the down projection's split-K partial sums (see `linear`)."""
        down = self.down_proj
        # A gate_up given a `swiglu_matmul` (the CUDA runner, kernels/pdl_matmul.py CHAIN) ends in the SwiGLU;
        # not where a LoRA adapter on it adds to the product before the SwiGLU.
        swiglu_matmul = getattr(self.gate_up_proj, "swiglu_matmul", None)
        if swiglu_matmul is not None and x.is_cuda and (adapters is None or
                                                        getattr(self.gate_up_proj, "lora", None) is None):
            return linear(down, swiglu_matmul(x, self.gate_up_proj.weight), adapters, planes)
        gate_up = linear(self.gate_up_proj, x, adapters)
        # An fp8 down projection quantizes the SwiGLU's product as it forms it (models/fp8.py); not where a LoRA
        # adapter on it needs that product unquantized.
        if getattr(down, "takes_swiglu", False) and (adapters is None or getattr(down, "lora", None) is None):
            return down.swiglu_forward(gate_up, planes)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return linear(down, F.silu(gate) * up, adapters, planes)  # SwiGLU


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)


# A decoder layer is attention_inputs -> AttentionContext.attend -> attention_output. The two
# functions around the attention hold all the per-layer work except the KV cache, and take the layer
# as an argument, so torch.compile can compile each once and reuse it for every layer. A layer's last
# residual add (its MLP output onto x) happens at the start of the next layer's attention_inputs, so
# the compiled graph fuses it with that layer's RMSNorm: one kernel and one pass over x fewer a layer.

def attention_inputs(layer: LlamaDecoderLayer, rope, x: torch.Tensor, delta: torch.Tensor | None,
                     adapters: StepAdapters | None = None):
    """x (N, hidden) plus delta (the previous layer's MLP output, or None) -> that sum, and q (N, H, D),
    k, v (N, Hkv, D): RMSNorm, the fused qkv matmul, QK-norm where the model has it, RoPE (rope None: q and
    k leave unrotated, for an AttentionContext that rotates them itself). adapters: see `linear`."""
    if delta is not None:
        x = x + planes_sum(delta, x.dtype)
    attn = layer.self_attn
    n = x.shape[0]
    qkv = linear(attn.qkv_proj, layer.input_layernorm(x), adapters)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q = q.view(n, attn.num_heads, attn.head_dim)  # (N, H, D)
    k = k.view(n, attn.num_kv_heads, attn.head_dim)  # (N, Hkv, D)
    if attn.has_qk_norm:  # before RoPE, as HF's Qwen3Attention; a rotating AttentionContext gets them normed
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = apply_rotary(q, k, rope)
    return x, q, k, v.view(n, attn.num_kv_heads, attn.head_dim)


def attention_output(layer: LlamaDecoderLayer, x: torch.Tensor, attended: torch.Tensor,
                     adapters: StepAdapters | None = None, planes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, hidden), attended (N, H, D) -> x + o_proj(attended), and the SwiGLU MLP's output on it: the
    layer's output is their sum, which the caller forms (see above). adapters, planes: see `linear` (with planes
    the MLP's output is the down projection's partial sums)."""
    o = linear(layer.self_attn.o_proj, attended.reshape(x.shape[0], -1), adapters, planes)
    if planes:
        x = x + planes_sum(o, x.dtype)
        return x, layer.mlp(layer.post_attention_layernorm(x), adapters, planes)
    # Compiled for the GPU, x - (-o): exactly x + o, written so that inductor leaves it an add. It rewrites
    # add(mm, x) into cuBLAS's addmm(x, ...) when the sum has a user that is not pointwise, and that addmm
    # first copies x into its output (a memcpy kernel a layer), where the add alone fuses into the RMSNorm
    # after it. (Eager, exported or compiled for the CPU: the plain add, as measured there.)
    x = x - (-o) if x.is_cuda and torch.compiler.is_compiling() else x + o
    return x, layer.mlp(layer.post_attention_layernorm(x), adapters)


def final_norm(norm: RMSNorm, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The last layer's residual add and the model's final RMSNorm: compiled with the layers, one fused kernel
    (eager, about ten: the add, fp32 copies, the mean, rsqrt, products, each a launch of a decode step). With
    compute_logits' fp32 head: an H100's 64-row step 1.414 -> 1.381 ms (docs/performance-gpu.md, stop 61)."""
    return norm(x + planes_sum(delta, x.dtype))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling_dict)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.attention_inputs, self.attention_output, self.final_norm = attention_inputs, attention_output, final_norm
        self.dense_rows = None  # CPU, quantized layers with dense copies: their DenseRows (models/loader.py)
        # (fewest rows, most rows, planes): the steps whose o_proj and down_proj hand on split-K partial sums
        # (`linear`'s planes; the CUDA runner's kernels/pdl_matmul.py PLANES_INTO_NORM), or None.
        self.delta_planes: tuple[int, int, int] | None = None

    def compile_layers(self, pdl: bool = False) -> None:
        """torch.compile the per-layer work around attention (regional compilation): one compiled graph
        serves all layers, with symbolic token counts, so it compiles in seconds, not minutes.

        Without duck shaping: by default dynamo gives sizes that are equal when it first traces one symbol (the
        first capture's 64 tokens and head_dim 64), and a later token count recompiles (about 0.6 s, the first
        time a prefill of another size ran: an H200, 1B-class model, 16 prompts' TTFT 25 -> 670 ms).

        pdl: the generated kernels launch with programmatic dependent launch (Hopper+, kernels/pdl.py CHAIN)."""
        torch.fx.experimental._config.use_duck_shape = False
        if pdl and not hasattr(torch._inductor.config.triton, "enable_pdl"):  # torch.compile would refuse the option
            log.info("this torch (%s) has no inductor triton.enable_pdl: the compiled layer kernels launch without "
                     "programmatic dependent launch", torch.__version__)
            pdl = False
        options = {"triton.enable_pdl": True} if pdl else None
        self.attention_inputs = torch.compile(attention_inputs, dynamic=True, fullgraph=True, options=options)
        self.attention_output = torch.compile(attention_output, dynamic=True, fullgraph=True, options=options)
        self.final_norm = torch.compile(final_norm, dynamic=True, fullgraph=True, options=options)

    @property
    def layers_compiled(self) -> bool:
        return self.attention_inputs is not attention_inputs

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext,
                adapters: StepAdapters | None = None) -> torch.Tensor:
        """input_ids, positions (N,) -> final hidden states (N, hidden). adapters: the step's LoRA adapters
        (models/lora.py), or None when the step has no adapted token."""
        x = self.embed_tokens(input_ids)  # (N, hidden)
        # One cos/sin lookup for all layers, unless the context's kernel rotates q and k as it stores k (one
        # launch and one pass over q and k fewer a layer).
        rope = None if getattr(ctx, "rotates_qk", False) else self.rotary(positions)
        # Compiled layers get zeros rather than None before the first layer: one compiled variant then serves every
        # layer (a None is a guard of its own, and each function's variants count toward dynamo's recompile limit).
        # Compiled steps of delta_planes' rows hand the split-K partial sums of o_proj and down_proj to the residual
        # add + RMSNorm after them (planes_sum), a graph of their own (the flag and the delta's rank are guards).
        planes = self.layers_compiled and adapters is None and self.delta_planes is not None \
            and self.delta_planes[0] <= x.shape[0] <= self.delta_planes[1]
        if planes:
            delta = x.new_zeros(self.delta_planes[2], *x.shape, dtype=torch.float32)
        else:
            delta = torch.zeros_like(x) if self.layers_compiled else None
        for layer in self.layers:
            x, q, k, v = self.attention_inputs(layer, rope, x, delta, adapters)
            x, delta = self.attention_output(layer, x, ctx.attend(layer.layer_idx, q, k, v), adapters, planes)
        return self.final_norm(self.norm, x, delta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (M, hidden) -> logits (M, V) in fp32 (the sampler's and logprobs' precision)."""
        weight = self._streamed_head_weight(hidden)
        if weight is not None:
            return torch.mm(weight, hidden.float().T).T.contiguous()
        head = self.lm_head
        if type(head) is nn.Linear and head.bias is None and writes_fp32(hidden):
            return fp32_logits(hidden, head.weight)
        return head(hidden).float()

    def _streamed_head_weight(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The fp32 weight compute_logits streams (W @ x^T) on the CPU instead of the head's own product, or None.

        A float head, 2 to SKINNY_LOGITS_ROWS rows (a speculative verify step, a batch): x @ W.T through the BLAS
        GEMM ran 2.5-7x slower than one row on the vocabulary-wide fp32 head (measured 100 ms at 5 rows against
        13 ms at 1, on the default model's 49152 x 576 head); W @ x.T streams the weight once (39 ms).
        A quantized head tied to the embedding, TIED_TABLE_ROWS rows or more: the embedding's float table, for a
        GGUF the same numbers in fp32 (the kernel rounds the activations to bf16), so a batch's logits are, if
        anything, closer to the checkpoint's; at a near-tie greedy output may then differ from the same request
        alone. Never while tracing an export (skinny_product's rule)."""
        head = self.lm_head  # an nn.Linear, a QuantizedLinear, or TP's own
        if skinny_product(head, hidden, SKINNY_LOGITS_ROWS) and head.bias is None:
            return head.weight
        if self.tied_table_serves_head() and hidden.device.type == "cpu" and not torch.jit.is_tracing() \
                and hidden.shape[0] >= TIED_TABLE_ROWS and not head.dense_copy_serves(hidden.shape[0]):
            return self.embed_tokens.weight
        return None

    def tied_table_serves_head(self) -> bool:
        """Whether compute_logits takes the embedding's float table for a quantized head of TIED_TABLE_ROWS rows
        or more on the CPU (_streamed_head_weight; a dense copy of the head would never be read there): a head on
        one of PyTorch's weight-only kernels, not on kvtriton's GEMV."""
        head = self.lm_head
        return (self.config.tie_word_embeddings and getattr(head, "matmul_on_cpu_kernel", False)
                and getattr(head, "gemv_operands", None) is None and head.bias is None
                and self.embed_tokens.weight.dtype == torch.float32)
