"""CompiledDecode: the CPU's decode step with its decoder layers run a few at a time through torch.compile'd graphs.

On a CPU an eager decode step of a small model is mostly PyTorch dispatch: the default model (30 layers, int4)
runs ~2,200 small ops a token at several microseconds each, about as long as its matmuls at one sequence.
Inductor compiles a layer (RMSNorm, qkv, RoPE, the paged-KV write, attention read in place from the pools
(attention/cpu_decode.py), o_proj, the SwiGLU MLP, residuals) into a few fused C++ loops around the same aten
matmul kernels; vLLM's CPU backend compiles its model with inductor for the same reason. One graph serves every
group of up to MAX_LAYERS_PER_GRAPH layers (their weights are the graph's inputs: regional compilation), so a
load compiles in seconds rather than the minute a whole-model graph takes on two cores. A group rather than one
layer because each call of a compiled graph costs ~0.1 ms of dynamo's guards and wrappers: the default model's
one-sequence step took 14.3 ms with a graph a layer, 12.9 with two, 10.6 with six, 10.2 with ten (2-core
Sapphire Rapids), the six-layer graph compiling in ~8 s where one layer took ~2.

The logits are the eager step's bit for bit (tests/test_cpu_compiled_decode.py): the graph keeps aten's matmul
kernels, the eager steps attend decode rows through the same attention loops compiled on their own
(`eager_attention`), and RMSNorm sums its squares in fp64 on the CPU (models/llama.py `mean_square`), so that
inductor's fused sum, in another order, rounds to the same fp32 mean as aten's (a 1-ulp change, rounded to bf16
before an int4 matmul, can move a greedy token). So greedy output does not depend on whether a step ran
compiled.

Decode-only steps of any batch size take it; prefill and mixed steps stay eager (their cost is their
matmuls'). A model whose projections all run the CPU's int4/int8 kernels takes its batches below the dense copies'
rows through one C++ call for all layers instead (runners/cpu_native_decode.py), and those batches compile no
graph; its larger batches' graphs and its eager steps' decode rows then attend through that call's C++
attention, so the bits still agree.

The graphs are compiled at load by a warm-up, so no request pays it: batches of 1 and of 2 or more are two
graphs (dynamo specialises size 1), an fp32 model's batches past SKINNY_ROWS a third, a quantized model's
batches from its dense copies' row count (models/loader.py add_dense_weights) another. The block-table
width is a symbolic size, padded to >= 2 columns for the same reason, as the eager path pads
(attention/paged.py pad_decode_tables). A step that would need another graph after the warm-up runs
eagerly instead of stalling on a compile, and the first such step is logged with the guard that failed
(`eager_steps` counts them). Inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR, by default
/tmp/torchinductor_$USER) makes every load after the first shorter.
"""

from __future__ import annotations

import logging
import time

import torch

from kvtriton.backend.attention.cpu_decode import CompiledDecodeAttention, decode_attention_in_place
from kvtriton.backend.attention.kv_cache import write_kv
from kvtriton.backend.attention.paged import MIN_DECODE_TABLE_WIDTH, decode_mask, pad_decode_tables
from kvtriton.backend.kernels.no_recompile import without_recompile
from kvtriton.backend.models.llama import SKINNY_ROWS
from kvtriton.backend.runners.cpu_native_decode import NativeDecodeLayers, why_not_native

log = logging.getLogger("kvtriton")
MAX_LAYERS_PER_GRAPH = 6  # a group is the largest divisor of the layer count up to this: one graph for all groups


def layers_per_graph(num_layers: int) -> int:
    return max(d for d in range(1, MAX_LAYERS_PER_GRAPH + 1) if num_layers % d == 0)


