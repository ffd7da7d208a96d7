"""Build a TensorRT engine from the step graph (backend/runners/step_graph.py), strongly typed, with dynamic shapes.

Precision lives in the ONNX graph (fp16/bf16 casts, int8 DequantizeLinear): TensorRT 10+ builds it
strongly typed, with no precision flags or calibrators. The builder is `tensorrt` where importable,
else TensorRT for RTX (`tensorrt_rtx`, PyPI wheels tensorrt-rtx-cu13-libs + -bindings), whose builder
runs on a CPU-only machine for a named GPU architecture; both share this API.

Two optimization profiles, chosen per call by the runner:
  0 decode:  B in [1, max_num_seqs],  T = 1
  1 prefill: B = 1,                    T in [1, max_num_batched_tokens]
Both: block-table width in [1, max_blocks_per_seq], KV pool of exactly num_blocks blocks
(the pool is allocated once, so its size is fixed when the engine is built).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

from kvtriton.backend.runners.tensorrt_module import flavour, import_tensorrt

# TensorRT for RTX targets named architectures when no GPU is present (Ampere .. Blackwell consumer parts).
RTX_TARGETS = ("SM80", "SM86", "SM89", "SM120")


@dataclass(frozen=True)
class EngineLimits:
    """The shapes the engine must accept; they come from the serving config (EngineConfig)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_blocks_per_seq: int
    num_blocks: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    def profiles(self, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int) -> list[dict]:
        """Per profile: input name -> (min, opt, max) shapes."""
        pool = (num_layers, self.num_blocks, block_size, num_kv_heads, head_dim)
        mb = self.max_blocks_per_seq
        tables_opt = min(mb, 32)

        def profile(batch: tuple[int, int, int], tokens: tuple[int, int, int]) -> dict:
            shapes = {
                "input_ids": tuple((b, t) for b, t in zip(batch, tokens)),
                "block_tables": tuple((b, w) for b, w in zip(batch, (1, tables_opt, mb))),
                "k_cache": (pool, pool, pool),
                "v_cache": (pool, pool, pool),
            }
            shapes["positions"] = shapes["input_ids"]
            return shapes

        decode = profile((1, min(8, self.max_num_seqs), self.max_num_seqs), (1, 1, 1))
        prefill = profile((1, 1, 1), (1, min(128, self.max_num_batched_tokens), self.max_num_batched_tokens))
        return [decode, prefill]


@dataclass(frozen=True)
class BuiltEngine:
    path: Path
    builder: str  # tensorrt | tensorrt_rtx
    version: str
    targets: tuple[str, ...]  # GPU architectures (RTX) or the build machine's GPU
    profiles: list[dict]
    io: dict[str, tuple[str, str, tuple[int, ...]]]  # name -> (INPUT|OUTPUT, dtype, shape; -1 dynamic)
    seconds: float


def build_engine(onnx_path: str | Path, engine_path: str | Path, limits: EngineLimits, spec,
                 progress: Callable[[str], None] = print) -> BuiltEngine:
    """Parse `onnx_path`, build with `limits`' profiles, write `engine_path`. `spec`: the graph's GraphSpec."""
    trt = import_tensorrt()
    kind = flavour(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_strongly_typed_flag(trt))
    parser = trt.OnnxParser(network, logger)
    start = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    progress(f"parsed {Path(onnx_path).name}: {network.num_layers} layers ({time.perf_counter() - start:.1f}s)")
    io = network_io(trt, network)
    config = builder.create_builder_config()
    targets = _set_targets(trt, kind, config)
    profiles = limits.profiles(spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    progress(f"building {kind} {trt.__version__} engine for {', '.join(targets)} (minutes for large models)")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}; see the log lines above")
    Path(engine_path).write_bytes(bytes(plan))
    seconds = time.perf_counter() - start
    progress(f"wrote {engine_path} ({Path(engine_path).stat().st_size / 2**20:.0f} MiB, {seconds:.1f}s)")
    return BuiltEngine(Path(engine_path), kind, trt.__version__, targets, profiles, io, seconds)


def _strongly_typed_flag(trt: ModuleType) -> int:
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8/9 still ask for it
        flag |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return flag


def _set_targets(trt: ModuleType, kind: str, config) -> tuple[str, ...]:
    if kind == "tensorrt_rtx":
        config.num_compute_capabilities = len(RTX_TARGETS)
        for i, name in enumerate(RTX_TARGETS):
            config.set_compute_capability(getattr(trt.ComputeCapability, name), i)
        return RTX_TARGETS
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("TensorRT (not for RTX) builds for the GPU it runs on and this machine has none; "
                           "build on the serving GPU, or install TensorRT for RTX to build on a CPU")
    major, minor = torch.cuda.get_device_capability()
    return (f"SM{major}{minor}",)


def network_io(trt: ModuleType, network) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """The engine's I/O as TensorRT typed it (the engine has exactly the network's I/O tensors)."""
    out = {}
    for mode, count, get in (("INPUT", network.num_inputs, network.get_input),
                             ("OUTPUT", network.num_outputs, network.get_output)):
        for i in range(count):
            tensor = get(i)
            out[tensor.name] = (mode, tensor.dtype.name, tuple(tensor.shape))
    return out


def engine_io(engine_path: str | Path) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """The same, read back from an engine file. Deserialising needs a CUDA driver, even for metadata."""
    trt = import_tensorrt()
    logger = _CollectingLogger(trt)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"{engine_path}: {flavour(trt)} {trt.__version__} could not load it: "
                           f"{logger.errors[-1] if logger.errors else 'no reason given'}")
    out = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = "INPUT" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "OUTPUT"
        out[name] = (mode, engine.get_tensor_dtype(name).name, tuple(engine.get_tensor_shape(name)))
    return out


def _CollectingLogger(trt: ModuleType):
    """A TensorRT logger that keeps error messages, so that a failure can say why in one line."""

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.ERROR:
                self.errors.append(msg)

    return Logger()
