"""OnnxRunner: runs the exported step graph (backend/runners/step_graph.py) in onnxruntime over the paged KV pools.

The runner owns the pools as torch tensors `(L, NB, BS, Hkv, D)` and binds
them, and preallocated outputs, to the session by pointer (io_binding): no
copy of the pool per call, and the same code path on the CPU and the CUDA
execution provider. The graph returns the new tokens' K/V; the runner writes
them at their slots after each call.

A step is run as one graph call per uniform group, the graph's (B, T) shape:
the decode group (T = 1) in one call, then each prefill chunk (B = 1). Each
group reads only context written by earlier steps, so the order of the calls
within a step does not matter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kvtriton.backend.attention.kv_cache import KVCache, num_blocks_for_budget, write_kv
from kvtriton.backend.config import EngineConfig
from kvtriton.backend.models.dtypes import TORCH_DTYPES
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.runners.graph_spec import read_spec
from kvtriton.backend.runners.manifest import MANIFEST_NAME, Manifest, check_quantization
from kvtriton.backend.runners.step_groups import StepGroup, split_step
from kvtriton.backend.runners.step_input import StepInput

log = logging.getLogger("kvtriton")


class OnnxRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, folder, device: torch.device,
                 dtype: torch.dtype, max_model_len: int):
        import onnxruntime as ort

        if not config.engine_path:
            raise ValueError("runner=onnxruntime needs engine_path: the .onnx file that `kvtriton build` wrote")
        self.spec = spec = read_spec(config.engine_path)
        check_graph_matches(spec, config, model_config, config.engine_path)
        if (Path(config.engine_path).parent / MANIFEST_NAME).is_file():  # a bare exported graph has none
            check_quantization(Manifest.read(Path(config.engine_path).parent), "onnxruntime", config.engine_path)
        if spec.kv_dtype == "bfloat16":
            raise ValueError(f"{config.engine_path}: onnxruntime does not run bfloat16 graphs; "
                             f"rebuild with --precision fp16 or fp32, or use runner=tensorrt")
        providers, device = self._providers(ort, device, config.device)
        self.device = device
        self.kv_dtype = TORCH_DTYPES[spec.kv_dtype]
        self.block_size = spec.block_size
        self.session = ort.InferenceSession(config.engine_path, providers=providers)
        per_block = KVCache.bytes_per_block(spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim,
                                            self.kv_dtype)
        self.num_blocks = num_blocks_for_budget(per_block, config.kv_cache_memory_gb, config.num_kv_blocks)
        shape = (spec.num_layers, self.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=device)  # (L, NB, BS, Hkv, D)
        self.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        log.info("onnxruntime runner: %s (%s) on %s", config.engine_path, spec.precision,
                 self.session.get_providers()[0])

    def close(self) -> None:
        """Free the session and KV pools now rather than when the engine is collected."""
        self.session = self.k_cache = self.v_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @staticmethod
    def _providers(ort, device: torch.device, asked: str) -> tuple[list, torch.device]:
        available = ort.get_available_providers()
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in available and asked == "auto":
                log.info("onnxruntime has no CUDA execution provider: the onnxruntime runner runs on the CPU")
                return ["CPUExecutionProvider"], torch.device("cpu")
            if "CUDAExecutionProvider" not in available:
                raise RuntimeError(f"device {device} was asked for, but this onnxruntime has no CUDA execution "
                                   f"provider ({', '.join(available)}); install onnxruntime-gpu or use device=cpu")
            return [("CUDAExecutionProvider", {"device_id": device.index or 0})], device
        return ["CPUExecutionProvider"], device

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """-> logits (B, V) fp32 of each sequence's last new token, in the step's sequence order."""
        logits = [self._run(group) for group in split_step(step, self.block_size, self.device)]
        out = torch.cat(logits) if len(logits) > 1 else logits[0]  # (B, V)
        return out.to(step.input_ids.device)  # the engine samples where it prepared the step

    def _run(self, group: StepGroup) -> torch.Tensor:
        spec = self.spec
        b, t = group.input_ids.shape
        logits = torch.empty(b, spec.vocab_size, dtype=torch.float32, device=self.device)  # (B, V)
        kv_shape = (spec.num_layers, b, t, spec.num_kv_heads, spec.head_dim)
        new_k = torch.empty(kv_shape, dtype=self.kv_dtype, device=self.device)  # (L, B, T, Hkv, D)
        new_v = torch.empty(kv_shape, dtype=self.kv_dtype, device=self.device)
        binding = self.session.io_binding()
        tensors = {"input_ids": group.input_ids, "positions": group.positions, "k_cache": self.k_cache,
                   "v_cache": self.v_cache, "block_tables": group.block_tables}
        for name, tensor in tensors.items():
            _bind(binding.bind_input, name, tensor)
        for name, tensor in (("logits", logits), ("new_k", new_k), ("new_v", new_v)):
            _bind(binding.bind_output, name, tensor)
        self.session.run_with_iobinding(binding)
        write_kv(self.k_cache, self.v_cache, group.slot_mapping, new_k, new_v)
        return logits


def _bind(bind, name: str, tensor: torch.Tensor) -> None:
    # By pointer: the tensor must stay alive and contiguous until the run returns (the caller holds it).
    assert tensor.is_contiguous(), name
    device = "cuda" if tensor.is_cuda else "cpu"
    element = torch.empty(0, dtype=tensor.dtype).numpy().dtype
    bind(name, device, tensor.device.index or 0, element, tuple(tensor.shape), tensor.data_ptr())


def check_graph_matches(spec, config: EngineConfig, model_config: ModelConfig, path: str) -> None:
    """A graph built for another model or block size would run and return garbage: refuse it, saying why."""
    if spec.block_size != config.block_size:
        raise ValueError(f"{path} was built for block_size {spec.block_size}, the engine has {config.block_size}; "
                         f"set block_size={spec.block_size} or rebuild with --block-size {config.block_size}")
    mine = (model_config.num_layers, model_config.num_kv_heads, model_config.head_dim, model_config.vocab_size)
    theirs = (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size)
    if mine != theirs:
        raise ValueError(f"{path} was built for another model (layers, kv heads, head dim, vocab {theirs}) than "
                         f"{config.model} {mine}; rebuild it from that checkpoint with `kvtriton build`")
