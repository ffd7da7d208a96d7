"""TorchRunner: runs the Llama core in PyTorch over the paged KV cache (CPU reference, CUDA fast path).

On CUDA, decode-only steps replay CUDA graphs captured per (batch, context)
bucket: one launch per step instead of hundreds, which is what batch-1 decode
needs to approach the HBM roofline. Inside them the Triton kernels
(models/llama_decode.py) do paged attention straight from the block tables,
splitting long contexts across programs, and at batch <= FUSED_MAX_BATCH fuse
each matmul with its neighbouring elementwise work; the kernel reads only each
context's own blocks, so one context bucket (max_model_len) serves every
context. Without triton, attention gathers the context in PyTorch, per doubling
context bucket. Prefill and mixed steps run eagerly; with the kernels on, their
attention is one varlen Triton kernel over the packed tokens. With
torch.compile on, the per-layer work around attention is compiled once for all
layers. Padded rows of a bucket write into a scratch block that the block
manager never hands out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from kvtriton.backend.attention.kv_cache import GIB, KVCache, num_blocks_for_budget
from kvtriton.backend.attention.metadata import AttentionMetadata
from kvtriton.backend.attention.paged import PagedAttention
from kvtriton.backend.config import EngineConfig
from kvtriton.backend.distributed.communication_op import tensor_model_parallel_min
from kvtriton.backend.models.loader import load_model, resolve_quantization
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.models.parallel.sharded_loader import load_sharded_model
from kvtriton.backend.models.parallel.sharding import rank_model_config
from kvtriton.backend.runners.step_input import StepInput

log = logging.getLogger("kvtriton")


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # (bucket, V) output buffer


class TorchRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, folder: str | None,
                 device: torch.device, dtype: torch.dtype, max_model_len: int):
        self.config, self.model_config, self.device, self.dtype = config, model_config, device, dtype
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.shard_report = None  # tensor parallelism: what this rank loaded (models/parallel/sharded_loader.py)
        if config.tensor_parallel_size > 1:  # this process is one rank of a group (runners/tensor_parallel_runner.py)
            self.model, self.shard_report = load_sharded_model(folder, model_config, dtype, device,
                                                               config.dummy_weights)
            # The rank's heads and MLP columns: its KV pool and the kernels' shape checks see only those.
            self.model_config = model_config = rank_model_config(model_config, config.tensor_parallel_size)
        else:
            quantization, gguf = resolve_quantization(config.quantization, config.model, device)
            self.model = load_model(folder, dtype=dtype, device=device, config=model_config,
                                    dummy=config.dummy_weights, quantization=quantization,
                                    group_size=config.quantization_group_size, gguf=gguf)
        self.scale = model_config.head_dim**-0.5
        # Widest block table the Triton decode attention kernel takes (0: kernel off), whether small decode
        # batches fuse their matmuls, and whether prefill attention is the varlen kernel.
        self.kernel_context_blocks, self.fuse_matmuls, self.prefill_kernel = self._triton_kernels()
        self.num_blocks = self._num_kv_blocks()
        # One extra block at the end: the scratch target of padded CUDA-graph rows.
        self.kv = KVCache.allocate(model_config.num_layers, self.num_blocks + 1, self.block_size,
                                   model_config.num_kv_heads, model_config.head_dim, dtype, device)
        self.scratch_block = self.num_blocks
        self.context_buckets = self._context_buckets()
        self.use_cuda_graphs = device.type == "cuda" and config.enable_cuda_graphs
        self.graph_batch_sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= config.max_num_seqs]
        if self.graph_batch_sizes[-1] < config.max_num_seqs:
            self.graph_batch_sizes.append(config.max_num_seqs)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._graph_pool = None
        if self.use_cuda_graphs:
            self._init_graph_buffers()
            if config.enable_torch_compile:
                self.model.compile_layers()
            self._capture_all()

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
        return self.max_blocks_per_seq, why is None, prefill

    def close(self) -> None:
        """Free the weights, KV pools and CUDA graphs now rather than when the engine is collected."""
        self._graphs.clear()
        self._graph_pool = None
        self.kv = self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- KV pool sizing -------------------------------------------------------------------------
    def _num_kv_blocks(self) -> int:
        cfg, mc = self.config, self.model_config
        per_block = KVCache.bytes_per_block(mc.num_layers, self.block_size, mc.num_kv_heads, mc.head_dim, self.dtype)
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
        """Peak memory of a full-budget forward pass (weights + activations), measured, not guessed."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.config.max_num_batched_tokens, self.max_blocks_per_seq * self.block_size)
        mc = self.model_config
        probe = KVCache.allocate(mc.num_layers, -(-n // self.block_size), self.block_size, mc.num_kv_heads,
                                 mc.head_dim, self.dtype, self.device)
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
        return peak

    # ---- execution -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """-> logits (B, V) fp32 of each sequence's last new token."""
        b = step.num_seqs
        if self.device.type == "cuda" and step.attn.num_decodes == b:
            if self.use_cuda_graphs and b <= self.graph_batch_sizes[-1]:
                return self._replay(step)
            attn = step.attn
            return self._decode_logits(step.input_ids, step.positions, attn.slot_mapping, attn.block_tables,
                                       attn.context_lens)
        attn = PagedAttention(self.kv, step.attn, self.scale, varlen_kernel=self.prefill_kernel)
        hidden = self.model(step.input_ids, step.positions, attn)
        return self.model.compute_logits(hidden[step.last_token_indices])  # (B, V)

    # ---- CUDA graphs ---------------------------------------------------------------------------
    def _init_graph_buffers(self) -> None:
        m = self.graph_batch_sizes[-1]
        dev = self.device
        # The graphs' static inputs, one row each: ids, positions, slots, context lens (StepInput.packed's
        # first four rows in a decode-only step, so one copy fills them).
        self._inputs = torch.zeros(4, m, dtype=torch.int64, device=dev)
        self._ids, self._pos, self._slots, self._ctx = self._inputs
        self._tables = torch.zeros(m, self.max_blocks_per_seq, dtype=torch.int64, device=dev)
        # Padded rows of a bucket: token 0 at position 0, written into the scratch block, attending to itself.
        self._padding = torch.tensor([0, 0, self.scratch_block * self.block_size, 1], device=dev)[:, None].expand(4, m)

    def _context_buckets(self) -> list[int]:
        """Block-table widths a graph is captured for. The attention kernel reads only each context's own
        blocks, so one bucket serves every context; the PyTorch path gathers, so its buckets double."""
        buckets = [self.kernel_context_blocks or 8]
        while buckets[-1] < self.max_blocks_per_seq:
            buckets.append(buckets[-1] * 2)
        return sorted({min(b, self.max_blocks_per_seq) for b in buckets})

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
        log.info("captured %d CUDA graphs (torch.compile %s) in %.1f s", len(self._graphs),
                 "on" if self.config.enable_torch_compile else "off", time.monotonic() - started)

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
        graph = self._graphs[(bucket, ctx_blocks)]
        graph.graph.replay()
        return graph.logits[:b]

    def _decode_logits(self, ids, positions, slots, tables, context_lens) -> torch.Tensor:
        """The decode step (captured or eager): (B,) ids/positions/slots, tables (B, W), context_lens (B,)
        -> (B, V)."""
        if tables.shape[1] <= self.kernel_context_blocks:
            from kvtriton.backend.models.llama_decode import KernelPagedDecode, decode_logits  # needs triton

            ctx = KernelPagedDecode(self.kv, positions, slots, tables, context_lens, self.scale)
            return decode_logits(self.model, ids, ctx, self.fuse_matmuls)
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=tables, context_lens=context_lens, num_decodes=0, query_lens=[],
            context_lens_host=[], decode_context_blocks=0, decode_only=True,
        )
        return self.model.compute_logits(self.model(ids, positions, PagedAttention(self.kv, meta, self.scale)))

    def _capture(self, bucket: int, ctx_blocks: int) -> _Graph:
        def run():
            return self._decode_logits(self._ids[:bucket], self._pos[:bucket], self._slots[:bucket],
                                       self._tables[:bucket, :ctx_blocks], self._ctx[:bucket])

        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            run()  # warm-up outside the graph (lazy inits, allocator)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            logits = run()
        self._graph_pool = graph.pool()
        captured = _Graph(graph, logits)
        self._graphs[(bucket, ctx_blocks)] = captured
        log.debug("captured CUDA graph for batch %d, %d context blocks", bucket, ctx_blocks)
        return captured
