"""The Llama core's decode step on CUDA with the Triton kernels (kvtriton.backend.kernels).

A decode step has one new token per sequence. At batch 1 it runs five kernels
per layer, each streaming one weight matrix once with the elementwise work
around it fused in:

    qkv      = rms_norm_linear(x, input_layernorm, qkv_proj)
    attended = paged_decode_attention(q, k, v, rope, pools)     [QK-norm +] RoPE + KV store + attention
    x        = linear(attended, o_proj, residual=x)
    h        = rms_norm_swiglu(x, post_attention_layernorm, gate_up_proj)
    x        = linear(h, down_proj, residual=x)
  logits     = rms_norm_linear(x, norm, lm_head) in fp32

fp8 (W8A8) and int4 projections take the same kernels, reading their quantized
weights (kernels/skinny_matmul.py's QuantizedWeight), so a quantized step has
the same launches as a bf16 one and only fewer bytes.

Batch 2 takes them too. Larger batches read each weight once for many rows,
where cuBLAS and the torch.compile'd per-layer functions are faster. Measured
on an H200, 1B-class, 192-token contexts (benchmarks/profile_decode.py
--fused-max-batch 8, then 1; 2026-12-04): batch 2, 0.916 ms a step fused
against 1.025 ms with cuBLAS (1.015 fused before the kernels took a bf16
batch's rows one at a time; batch 1 went 0.73 -> 0.69 ms with it); batch 4, 1.761 against 1.032 ms: the fused
matmuls alone take 1.53 ms there, cuBLAS's 0.67 ms
(benchmarks/skinny_matmul_bench.py --rows 1,2,4,8). Attention, with RoPE and the
KV store, takes the kernel at every batch size. Both compute what LlamaForCausalLM.forward +
compute_logits do (tests/test_kernels.py).

The attention kernel splits each context across programs (flash-decoding,
kernels/paged_decode_attention.py), so it serves every context up to
max_model_len: the runner captures one context bucket.
"""

from __future__ import annotations

import torch

from kvtriton.backend.attention.kv_cache import KVCache
from kvtriton.backend.kernels.paged_decode_attention import paged_decode_attention
from kvtriton.backend.kernels.skinny_matmul import QuantizedWeight, linear, rms_norm_linear, rms_norm_swiglu
from kvtriton.backend.models.fp8 import Fp8Linear
from kvtriton.backend.models.int4 import Int4Linear
from kvtriton.backend.models.llama import LlamaForCausalLM
from kvtriton.backend.models.rotary import RotaryEmbedding

FUSED_MAX_BATCH = 2  # decode batches the fused matmul kernels serve (see above; <= skinny_matmul.MAX_ROWS)
# The same for quantized weights, where the unfused path's kernels differ (kernels/fp8_matmul.py, int4_matmul.py).
# benchmarks/quant_kernels_bench.py --device cuda prints the batch up to which fused wins. Measured on an NVIDIA
# H200 (torch 2.11, triton 3.6) by benchmarks/quant_kernels_bench.py --device cuda --rows 1,2,4,16,64.
FUSED_MAX_BATCH_QUANTIZED = {
    'fp8': 1,
    'int4': 1,
}


class KernelPagedDecode:
    """AttentionContext for decode-only steps: the paged decode attention kernel, which also applies RoPE to q
    and k (by the step's positions) and stores k and v in the cache. q and k arrive unrotated (rotates_qk: the
    model skips its own RoPE), at every batch size."""

    rotates_qk = True

    def __init__(self, cache: KVCache, positions: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
                 context_lens: torch.Tensor, scale: float, rotary: RotaryEmbedding):
        self.cache, self.positions, self.slots = cache, positions, slots
        self.tables, self.context_lens, self.scale = tables, context_lens, scale
        self.rope_tables = (rotary.cos, rotary.sin, positions)

    def attend(self, layer_idx: int, q, k, v, qk_norm=None) -> torch.Tensor:
        """qk_norm: (q's weight, k's, eps) when q and k arrive before the model's QK-norm (the fused step)."""
        return paged_decode_attention(q, k, v, self.cache.k[layer_idx], self.cache.v[layer_idx], self.slots,
                                      self.tables, self.context_lens, self.scale, rotary=self.rope_tables,
                                      qk_norm=qk_norm)


def decode_weight(module: torch.nn.Module) -> torch.Tensor | QuantizedWeight:
    """What the fused kernels read for one projection: a plain Linear's weight, or the quantized layer's numbers
    (their layouts are models/fp8.py's and models/int4.py's)."""
    if isinstance(module, Fp8Linear):
        return QuantizedWeight("fp8", module.out_features, module.weight, module.weight_scale)
    if isinstance(module, Int4Linear):
        return QuantizedWeight("int4", module.out_features, module.qweight, module.scale, module.zero_point,
                               module.offset, module.group_size)
    return module.weight


def decode_logits(model: LlamaForCausalLM, ids: torch.Tensor, ctx: KernelPagedDecode,
                  fuse_matmuls: bool) -> torch.Tensor:
    """ids (B,) of one new token per sequence, at ctx.positions -> logits (B, V) fp32."""
    head = decode_weight(model.lm_head)
    limit = FUSED_MAX_BATCH_QUANTIZED[head.kind] if isinstance(head, QuantizedWeight) else FUSED_MAX_BATCH
    if not fuse_matmuls or ids.shape[0] > limit:
        return model.compute_logits(model(ids, ctx.positions, ctx))
    x = model.embed_tokens(ids)  # (B, hidden)
    b = ids.shape[0]
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = rms_norm_linear(x, layer.input_layernorm.weight, layer.input_layernorm.eps, decode_weight(attn.qkv_proj),
                              attn.qkv_proj.bias)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        # Qwen3's QK-norm: in the attention kernel, with RoPE (no launch of its own)
        qk_norm = (attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps) if attn.has_qk_norm else None
        attended = ctx.attend(layer.layer_idx, q.view(b, attn.num_heads, attn.head_dim),
                              k.view(b, attn.num_kv_heads, attn.head_dim), v.view(b, attn.num_kv_heads, attn.head_dim),
                              qk_norm=qk_norm)
        x = linear(attended.view(b, -1), decode_weight(attn.o_proj), residual=x)
        norm = layer.post_attention_layernorm
        h = rms_norm_swiglu(x, norm.weight, norm.eps, decode_weight(mlp.gate_up_proj))
        x = linear(h, decode_weight(mlp.down_proj), residual=x)
    return rms_norm_linear(x, model.norm.weight, model.norm.eps, head, out_dtype=torch.float32)


def fusable(model: LlamaForCausalLM) -> str | None:
    """None if every projection is one the skinny matmul can read (a plain nn.Linear, fp8 or int4; int8 ones are
    not), else why not. Only qkv_proj may carry a bias (Qwen2); the kernels add it. Qwen3's QK-norm runs in the
    attention kernel."""
    for name, module in model.named_modules():
        if (name.endswith("_proj") or name == "lm_head") and type(module) not in (torch.nn.Linear, Fp8Linear,
                                                                                  Int4Linear):
            return f"{name} is {type(module).__name__}, not nn.Linear"
    return None
