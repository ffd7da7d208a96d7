"""TorchRunner: runs the Llama core in PyTorch over the paged KV cache (CPU reference, CUDA fast path).

On CUDA, decode-only steps replay CUDA graphs captured per (batch, context)
bucket: one launch per step instead of hundreds, which is what batch-1 decode
needs to approach the HBM roofline. Inside them the Triton kernels
(models/llama_decode.py) do paged attention straight from the block tables,
splitting long contexts across programs, and at batch <= FUSED_MAX_BATCH fuse
each matmul with its neighbouring elementwise work; the kernel reads only each
context's own blocks, so one context bucket (max_model_len) serves every
context. Without triton, attention gathers the context in PyTorch, per doubling
context bucket. Prefill and mixed steps past the prefill graphs (below) run
eagerly; with the kernels on, their attention is one varlen Triton kernel over
the packed tokens. With
torch.compile on, the per-layer work around attention is compiled once for all
layers. Padded rows of a bucket write into a scratch block that the block
manager never hands out.

With speculative decoding on, verify steps (and any step whose sequences each
bring at most Q = 1 + num_speculative_tokens new tokens) replay graphs of
their own, captured per batch bucket: every sequence gets Q rows, its new
tokens first and padding after them (attention/uniform.py). Steps with a
longer chunk (a prompt) take the prefill graphs.

Prefill and mixed steps of up to max_prefill_graph_tokens tokens replay
graphs too, per (token bucket, sequence bucket): the step's tokens packed
first and padding after them (token 0 at the scratch block), padding
sequences with no tokens; attention is the varlen kernel over static
query-start and context-length buffers, its grid sized by the bucket's tokens
and sequences. Eagerly such a step costs the host about 1 ms a layer
in PyTorch dispatch, whatever its size (an H200 host: an 80-token prompt on a
1B-class model took 8-17 ms, its replay under 2 ms); vLLM captures full
graphs of mixed batches for the same reason. Past 512 tokens the buckets grow
by eighths (graph_buckets.FINE_PREFILL_GRAPH_TOKENS): a step that long is bound by the
device on a large model, where eager dispatch hides behind it, and not on a
small one (a 1B-class model's 4,096-token step in fp8 on an H100: 12.8 ms
replayed, 23.0 ms eager), so how far the graphs reach is the
max_prefill_graph_tokens setting; their pool's memory is set aside before the
KV cache is sized.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from kvtriton.backend.attention.kv_cache import GIB, KVCache, num_blocks_for_budget, pool_dtype
from kvtriton.backend.attention.metadata import AttentionMetadata
from kvtriton.backend.attention.paged import PagedAttention
from kvtriton.backend.attention.uniform import UniformQueryAttention, uniform_rows
from kvtriton.backend.config import EngineConfig
from kvtriton.backend.distributed.communication_op import tensor_model_parallel_min
from kvtriton.backend.kernels import tile_config
from kvtriton.backend.kernels.device_copy import to_device
from kvtriton.backend.models.loader import load_model, resolve_quantization
from kvtriton.backend.models.lora import StepAdapters, attach_adapters, load_adapter
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.models.parallel.sharded_loader import load_sharded_model
from kvtriton.backend.models.parallel.sharding import rank_model_config
from kvtriton.backend.runners import graph_buckets
from kvtriton.backend.runners.cpu_compiled_decode import CompiledDecode
from kvtriton.backend.runners.decode_chain import chain_decode_projections, fp8_down_projections_hand_on_planes
from kvtriton.backend.runners.step_input import StepInput

log = logging.getLogger("kvtriton")

@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (bucket, V) output buffer


class TorchRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, folder: str | None,
                 device: torch.device, dtype: torch.dtype, max_model_len: int, verify_width: int = 0):
        """verify_width: Q of the verify-step CUDA graphs; 0 takes 1 + num_speculative_tokens when the config
        speculates (a draft model's runner, whose config does not, passes the target's to catch up in graphs)."""
        self.config, self.model_config, self.device, self.dtype = config, model_config, device, dtype
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.shard_report = None  # tensor parallelism: what this rank loaded (models/parallel/sharded_loader.py)
        self.quantization: str | None = None  # the scheme the weights load in (quantization auto resolved)
        if config.tensor_parallel_size > 1:  # this process is one rank of a group (runners/tensor_parallel_runner.py)
            self.model, self.shard_report = load_sharded_model(folder, model_config, dtype, device,
                                                               config.dummy_weights)
            # The rank's heads and MLP columns: its KV pool and the kernels' shape checks see only those.
            self.model_config = model_config = rank_model_config(model_config, config.tensor_parallel_size)
        else:
            quantization, gguf, keep_precision = resolve_quantization(config.quantization, config.model, device)
            self.quantization = quantization
            self.model = load_model(folder, dtype=dtype, device=device, config=model_config,
                                    dummy=config.dummy_weights, quantization=quantization,
                                    group_size=config.quantization_group_size, gguf=gguf,
                                    dense_min_rows=config.cpu_dense_min_rows, keep_gguf_precision=keep_precision,
                                    quantized_embedding=device.type == "cpu")
        self.lora_names = self._load_lora_adapters()  # adapter i + 1 of a step's StepAdapters is lora_names[i]
        self.scale = model_config.head_dim**-0.5
        # Widest block table the Triton decode attention kernel takes (0: kernel off), whether small decode
        # batches fuse their matmuls, and whether prefill attention is the varlen kernel.
        self.kernel_context_blocks, self.fuse_matmuls, self.prefill_kernel = self._triton_kernels()
        self.use_cuda_graphs = device.type == "cuda" and config.enable_cuda_graphs
        self.graph_batch_sizes = graph_buckets.batch_buckets(config.max_num_seqs)
        # Prefill-step graphs: their (tokens, sequences) buckets (before the KV pool: their memory is set aside).
        self.prefill_graph_sizes = self._prefill_graph_shape()
        self._prefill_graphs: dict[tuple[int, int], _Graph] = {}
        self.kv_dtype = self._kv_pool_dtype()
        self.num_blocks = self._num_kv_blocks()
        # One extra block at the end: the scratch target of padded CUDA-graph rows.
        self.kv = KVCache.allocate(model_config.num_layers, self.num_blocks + 1, self.block_size,
                                   model_config.num_kv_heads, model_config.head_dim, self.kv_dtype, device)
        self.scratch_block = self.num_blocks
        # first bucket: the attention kernel's widest table (one serves every context), else the gathering path's 8
        self.context_buckets = graph_buckets.context_buckets(self.kernel_context_blocks or 8, self.max_blocks_per_seq)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        # LoRA: decode graphs of steps with adapted tokens, per (batch, context) bucket as _graphs; their
        # adapters span every adapter (one graph for any mix), read from a static buffer of each row's adapter.
        self._lora_graphs: dict[tuple[int, int], _Graph] = {}
        self._graph_pool = None
        # Verify-step graphs: Q query rows per sequence (0: none) and their batch buckets.
        self.verify_width, self.verify_batch_sizes = self._verify_graph_shape(verify_width)
        self._verify_graphs: dict[int, _Graph] = {}
        # Before any capture: the captured steps' eager attention reads it (_eager_decode_attention).
        self.compiled_decode = self._compiled_decode()
        if self.use_cuda_graphs:
            self._init_graph_buffers()
            if config.enable_torch_compile:
                from kvtriton.backend.kernels import pdl
                self.model.compile_layers(pdl=pdl.in_chain(self.device))
            self._capture_all()

    def _load_lora_adapters(self) -> tuple[str, ...]:
        """Read lora_modules' adapters and stack them onto the model's projections (models/lora.py)."""
        adapters = [load_adapter(name, path, self.model_config) for name, path in self.config.lora_adapters.items()]
        if not adapters:
            return ()
        attach_adapters(self.model, adapters, self.dtype, self.device)
        log.info("LoRA adapters: %s; decode steps with adapted tokens replay CUDA graphs of their own on a GPU, take "
                 "the CPU's one-call decode where it serves, and run eagerly otherwise (no prefill or verify graph, "
                 "no compiled CPU graph)",
                 ", ".join(f"{a.name} (rank {a.rank}, {len(a.weights)} projections)" for a in adapters))
        return tuple(a.name for a in adapters)

    def _compiled_decode(self) -> CompiledDecode | None:
        """The CPU's decode step compiled (cpu_compile_decode), or None."""
        if self.device.type != "cpu" or not self.config.cpu_compile_decode:
            return None
        if self.config.tensor_parallel_size > 1:
            log.info("cpu_compile_decode: not under tensor parallelism (a step's all-reduce is a gloo call); "
                     "decode steps run eagerly")
            return None
        return CompiledDecode(self.model, self.kv, self.scale, self.scratch_block, self.config.max_num_seqs,
                              self.max_blocks_per_seq)

    def _triton_kernels(self) -> tuple[int, bool, bool]:
        """(widest block table for the Triton decode attention or 0, fused skinny matmuls on, varlen prefill
        attention on) on CUDA; says why not in one line."""
        if self.device.type != "cuda" or not self.config.enable_triton_kernels:
            return 0, False, False
        try:
            import triton  # noqa: F401
        except ImportError:
            log.warning("triton is not installed: CUDA steps use PyTorch attention and cuBLAS matmuls instead")
            return 0, False, False
        from kvtriton.backend.kernels import paged_decode_attention, paged_prefill_attention
        from kvtriton.backend.models.llama_decode import fusable

        mc = self.model_config
        shape = (mc.num_heads, mc.num_kv_heads, mc.head_dim, self.dtype)
        why = paged_prefill_attention.supported(*shape)
        if why:
            log.warning("%s: CUDA prefill uses PyTorch attention instead", why)
        prefill = why is None
        why = paged_decode_attention.supported(*shape)
        if why:
            log.warning("%s: CUDA decode uses PyTorch attention and cuBLAS matmuls instead", why)
            return 0, False, prefill
        why = fusable(self.model)
        if why:
            log.warning("%s: CUDA decode matmuls use cuBLAS instead of the fused Triton kernels", why)
        chain_decode_projections(self.model, self.device)
        fp8_down_projections_hand_on_planes(self.model)
        return self.max_blocks_per_seq, why is None, prefill

    def _verify_graph_shape(self, width: int) -> tuple[int, list[int]]:
        """(Q, batch buckets) of the verify-step CUDA graphs, or (0, []): Q = width or 1 + num_speculative_tokens,
        the buckets up to the largest batch that speculates (below speculative_disable_by_batch_size)."""
        cfg = self.config
        q = width or (cfg.num_speculative_tokens + 1 if cfg.speculative_enabled else 0)
        if not (self.use_cuda_graphs and q > 1):
            return 0, []
        if not self.prefill_kernel:
            log.warning("verify steps run eagerly: their CUDA graphs need the Triton paged attention kernel")
            return 0, []
        limit = cfg.speculative_disable_by_batch_size
        most = min(limit - 1 if limit else cfg.max_num_seqs, cfg.max_num_seqs)
        sizes = graph_buckets.verify_buckets(q, most, self.graph_batch_sizes)
        if most > 0 and (not sizes or sizes[-1] < most):
            log.info("verify steps of more than %d sequences run eagerly (%d query rows each; graphs cover up to "
                     "%d rows)", sizes[-1] if sizes else 0, q, graph_buckets.MAX_VERIFY_GRAPH_ROWS)
        return (q, sizes) if sizes and most > 0 else (0, [])

    def _prefill_graph_shape(self) -> list[tuple[int, int]]:
        """The (tokens, sequences) buckets of the prefill-step graphs (graph_buckets.prefill_buckets) up to
        max_prefill_graph_tokens and the step's token budget; none without graphs or the varlen kernel."""
        cfg = self.config
        if not (self.use_cuda_graphs and self.prefill_kernel):
            return []
        return graph_buckets.prefill_buckets(min(cfg.max_prefill_graph_tokens, cfg.max_num_batched_tokens),
                                             self.graph_batch_sizes)

    def close(self) -> None:
        """Free the weights, KV pools and CUDA graphs now rather than when the engine is collected."""
        self._graphs.clear()
        self._lora_graphs.clear()
        self._verify_graphs.clear()
        self._prefill_graphs.clear()
        self._graph_pool = None
        self.kv = self.model = self.compiled_decode = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- KV pool sizing -------------------------------------------------------------------------
    def _kv_pool_dtype(self) -> torch.dtype:
        """The pools' dtype (config.kv_cache_dtype); fp8 on a GPU without e4m3 conversions is refused in one line."""
        dtype = pool_dtype(self.config.kv_cache_dtype, self.dtype)
        if dtype == self.dtype:
            return dtype
        if self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            major, minor = torch.cuda.get_device_capability(self.device)
            raise ValueError(f"kv_cache_dtype fp8 needs compute capability 8.9+ (Ada, Hopper, Blackwell), whose "
                             f"kernels convert e4m3 in hardware; this GPU is {major}.{minor}: use kv_cache_dtype auto")
        log.info("KV cache in fp8 e4m3 (kv_cache_dtype fp8): %d bytes a value instead of %d, read as %s",
                 dtype.itemsize, self.dtype.itemsize, str(self.dtype).removeprefix("torch."))
        return dtype

    def _num_kv_blocks(self) -> int:
        cfg, mc = self.config, self.model_config
        per_block = KVCache.bytes_per_block(mc.num_layers, self.block_size, mc.num_kv_heads, mc.head_dim,
                                            self.kv_dtype)
        if self.device.type == "cuda" and not cfg.num_kv_blocks:  # a set num_kv_blocks wins on any device
            peak = self._profile_peak_memory()
            total = torch.cuda.get_device_properties(self.device).total_memory
            budget = total * cfg.gpu_memory_utilization - peak
            if budget < per_block * self.max_blocks_per_seq:
                raise RuntimeError(
                    f"not enough GPU memory for one full-length sequence's KV cache: "
                    f"{budget / GIB:.2f} GiB left after weights and activations; "
                    f"raise gpu_memory_utilization or lower max_model_len"
                )
            return tensor_model_parallel_min(int(budget // per_block))  # rank 0's block ids index every rank's pool
        return num_blocks_for_budget(per_block, cfg.kv_cache_memory_gb, cfg.num_kv_blocks)

    def _profile_peak_memory(self) -> int:
        """Peak memory of a full-budget forward pass (weights + activations), measured, not guessed, plus what
        the prefill graphs keep: their shared pool holds the largest graph's activations for good (an eager
        step's go back to the allocator), taken as the measured activations scaled by its tokens."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.config.max_num_batched_tokens, self.max_blocks_per_seq * self.block_size)
        mc = self.model_config
        probe = KVCache.allocate(mc.num_layers, -(-n // self.block_size), self.block_size, mc.num_kv_heads,
                                 mc.head_dim, self.kv_dtype, self.device)
        before = torch.cuda.memory_allocated(self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.arange(n, device=self.device),
            block_tables=torch.arange(-(-n // self.block_size), device=self.device)[None, :],
            context_lens=torch.tensor([n], device=self.device),
            num_decodes=0, query_lens=[n], context_lens_host=[n], decode_context_blocks=0,
        )
        ids = torch.zeros(n, dtype=torch.int64, device=self.device)
        with torch.inference_mode():
            hidden = self.model(ids, torch.arange(n, device=self.device),
                                PagedAttention(probe, meta, self.scale, varlen_kernel=self.prefill_kernel))
            self.model.compute_logits(hidden[-self.config.max_num_seqs :])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del probe, hidden
        torch.cuda.empty_cache()
        graph_tokens = max((t for t, _ in self.prefill_graph_sizes), default=0)
        return peak + (peak - before) * graph_tokens // n

    # ---- execution -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """-> logits (M, V) fp32 of step.last_token_indices (each sequence's last new token; every new token of a
        sequence that verifies proposals)."""
        b, n = step.num_seqs, step.input_ids.shape[0]
        decode_only, adapted = step.attn.num_decodes == b, step.adapters is not None and bool(self.lora_names)
        # The CPU's one-call decode step takes what its compiled graphs were not made for, where it takes all the
        # rows: a verify step (every new token a row) and a decode step with LoRA adapters.
        if (self.compiled_decode is not None and ((step.verify_only and n > b) or (adapted and decode_only))
                and self.compiled_decode.serves_rows(n)):
            return self._native_rows(step)
        if adapted:  # decode steps replay CUDA graphs of their own; other steps with adapted tokens run eagerly
            if self._lora_graphs and decode_only and b <= self.graph_batch_sizes[-1]:
                return self._replay(step)
            return self.execute_eager(step)
        if self.compiled_decode is not None and decode_only:
            attn = step.attn  # the eager step's table width (PagedAttention.attend), so the same reduction
            return self.compiled_decode(step.input_ids, step.positions, attn.slot_mapping,
                                        attn.block_tables[:, : attn.decode_context_blocks], attn.context_lens)
        if self.device.type == "cuda" and decode_only:
            if self.use_cuda_graphs and b <= self.graph_batch_sizes[-1]:
                return self._replay(step)
            attn = step.attn
            return self._decode_logits(step.input_ids, step.positions, attn.slot_mapping, attn.block_tables,
                                       attn.context_lens)
        if self._verify_graphs and b <= self.verify_batch_sizes[-1] and max(step.attn.query_lens) <= self.verify_width:
            return self._replay_verify(step)
        bucket = self._prefill_bucket(step)
        if bucket is not None:
            return self._replay_prefill(step, bucket)
        return self.execute_eager(step)

    def _native_rows(self, step: StepInput) -> torch.Tensor:
        """A decode-only or verify step on the CPU through the one-call decode step (CompiledDecode.serves_rows),
        each new token a row: its sequence's block table, attending up to its own position (its earlier new
        tokens' K/V are written before any row attends). So a verified token's logits are the bits a decode step
        would give it, and speculation keeps the output of the plain engine. -> logits of step.last_token_indices."""
        attn, n = step.attn, step.input_ids.shape[0]
        tables, contexts = attn.block_tables, step.positions + 1
        if n > step.num_seqs:  # a row per token, each with its sequence's table
            width = -(-max(attn.context_lens_host) // self.block_size)
            query_lens = torch.tensor(attn.query_lens, device=tables.device)
            tables = tables[:, :width].repeat_interleave(query_lens, dim=0, output_size=n)
        else:
            tables = tables[:, : attn.decode_context_blocks]
        adapters = step.adapters.token_adapters if step.adapters is not None and self.lora_names else None
        logits = self.compiled_decode(step.input_ids, step.positions, attn.slot_mapping, tables, contexts, adapters)
        return logits if n == step.last_token_indices.shape[0] else logits[step.last_token_indices]

    @torch.inference_mode()
    def execute_eager(self, step: StepInput) -> torch.Tensor:
        """The step without CUDA graphs: every prefill and mixed step, and the reference the graphs are tested
        against. -> logits (M, V) fp32 of step.last_token_indices."""
        attn = PagedAttention(self.kv, step.attn, self.scale, varlen_kernel=self.prefill_kernel,
                              decode_attention_fn=self._eager_decode_attention())
        dense = self.model.dense_rows  # CPU: a step that is not decode-only takes the dense copies' prefill rule
        prefill = dense is not None and step.attn.num_decodes != step.num_seqs
        with dense.prefill_step(max(step.attn.query_lens)) if prefill else nullcontext():
            adapters = step.adapters if self.lora_names else None  # a draft runner proposes as the base
            if adapters is not None and self.model.layers_compiled:
                # Every span of adapters would be a variant of the compiled layers (a guard on its ints): one.
                adapters = dataclasses.replace(adapters, first=1, last=len(self.lora_names))
            hidden = self.model(step.input_ids, step.positions, attn, adapters)
            return self.model.compute_logits(hidden[step.last_token_indices])  # (M, V)

    # ---- CUDA graphs ---------------------------------------------------------------------------
    def _init_graph_buffers(self) -> None:
        m = self.graph_batch_sizes[-1]
        dev = self.device
        # The graphs' static inputs, one row each: ids, positions, slots, context lens (StepInput.packed's
        # first four rows in a decode-only step, so one copy fills them).
        self._inputs = torch.zeros(4, m, dtype=torch.int64, device=dev)
        self._ids, self._pos, self._slots, self._ctx = self._inputs
        self._row_adapters = torch.zeros(m, dtype=torch.int64, device=dev)  # LoRA graphs: padding rows are base
        self._tables = torch.zeros(m, self.max_blocks_per_seq, dtype=torch.int64, device=dev)
        # Padded rows of a bucket: token 0 at position 0, written into the scratch block, attending to itself.
        scratch_slot = self.scratch_block * self.block_size
        self._padding = torch.tensor([0, 0, scratch_slot, 1], device=dev)[:, None].expand(4, m)
        if self.verify_width:
            # The verify graphs' static inputs, one flat buffer: ids, positions, slots (R = rows of the largest
            # bucket each), then context lens and query lens (its batch each). Padding as above, query length 1.
            rows, seqs = self.verify_batch_sizes[-1] * self.verify_width, self.verify_batch_sizes[-1]
            self._verify_inputs = torch.tensor([0] * rows + [0] * rows + [scratch_slot] * rows + [1] * (2 * seqs),
                                               dtype=torch.int64, device=dev)
            self._verify_padding = self._verify_inputs.clone()
        if self.prefill_graph_sizes:
            # The prefill graphs' static inputs: ids, positions, slots of the largest token bucket (padding: token
            # 0 at position 0 in the scratch block), then per sequence of the largest bucket its query start (one
            # more), context length and the row of the token whose logits it wants (padding: no tokens).
            tokens = max(t for t, _ in self.prefill_graph_sizes)
            self._prefill_tokens = torch.tensor([[0], [0], [scratch_slot]], device=dev).repeat(1, tokens)
            self._prefill_token_padding = self._prefill_tokens.clone()
            self._prefill_seqs = torch.zeros(3 * m + 1, dtype=torch.int64, device=dev)

    def _context_bucket(self, blocks: int) -> int:
        return next(b for b in self.context_buckets if b >= blocks)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        """Capture every (batch, context) bucket at start-up, largest first (they share one memory pool),
        so that serving never stalls on a capture or a compile."""
        started = time.monotonic()
        for bucket in reversed(self.graph_batch_sizes):
            for ctx_blocks in reversed(self.context_buckets):
                self._capture(bucket, ctx_blocks)
            for ctx_blocks in reversed(self.context_buckets if self.lora_names else ()):
                self._capture(bucket, ctx_blocks, lora=True)
        for bucket in reversed(self.verify_batch_sizes):
            self._capture_verify(bucket)
        for tokens, seqs in reversed(self.prefill_graph_sizes):
            self._capture_prefill(tokens, seqs)
        log.info("captured %d CUDA graphs (torch.compile %s) in %.1f s",
                 len(self._graphs) + len(self._lora_graphs) + len(self._verify_graphs) + len(self._prefill_graphs),
                 "on" if self.config.enable_torch_compile else "off", time.monotonic() - started)
        if tile_config.UNMEASURED:  # one missing row bucket has cost several times the step (tile_config.py)
            log.info("decode matmuls on untimed tiles (no entry in their kernel's TILES; benchmarks/"
                     "quant_kernels_bench.py --device cuda measures them): %s",
                     "; ".join(tile_config.unmeasured_shapes()))

    def _replay(self, step: StepInput) -> torch.Tensor:
        b = step.num_seqs
        bucket = next(x for x in self.graph_batch_sizes if x >= b)
        ctx_blocks = self._context_bucket(step.attn.decode_context_blocks)
        if b < bucket:
            self._inputs[:, b:bucket].copy_(self._padding[:, b:bucket])
            self._tables[b:bucket].fill_(self.scratch_block)
        self._inputs[:, :b].copy_(step.packed.view(5, b)[:4])
        width = step.attn.block_tables.shape[1]
        self._tables[:b, :width].copy_(step.attn.block_tables)
        graphs = self._graphs
        if step.adapters is not None and self.lora_names:
            self._row_adapters[b:bucket].zero_()
            self._row_adapters[:b].copy_(step.adapters.token_adapters)
            graphs = self._lora_graphs
        graph = graphs[(bucket, ctx_blocks)]
        graph.graph.replay()
        return graph.logits[:b]

    def _decode_logits(self, ids, positions, slots, tables, context_lens, adapters=None) -> torch.Tensor:
        """The decode step (captured or eager): (B,) ids/positions/slots, tables (B, W), context_lens (B,)
        -> (B, V). adapters: the rows' LoRA adapters (StepAdapters), whose steps take the unfused matmuls."""
        if tables.shape[1] <= self.kernel_context_blocks:
            from kvtriton.backend.models.llama_decode import KernelPagedDecode, decode_logits  # needs triton

            ctx = KernelPagedDecode(self.kv, positions, slots, tables, context_lens, self.scale, self.model.rotary)
            if adapters is not None:
                return self.model.compute_logits(self.model(ids, positions, ctx, adapters))
            return decode_logits(self.model, ids, ctx, self.fuse_matmuls)
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=tables, context_lens=context_lens, num_decodes=0, query_lens=[],
            context_lens_host=[], decode_context_blocks=0, decode_only=True,
        )
        attn = PagedAttention(self.kv, meta, self.scale, decode_attention_fn=self._eager_decode_attention())
        return self.model.compute_logits(self.model(ids, positions, attn, adapters))

    def _eager_decode_attention(self):
        """What eager steps attend decode rows with: the compiled decode's own attention where there is one (the
        same bits as its steps), else PagedAttention's default."""
        return self.compiled_decode.eager_attention if self.compiled_decode is not None else None

    def _capture(self, bucket: int, ctx_blocks: int, lora: bool = False) -> _Graph:
        """lora: the graph of steps with adapted rows (each row's adapter from _row_adapters)."""
        adapters = StepAdapters(self._row_adapters[:bucket], 1, len(self.lora_names)) if lora else None

        def run():
            return self._decode_logits(self._ids[:bucket], self._pos[:bucket], self._slots[:bucket],
                                       self._tables[:bucket, :ctx_blocks], self._ctx[:bucket], adapters)

        captured = self._capture_graph(run)
        (self._lora_graphs if lora else self._graphs)[(bucket, ctx_blocks)] = captured
        log.debug("captured CUDA graph for batch %d, %d context blocks%s", bucket, ctx_blocks,
                  ", LoRA" if lora else "")
        return captured

    def _verify_views(self, bucket: int) -> tuple[torch.Tensor, ...]:
        """The verify inputs of a bucket: ids, positions, slots (bucket * Q,), context lens, query lens (bucket,)."""
        rows, seqs = self.verify_batch_sizes[-1] * self.verify_width, self.verify_batch_sizes[-1]
        buf, n = self._verify_inputs, bucket * self.verify_width
        return (buf[:n], buf[rows : rows + n], buf[2 * rows : 2 * rows + n], buf[3 * rows : 3 * rows + bucket],
                buf[3 * rows + seqs : 3 * rows + seqs + bucket])

    def _capture_verify(self, bucket: int) -> _Graph:
        ids, positions, slots, context_lens, query_lens = self._verify_views(bucket)

        def run():
            attn = UniformQueryAttention(self.kv, slots, self._tables[:bucket], query_lens, context_lens, self.scale)
            return self.model.compute_logits(self.model(ids, positions, attn))  # (bucket * Q, V)

        captured = self._verify_graphs[bucket] = self._capture_graph(run)
        log.debug("captured CUDA graph for verify steps of batch %d, %d rows each", bucket, self.verify_width)
        return captured

    def _replay_verify(self, step: StepInput) -> torch.Tensor:
        """A step whose sequences bring 1 .. Q new tokens each, through the verify graph of its batch bucket."""
        attn, q = step.attn, self.verify_width
        b, n = step.num_seqs, step.input_ids.shape[0]
        bucket = next(x for x in self.verify_batch_sizes if x >= b)
        rows, seqs = self.verify_batch_sizes[-1] * q, self.verify_batch_sizes[-1]
        # Where each of the packed buffer's first 3N + B entries (ids, positions, slots, context lens) goes in
        # the graph's inputs, then the query lens: one host-to-device copy.
        qlens = np.asarray(attn.query_lens, dtype=np.int64)
        row = uniform_rows(attn.query_lens, q)
        host = torch.from_numpy(np.concatenate([row, rows + row, 2 * rows + row, 3 * rows + np.arange(b), qlens]))
        dev = to_device(host, self.device)
        buf = self._verify_inputs
        buf.copy_(self._verify_padding)
        buf.index_copy_(0, dev[: 3 * n + b], step.packed[: 3 * n + b])
        buf[3 * rows + seqs : 3 * rows + seqs + b].copy_(dev[3 * n + b :])
        width = attn.block_tables.shape[1]
        self._tables[:b, :width].copy_(attn.block_tables)
        if b < bucket:
            self._tables[b:bucket].fill_(self.scratch_block)
        graph = self._verify_graphs[bucket]
        graph.graph.replay()
        # The packed rows whose logits the step wants, at their places in the graph's (bucket * Q, V).
        return graph.logits.index_select(0, dev[:n].index_select(0, step.last_token_indices))

    def _prefill_views(self, tokens: int, seqs: int) -> tuple[torch.Tensor, ...]:
        """The prefill inputs of a bucket: ids, positions, slots (tokens,), query starts (seqs + 1,), context lens
        and logits rows (seqs,)."""
        m = self.graph_batch_sizes[-1]
        ids, positions, slots = self._prefill_tokens[:, :tokens]
        buf = self._prefill_seqs
        return ids, positions, slots, buf[: seqs + 1], buf[m + 1 : m + 1 + seqs], buf[2 * m + 1 : 2 * m + 1 + seqs]

    def _capture_prefill(self, tokens: int, seqs: int) -> _Graph:
        ids, positions, slots, query_start, context_lens, rows = self._prefill_views(tokens, seqs)

        def run():
            meta = AttentionMetadata(slot_mapping=slots, block_tables=self._tables[:seqs], context_lens=context_lens,
                                     num_decodes=0, query_lens=[], context_lens_host=[], decode_context_blocks=0)
            attn = PagedAttention(self.kv, meta, self.scale, varlen_kernel=True, query_start=query_start)
            return self.model.compute_logits(self.model(ids, positions, attn)[rows])  # (seqs, V)

        captured = self._prefill_graphs[(tokens, seqs)] = self._capture_graph(run)
        log.debug("captured CUDA graph for prefill steps of %d tokens, %d sequences", tokens, seqs)
        return captured

    def _prefill_bucket(self, step: StepInput) -> tuple[int, int] | None:
        """The (tokens, sequences) bucket of the smallest prefill graph that holds the step, or None."""
        if not self._prefill_graphs:
            return None
        n, rows = step.input_ids.shape[0], max(step.num_seqs, step.last_token_indices.shape[0])
        return next(((t, b) for t, b in self.prefill_graph_sizes if t >= n and b >= rows), None)

    def _replay_prefill(self, step: StepInput, bucket: tuple[int, int]) -> torch.Tensor:
        """A prefill or mixed step through the graph of its bucket: its tokens first, padding after them."""
        tokens, seqs = bucket
        attn, m = step.attn, self.graph_batch_sizes[-1]
        n, b, rows = step.input_ids.shape[0], step.num_seqs, step.last_token_indices.shape[0]
        self._prefill_tokens[:, n:tokens].copy_(self._prefill_token_padding[:, n:tokens])
        self._prefill_tokens[:, :n].copy_(step.packed[: 3 * n].view(3, n))
        # Per sequence, one host-to-device copy: query starts (padding sequences start and end at n), context
        # lengths (padding: 0); then the logits rows from the step's own (padding: row 0, never read back).
        host = np.zeros(3 * m + 1, dtype=np.int64)
        np.cumsum(attn.query_lens, out=host[1 : b + 1])
        host[b + 1 : seqs + 1] = n
        host[m + 1 : m + 1 + b] = attn.context_lens_host
        self._prefill_seqs.copy_(torch.from_numpy(host).pin_memory(), non_blocking=True)
        self._prefill_seqs[2 * m + 1 : 2 * m + 1 + rows].copy_(step.last_token_indices)
        self._tables[:b, : attn.block_tables.shape[1]].copy_(attn.block_tables)
        graph = self._prefill_graphs[bucket]
        graph.graph.replay()
        return graph.logits[:rows]

    def _capture_graph(self, run) -> _Graph:
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            run()  # warm-up outside the graph (lazy inits, allocator)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = run()
        self._graph_pool = graph.pool()
        return _Graph(graph, logits)
