"""CompiledDecode: the CPU's one-sequence decode step with each decoder layer one torch.compile'd graph.

On a CPU an eager decode step of a small model is mostly PyTorch dispatch: the default model (30 layers,
int4) runs ~2,200 small ops a token at several microseconds each, about as long as its matmuls. Inductor
compiles a whole layer (RMSNorm, qkv, RoPE, the paged-KV write and gather, attention, o_proj, the SwiGLU
MLP, residuals) into a few fused C++ loops around the same aten matmul and attention kernels; vLLM's CPU
backend compiles its model with inductor for the same reason. The layer is compiled once and serves all
layers (their weights are the graph's inputs: regional compilation), so a load compiles in seconds rather
than the minute a whole-model graph takes on two cores, and runs as fast (README "CPU threads").

Scope: one sequence decoding, the single-stream latency case. A batch's step is its matmuls', and for
batched int4 inductor swaps the aten kernel for a template of its own whose logits differ; the graph here
keeps the aten matmul kernels, so its logits are the eager step's within fp32 rounding (inductor's fused
RMSNorm sums in another order: ~1e-7; the default model's int4 logits measured identical), checked by
tests/test_cpu_compiled_decode.py.
Compiled at load (a warm-up, so no request pays it). The block-table width is a symbolic size, padded to
>= 2 columns with the scratch block because dynamo specialises sizes 0 and 1; anything else that would
recompile after the warm-up runs eagerly instead of stalling the stream (`eager_on_recompile`). On the
2-core VM the first compile takes ~27 s; inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR, by default
/tmp/torchinductor_$USER) brings later loads to ~5 s.
"""

from __future__ import annotations

import logging
import time

import torch

from kvtriton.backend.attention.kv_cache import write_kv
from kvtriton.backend.attention.paged import decode_attention, decode_mask

log = logging.getLogger("kvtriton")

MIN_TABLE_WIDTH = 2  # dynamo specialises sizes 0 and 1: narrower tables are padded to this


class CompiledDecode:
    """decode(ids, positions, slots, tables, context_lens) of one sequence, each layer a compiled graph.

    `model` is the runner's LlamaForCausalLM, `kv` its KVCache; `scratch_block` a KV block no sequence owns:
    the warm-up writes there, and padded table columns point there (masked out by the context length)."""

    def __init__(self, model, kv, scale: float, scratch_block: int):
        # Symbolic sizes stay apart: with duck shaping, sizes equal at the first trace would share one symbol.
        torch.fx.experimental._config.use_duck_shape = False
        self.model, self.kv, self.scale, self.scratch_block = model, kv, scale, scratch_block
        attention_inputs, attention_output = model.attention_inputs, model.attention_output

        def decoder_layer(layer, rope, x, k_pool, v_pool, slots, tables, mask, scale: float):
            q, k, v = attention_inputs(layer, rope, x)
            write_kv(k_pool, v_pool, slots, k, v)
            return attention_output(layer, x, decode_attention(q, k_pool, v_pool, tables, mask, scale))

        self._layer = torch.compile(decoder_layer, dynamic=True, fullgraph=True)
        started = time.monotonic()
        self._warm_up()
        log.info("compiled the CPU decode step for one sequence in %.1f s", time.monotonic() - started)

    def _warm_up(self) -> None:
        """Compile now, every layer: one position of a sequence that lives in the scratch block."""
        block_size = self.kv.block_size

        def t(values):
            return torch.tensor(values, dtype=torch.int64)

        self._run(t([0]), t([0]), t([self.scratch_block * block_size]), t([[self.scratch_block] * MIN_TABLE_WIDTH]),
                  t([1]))

    def __call__(self, ids, positions, slots, tables, context_lens) -> torch.Tensor:
        """ids, positions, slots, context_lens (1,) int64, tables (1, W) -> logits (1, V) fp32."""
        width = tables.shape[1]
        if width < MIN_TABLE_WIDTH:
            pad = torch.full((1, MIN_TABLE_WIDTH - width), self.scratch_block, dtype=tables.dtype)
            tables = torch.cat([tables, pad], dim=1)
        with torch.compiler.set_stance("eager_on_recompile"):
            return self._run(ids, positions, slots, tables, context_lens)

    @torch.inference_mode()
    def _run(self, ids, positions, slots, tables, context_lens) -> torch.Tensor:
        model, kv = self.model, self.kv
        x = model.embed_tokens(ids)  # (1, hidden)
        rope = model.rotary(positions)
        mask = decode_mask(context_lens, tables.shape[1] * kv.block_size)  # one for all layers
        for i, layer in enumerate(model.layers):
            x = self._layer(layer, rope, x, kv.k[i], kv.v[i], slots, tables, mask, self.scale)
        return model.compute_logits(model.norm(x))
