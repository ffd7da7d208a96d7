"""TensorRTRunner: runs a `kvtriton build --runtime tensorrt` engine over the paged KV pools (CUDA only).

Before touching the engine it checks the manifest written beside it, because
a serialised engine only loads in the TensorRT that built it and only runs on
the GPU architectures it was built for, and TensorRT's own failure there is an
opaque deserialisation error. Each refusal is one line that says how to rebuild.

The step is split like the onnxruntime runner's (step_groups.py); the
decode group runs in profile 0's context, prefill chunks in profile 1's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kvtriton.backend.attention.kv_cache import write_kv
from kvtriton.backend.config import EngineConfig
from kvtriton.backend.models.dtypes import TORCH_DTYPES
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.runners.graph_spec import read_spec
from kvtriton.backend.runners.manifest import Manifest, check_quantization
from kvtriton.backend.runners.onnx_runner import check_graph_matches
from kvtriton.backend.runners.step_groups import StepGroup, split_step
from kvtriton.backend.runners.step_input import StepInput
from kvtriton.backend.runners.tensorrt_module import flavour, import_tensorrt

log = logging.getLogger("kvtriton")

# What TensorRT for RTX's runtime accepts (its error on Hopper lists these).
RTX_RUNTIME_CAPABILITIES = ("SM80", "SM86", "SM89", "SM120", "SM121")


def rebuild_hint(manifest: Manifest) -> str:
    return (f"rebuild it here: kvtriton build {manifest.source} --precision {manifest.precision} "
            f"--runtime tensorrt --out <repository> --overwrite")


def check_runnable(manifest: Manifest, engine_path: str, trt_module, capability: tuple[int, int] | None) -> None:
    """Refuse, in one line, an engine this process cannot run: no GPU, other TensorRT, other GPU."""
    if manifest.runner != "tensorrt" or not manifest.engine:
        raise ValueError(f"{engine_path}: its manifest says runner {manifest.runner}; use runner={manifest.runner}")
    check_quantization(manifest, "tensorrt", engine_path)
    if capability is None and manifest.precision == "int4":  # its graph's int4 layout is TensorRT's, not onnxruntime's
        raise RuntimeError(f"runner=tensorrt needs a CUDA GPU and this process sees none; on a CPU build for "
                           f"onnxruntime: kvtriton build {manifest.source} --precision int4 --runtime onnxruntime")
    if capability is None:
        raise RuntimeError(f"runner=tensorrt needs a CUDA GPU and this process sees none; on a CPU use "
                           f"runner=onnxruntime with engine_path={Path(engine_path).with_name(manifest.graph)}")
    sm = f"SM{capability[0]}{capability[1]}"
    if manifest.builder == "tensorrt_rtx" and sm not in RTX_RUNTIME_CAPABILITIES:
        raise RuntimeError(f"{engine_path} is a TensorRT for RTX engine, and its runtime cannot run on this GPU "
                           f"(compute capability {capability[0]}.{capability[1]}; it supports "
                           f"{', '.join(RTX_RUNTIME_CAPABILITIES)}); use runner=torch on this GPU, or build with "
                           f"full TensorRT on it")
    if sm not in manifest.target:
        raise RuntimeError(f"{engine_path} was built for {', '.join(manifest.target)}, this GPU is {sm}; "
                           f"{rebuild_hint(manifest)}")
    if trt_module is None:
        raise ImportError(f"{engine_path} needs {manifest.builder} {manifest.versions.get(manifest.builder)}, "
                          f"which this Python cannot import; install it, or {rebuild_hint(manifest)}")
    have = (flavour(trt_module), trt_module.__version__)
    want = (manifest.builder, manifest.versions.get(manifest.builder))
    if have != want:
        raise RuntimeError(f"{engine_path} was built by {want[0]} {want[1]}, this process has {have[0]} {have[1]} "
                           f"(engines do not load across versions); {rebuild_hint(manifest)}")


class TensorRTRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, folder, device: torch.device,
                 dtype: torch.dtype, max_model_len: int):
        if not config.engine_path:
            raise ValueError("runner=tensorrt needs engine_path: the .engine file that `kvtriton build "
                             "--runtime tensorrt` wrote")
        engine_path = Path(config.engine_path)
        manifest = Manifest.read(engine_path.parent)
        try:
            trt = import_tensorrt()
        except ImportError:
            trt = None
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        check_runnable(manifest, str(engine_path), trt, capability)
        self.spec = spec = read_spec(engine_path.with_name(manifest.graph))
        check_graph_matches(spec, config, model_config, str(engine_path))
        self.limits = manifest.limits
        if config.num_kv_blocks not in (0, manifest.limits["num_blocks"]):
            raise ValueError(f"num_kv_blocks {config.num_kv_blocks}: the engine's KV pool has "
                             f"{manifest.limits['num_blocks']} blocks; remove the parameter or rebuild with "
                             f"--num-kv-blocks {config.num_kv_blocks}")
        self.device, self.block_size = device, spec.block_size
        self.kv_dtype = TORCH_DTYPES[spec.kv_dtype]
        self.num_blocks = manifest.limits["num_blocks"]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{engine_path}: TensorRT could not deserialise it; {rebuild_hint(manifest)}")
        self.stream = torch.cuda.Stream(device)
        # One execution context per optimization profile: 0 decode (T = 1), 1 prefill (B = 1).
        self.contexts = []
        for profile in range(self.engine.num_optimization_profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.contexts.append(context)
        shape = (spec.num_layers, self.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.kv_dtype, device=device)  # (L, NB, BS, Hkv, D)
        self.v_cache = torch.zeros(shape, dtype=self.kv_dtype, device=device)
        log.info("tensorrt runner: %s (%s, %s %s)", engine_path, spec.precision, manifest.builder,
                 manifest.versions.get(manifest.builder))

    def close(self) -> None:
        """Free the execution contexts (before their engine), the engine and the KV pools now."""
        self.contexts = []
        self.engine = self.k_cache = self.v_cache = None
        torch.cuda.empty_cache()

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """-> logits (B, V) fp32 of each sequence's last new token."""
        logits = [self._run(group) for group in split_step(step, self.block_size, self.device)]
        return torch.cat(logits) if len(logits) > 1 else logits[0]  # (B, V)

    def _run(self, group: StepGroup) -> torch.Tensor:
        spec = self.spec
        b, t = group.input_ids.shape
        if b > self.limits["max_num_seqs"] or t > self.limits["max_num_batched_tokens"]:
            raise ValueError(f"a call of {b} sequences x {t} tokens exceeds the engine's profiles "
                             f"({self.limits}); set max_num_seqs / max_num_batched_tokens to the build's values")
        context = self.contexts[0 if t == 1 else 1]
        logits = torch.empty(b, spec.vocab_size, dtype=torch.float32, device=self.device)  # (B, V)
        kv_shape = (spec.num_layers, b, t, spec.num_kv_heads, spec.head_dim)
        new_k = torch.empty(kv_shape, dtype=self.kv_dtype, device=self.device)  # (L, B, T, Hkv, D)
        new_v = torch.empty(kv_shape, dtype=self.kv_dtype, device=self.device)
        tensors = {"input_ids": group.input_ids, "positions": group.positions, "k_cache": self.k_cache,
                   "v_cache": self.v_cache, "block_tables": group.block_tables,
                   "logits": logits, "new_k": new_k, "new_v": new_v}
        for name in ("input_ids", "positions", "k_cache", "v_cache", "block_tables"):
            context.set_input_shape(name, tuple(tensors[name].shape))
        for name, tensor in tensors.items():
            context.set_tensor_address(name, tensor.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed; see the TensorRT log lines above")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        write_kv(self.k_cache, self.v_cache, group.slot_mapping, new_k, new_v)
        return logits
