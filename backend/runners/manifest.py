"""manifest.json: what a built model is, where it came from, and what it needs to run.

Written by `kvtriton build` beside the graph/engine; read by the runners, which
refuse an engine built by another TensorRT (or for another GPU), or weights laid
out for another runtime (`check_quantization`), with a message that says how to
rebuild, instead of failing deep inside deserialisation or running a slow path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = 2  # 2: the quantization record
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    source: str  # checkpoint path as given (HF folder or .gguf)
    source_sha256: str  # of the .gguf file, or of the HF folder's config + weights (see checkpoint_sha256)
    precision: str  # fp32 | fp16 | bf16 | int8 | int4
    runner: str  # onnxruntime | tensorrt
    graph: str  # the .onnx file, relative to the manifest
    engine: str  # the .engine file (tensorrt), relative; "" for onnxruntime
    block_size: int
    inputs: dict  # name -> {"dtype", "shape"} of the graph (-1 / names for dynamic dims)
    outputs: dict
    profiles: list  # tensorrt optimization profiles: [{input: [min, opt, max]}]; [] for onnxruntime
    limits: dict  # max_num_seqs, max_num_batched_tokens, max_blocks_per_seq, num_blocks (tensorrt)
    versions: dict  # library -> version used to build
    builder: str  # tensorrt | tensorrt_rtx | onnx
    target: list  # GPU architectures the engine runs on (e.g. ["SM89"]), or ["cpu", "cuda"] for ONNX
    # How the weights are stored (`quantization_record`): {"format": none|int8|int4, "group_size": inputs per
    # scale (0: per output channel or not quantized), "source": {how the numbers were made: layer count},
    # "layout": the graph's operator for them, "runtime": the runner that layout is for}.
    quantization: dict = field(default_factory=dict)
    format: int = FORMAT
    notes: list = field(default_factory=list)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the model was not built by `kvtriton build`; "
                                    f"rebuild it with `kvtriton build <checkpoint> --out <repository>`")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path}: manifest format {data.get('format')} is not {FORMAT}; rebuild the model "
                             f"with this kvtriton's `kvtriton build`")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown manifest keys {sorted(unknown)}")
        return cls(**data)


# The graph operator each runtime's quantized weights use (build/onnx_int8.py, build/onnx_int4.py).
QUANTIZED_LAYOUTS = {("int8", "onnxruntime"): "DequantizeLinear per channel",
                     ("int8", "tensorrt"): "DequantizeLinear per channel",
                     ("int4", "onnxruntime"): "MatMulNBits",
                     ("int4", "tensorrt"): "DequantizeLinear blocked int4 (opset 21)"}


def quantization_record(precision: str, runtime: str, group_size: int, sources: dict[str, int]) -> dict:
    """The manifest's quantization entry for a graph of `precision` built for `runtime`; sources: the layers'
    origins (models/quantization.py `layer_sources`)."""
    if precision not in ("int8", "int4"):
        return {"format": "none", "group_size": 0, "source": {}, "layout": "", "runtime": runtime}
    return {"format": precision, "group_size": group_size if precision == "int4" else 0, "source": dict(sources),
            "layout": QUANTIZED_LAYOUTS[(precision, runtime)], "runtime": runtime}


def check_quantization(manifest: Manifest, runner: str, path: str) -> None:
    """Refuse, in one line, quantized weights laid out for another runner (a MatMulNBits graph cannot go to
    TensorRT; blocked-int4 DequantizeLinear would run unfused in onnxruntime) or a record that contradicts
    the precision."""
    q = manifest.quantization
    if not q:
        raise ValueError(f"{path}: its manifest has no quantization record; rebuild it with this kvtriton's "
                         f"`kvtriton build {manifest.source} --precision {manifest.precision} --runtime {runner}`")
    expected = manifest.precision if manifest.precision in ("int8", "int4") else "none"
    if q.get("format") != expected:
        raise ValueError(f"{path}: manifest says precision {manifest.precision} but quantization format "
                         f"{q.get('format')}; rebuild it with `kvtriton build`")
    if expected != "none" and q.get("runtime") != runner:
        raise ValueError(f"{path}: its {expected} weights are laid out as {q.get('layout')} for "
                         f"runner={q.get('runtime')}, "
                         f"not {runner}; use runner={q.get('runtime')} or rebuild: kvtriton build {manifest.source} "
                         f"--precision {expected} --runtime {runner}")


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "onnx", "onnxruntime", "tensorrt", "tensorrt-rtx-cu13-bindings", "kvtriton"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions
