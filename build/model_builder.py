"""`kvtriton build`: checkpoint -> step graph (-> TensorRT engine) -> a ready-to-serve Triton model directory.

Steps, each printed with its time:
  1. resolve the checkpoint (an HF folder, 'default', or a .gguf converted once into the cache)
  2. load it in the precision's dtype and export the ONNX step graph (int8: quantize its weights; int4: load
     it quantized, a GGUF's Q4/Q8 blocks as stored, and write them in the runtime's format)
  3. tensorrt only: build the engine
  4. write config.pbtxt, the model.py shim, the tokenizer files and manifest.json
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from kvtriton.backend.models.checkpoint import checkpoint_sha256, resolve_checkpoint
from kvtriton.backend.models.gguf_quantized import gguf_source
from kvtriton.backend.models.int4 import Int4Linear
from kvtriton.backend.models.quantization import GROUP_SIZES, layer_sources
from kvtriton.backend.runners.manifest import Manifest, library_versions, quantization_record
from kvtriton.build.onnx_export import PRECISIONS, WEIGHT_ONLY, export_step_graph

RUNTIMES = ("onnxruntime", "tensorrt")
GRAPH_FILE = "model.onnx"
ENGINE_FILE = "model.engine"


@dataclass(frozen=True)
class BuildConfig:
    checkpoint: str  # HF folder, .gguf file, or "default"
    out: str  # model repository folder
    name: str = "llm"
    precision: str = "fp32"
    runtime: str = "onnxruntime"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 4096  # capped at the checkpoint's context length
    num_kv_blocks: int = 2048  # tensorrt: the KV pool is fixed in the engine's shapes
    # int8/int4: dtype of activations/KV; auto = fp16 for tensorrt, fp32 for onnxruntime
    int8_activations: str = "auto"
    group_size: int = 32  # int4: inputs per scale and zero point (a GGUF's own blocks keep theirs, 32)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.int8_activations not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"--int8-activations must be auto, fp32, fp16 or bf16, got {self.int8_activations!r}")
        if self.int8_activations != "auto" and self.precision not in WEIGHT_ONLY:
            raise ValueError("--int8-activations applies to --precision int8 and int4 only")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        if self.group_size != 32 and self.precision != "int4":
            raise ValueError("--group-size applies to --precision int4 only")
        if self.runtime == "onnxruntime" and "bf16" in (self.precision, self.int8_activations):
            raise ValueError("bf16 needs --runtime tensorrt: onnxruntime has no bfloat16 kernels for this graph; "
                             "use fp16 or fp32 with onnxruntime")
        for key in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "num_kv_blocks"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype the model is traced in: the precision's, or for int8/int4 the activations'."""
        if self.precision not in WEIGHT_ONLY:
            return PRECISIONS[self.precision]
        activations = self.int8_activations
        if activations == "auto":
            activations = "fp16" if self.runtime == "tensorrt" else "fp32"
        return PRECISIONS[activations]


class _Progress:
    def __init__(self, say: Callable[[str], None], total: int):
        self.say, self.total, self.n = say, total, 0

    def step(self, what: str):
        self.n += 1
        self.say(f"[{self.n}/{self.total}] {what} ...")
        return _Timer(self.say)


class _Timer:
    def __init__(self, say):
        self.say = say

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, kind, *_):
        if kind is None:
            self.say(f"      done in {time.perf_counter() - self.start:.1f}s")


def build_model(cfg: BuildConfig, say: Callable[[str], None] = print) -> Path:
    """Run the build; returns the written model directory (<out>/<name>)."""
    from kvtriton.backend.models.loader import load_model
    from kvtriton.backend.models.model_config import ModelConfig
    from kvtriton.build import repository

    progress = _Progress(say, 4 if cfg.runtime == "tensorrt" else 3)
    model_dir = repository.prepare_model_dir(cfg.out, cfg.name, cfg.overwrite)
    version_dir = model_dir / "1"
    with progress.step(f"checkpoint {cfg.checkpoint}"):
        folder = resolve_checkpoint(cfg.checkpoint, say)
        source = Path(folder if cfg.checkpoint in ("default", "") else cfg.checkpoint).resolve()
        sha = checkpoint_sha256(source)
        hf_dir = repository.copy_hf_files(folder, model_dir)
        model_config = ModelConfig.from_pretrained(folder)
    max_model_len = min(cfg.max_model_len, model_config.max_position_embeddings)
    graph = version_dir / GRAPH_FILE
    activations = str(cfg.model_dtype).removeprefix("torch.")
    with progress.step(f"export {cfg.precision} step graph ({activations} activations) to {graph.name}"):
        int4 = cfg.precision == "int4"
        model = load_model(folder, dtype=cfg.model_dtype, config=model_config, quantization="int4" if int4 else None,
                           group_size=cfg.group_size, gguf=gguf_source(cfg.checkpoint) if int4 else None)
        spec = export_step_graph(model, graph, cfg.block_size, cfg.precision, runtime=cfg.runtime)
        sources = layer_sources(model) if int4 else {
            "int8 per channel quantized from float weights":
                sum(isinstance(m, torch.nn.Linear) for m in model.modules())}
        group_sizes = {m.group_size for m in model.modules() if isinstance(m, Int4Linear)}  # a GGUF's blocks: 32
        quantization = quantization_record(cfg.precision, cfg.runtime, group_sizes.pop() if len(group_sizes) == 1
                                           else cfg.group_size, sources)
        del model
    io = graph_io(graph)
    limits = {"max_num_seqs": cfg.max_num_seqs, "max_num_batched_tokens": cfg.max_num_batched_tokens,
              "max_blocks_per_seq": -(-max_model_len // cfg.block_size)}
    parameters = {"model": str(hf_dir), "runner": cfg.runtime, "block_size": str(cfg.block_size),
                  "max_num_seqs": str(cfg.max_num_seqs), "max_num_batched_tokens": str(cfg.max_num_batched_tokens),
                  "max_model_len": str(max_model_len), "engine_path": str(graph),
                  "quantization": "none"}  # the graph carries its precision; the template's auto is the torch runner's
    builder, target, profiles, engine_name = "onnx", ["cpu", "cuda"], [], ""
    versions = library_versions()
    if cfg.runtime == "tensorrt":
        from kvtriton.build.tensorrt_engine import EngineLimits, build_engine

        limits["num_blocks"] = cfg.num_kv_blocks
        engine = version_dir / ENGINE_FILE
        with progress.step(f"TensorRT engine {engine.name}"):
            built = build_engine(graph, engine, EngineLimits(**limits), spec, progress=lambda m: say("      " + m))
        check_engine_io(built.io, io)
        builder, target, engine_name = built.builder, list(built.targets), engine.name
        profiles = [{k: [list(s) for s in v] for k, v in p.items()} for p in built.profiles]
        versions[built.builder] = built.version
        parameters.update(engine_path=str(engine), num_kv_blocks=str(cfg.num_kv_blocks))
    with progress.step(f"Triton model directory {model_dir}"):
        repository.write_triton_files(model_dir, parameters)
        Manifest(source=str(source), source_sha256=sha, precision=cfg.precision, runner=cfg.runtime,
                 graph=GRAPH_FILE, engine=engine_name, block_size=cfg.block_size, inputs=io["inputs"],
                 outputs=io["outputs"], profiles=profiles, limits=limits, versions=versions, builder=builder,
                 target=target, quantization=quantization, notes=[f"built with {asdict(cfg)}"]).write(version_dir)
    say(f"ready: tritonserver --model-repository={Path(cfg.out).resolve()}  (model {cfg.name!r})")
    return model_dir


def graph_io(path: Path) -> dict:
    """{"inputs"|"outputs": {name: {"dtype", "shape"}}} of an ONNX graph; dynamic dims by name."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)

    def describe(values):
        out = {}
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param or d.dim_value for d in t.shape.dim]
            out[v.name] = {"dtype": onnx.TensorProto.DataType.Name(t.elem_type), "shape": shape}
        return out

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


_TRT_DTYPES = {"FLOAT": "FLOAT", "HALF": "FLOAT16", "BF16": "BFLOAT16", "INT64": "INT64", "INT32": "INT32"}


def check_engine_io(engine: dict, graph: dict) -> None:
    """The engine's I/O (name -> (mode, TensorRT dtype, shape)) must be the graph's, tensor for tensor."""
    expected = {**{k: ("INPUT", v) for k, v in graph["inputs"].items()},
                **{k: ("OUTPUT", v) for k, v in graph["outputs"].items()}}
    if set(engine) != set(expected):
        raise RuntimeError(f"engine I/O {sorted(engine)} differs from the graph's {sorted(expected)}")
    for name, (mode, dtype, shape) in engine.items():
        want_mode, want = expected[name]
        want_shape = tuple(d if isinstance(d, int) else -1 for d in want["shape"])
        if (mode, _TRT_DTYPES.get(dtype, dtype), tuple(shape)) != (want_mode, want["dtype"], want_shape):
            raise RuntimeError(f"engine tensor {name}: {mode} {dtype} {tuple(shape)}, graph says "
                               f"{want_mode} {want['dtype']} {want_shape}")