class CompiledDecode:
    """decode(ids, positions, slots, tables, context_lens) of a decode-only step, its layers in compiled graphs.

    `model` is the runner's LlamaForCausalLM, `kv` its KVCache; `scratch_block` a KV block no sequence owns:
    the warm-up writes there."""

    def __init__(self, model, kv, scale: float, scratch_block: int, max_batch: int, max_blocks: int):
        # Symbolic sizes stay apart: with duck shaping, sizes equal at the first trace would share one symbol.
        torch.fx.experimental._config.use_duck_shape = False
        self.model, self.kv, self.scale, self.scratch_block = model, kv, scale, scratch_block
        self.eager_steps = 0  # steps that fit no graph after the warm-up (logged at the first)
        attention_inputs, attention_output = model.attention_inputs, model.attention_output
        # A model whose projections all run the CPU's int4/int8 kernels takes its small batches through one C++ call
        # (runners/cpu_native_decode.py); then every decode row, in any step, attends through its C++ attention.
        why = why_not_native(model, kv)
        self.native = NativeDecodeLayers(model, kv, scale) if why is None else None
        # The graphs' inputs live in buffers of their own, as a CUDA graph's do: every call then hands dynamo
        # tensors of one kind (contiguous, offset 0, not inference tensors), whatever the caller's are, so its
        # guards hold. Rows: ids, positions, slots, context lengths; the tables are (B, W) views of a flat one.
        # Rows for every sequence, and for as many tokens as the C++ call takes (a verify step's, serves_rows).
        rows = max(max_batch, self.native.max_batch or 0) if self.native is not None else max_batch
        self._inputs = torch.zeros(4, rows, dtype=torch.int64)
        width = max(max_blocks, MIN_DECODE_TABLE_WIDTH)
        self._tables = torch.full((rows * width,), scratch_block, dtype=torch.int64)
        log.info("CPU decode: %s", "the layers of batches up to %s in one C++ call" % (self.native.max_batch or "any")
                 if self.native is not None else f"compiled graphs only ({why})")
        attend = torch.ops.kvtriton.decode_attention if self.native is not None else decode_attention_in_place

        def decoder_layers(layers, rope, x, k_pools, v_pools, slots, tables, mask, scale: float):
            for layer, k_pool, v_pool in zip(layers, k_pools, v_pools):
                x, q, k, v = attention_inputs(layer, rope, x, None)  # one graph holds whole layers: their add here
                write_kv(k_pool, v_pool, slots, k, v)
                attended = attend(q, k_pool, v_pool, tables, mask, scale)
                x, delta = attention_output(layer, x, attended)
                x = x + delta
            return x

        # Each call's layers and their KV pools, fixed for the runner's life: one graph serves every group.
        size = layers_per_graph(len(model.layers))
        self._groups = [(list(model.layers[i:i + size]), kv.k[i:i + size], kv.v[i:i + size])
                        for i in range(0, len(model.layers), size)]
        self._layers = torch.compile(decoder_layers, dynamic=True, fullgraph=True)
        # The eager steps' decode rows (mixed prefill + decode steps) attend through the same loops: the runner
        # hands this to their PagedAttention (attention/cpu_decode.py).
        self.eager_attention = CompiledDecodeAttention(native=self.native is not None)
        started = time.monotonic()
        dense_rows = {model.dense_rows.decode} if model.dense_rows is not None else set()
        # The on-disk compile caches (inductor's, AOTAutograd's) replay the shape guards of the compile that wrote
        # an entry, and these carry the dense copies' row count, which their keys do not: after a load with
        # another cpu_dense_min_rows the batch graph guarded 2 <= B <= 15 instead of B < 48, and the steps
        # between ran eagerly. The row counts go into the keys.
        tag = "kvtriton-dense-rows-" + "-".join(map(str, sorted(dense_rows)))
        with torch.compiler.config.patch(cache_key_tag=tag):
            for batch in sorted({b for b in (1, 2, SKINNY_ROWS + 1, *dense_rows) if b <= max_batch}):
                if self.native is None or not self.native.serves(batch):
                    self._warm_up(batch)
        log.info("compiled the CPU decode step in %.1f s", time.monotonic() - started)

    def _warm_up(self, batch: int) -> None:
        """Compile now, every group of layers: `batch` sequences at position 0, all in the scratch block. Batches
        of 1 and of 2 or more are two graphs (dynamo specialises size 1); an fp32 model's batches past SKINNY_ROWS a
        third (models/llama.py's skinny product), a quantized model's from its dense copies' rows a fourth;
        other sizes reuse them."""
        inputs = self._inputs[:, :batch]
        inputs.zero_()
        inputs[2].fill_(self.scratch_block * self.kv.block_size)
        inputs[3].fill_(1)
        self._run(*inputs, self._tables[: batch * MIN_DECODE_TABLE_WIDTH].view(batch, MIN_DECODE_TABLE_WIDTH))
        if batch <= 2:  # the eager attention's two graphs
            self.eager_attention.warm_up(batch, self.model.config.num_heads, self.model.norm.weight.dtype,
                                         self.kv.k[0], self.kv.v[0], self.scale)

    def serves_rows(self, rows: int) -> bool:
        """Whether `rows` decode rows that no compiled graph was made for run here, in the one C++ call: a
        decode step with LoRA adapters (the graphs were compiled without them), or a verify step's tokens, each a
        row that attends to its sequence up to its own position. Other such steps run eagerly."""
        return self.native is not None and self.native.serves(rows) and rows <= self._inputs.shape[1]

    def __call__(self, ids, positions, slots, tables, context_lens, token_adapters=None) -> torch.Tensor:
        """ids, positions, slots, context_lens (B,) int64, tables (B, W) -> logits (B, V) fp32. token_adapters:
        each row's LoRA adapter (B,), only where serves_rows(B)."""
        b, width = tables.shape
        inputs = self._inputs[:, :b]
        inputs[0].copy_(ids)
        inputs[1].copy_(positions)
        inputs[2].copy_(slots)
        inputs[3].copy_(context_lens)
        w = max(width, MIN_DECODE_TABLE_WIDTH)
        table = self._tables[: b * w].view(b, w)
        table.copy_(pad_decode_tables(tables))
        if token_adapters is not None:  # not a graph's step: the C++ call, which compiles nothing
            return self._run(*inputs, table, token_adapters)
        logits, why = without_recompile(self._run, *inputs, table)
        if why is None:
            return logits
        # A step no graph fits: eagerly, said (a layer may already have written its K/V: the same values).
        if not self.eager_steps:
            log.warning("cpu_compile_decode: a decode step fits no compiled graph; such steps run eagerly. %s", why)
        self.eager_steps += 1
        with torch.compiler.set_stance("force_eager"):
            return self._run(*inputs, table)

    @torch.inference_mode()
    def _run(self, ids, positions, slots, context_lens, tables, token_adapters=None) -> torch.Tensor:
        model, kv = self.model, self.kv
        x = model.embed_tokens(ids)  # (B, hidden)
        rope = model.rotary(positions)
        mask = decode_mask(context_lens, tables.shape[1] * kv.block_size)  # one for all layers
        if self.native is not None and self.native.serves(x.shape[0]):
            x = self.native(x, rope, slots, tables, mask, token_adapters)
        else:
            for layers, k_pools, v_pools in self._groups:
                x = self._layers(layers, rope, x, k_pools, v_pools, slots, tables, mask, self.scale)
        return model.compute_logits(model.norm(x))
