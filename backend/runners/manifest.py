"""manifest.json: what a built model is, where it came from, and what it needs to run.

Written by `kvtriton build` beside the graph/engine; read by the runners, which
refuse an engine built by another TensorRT (or for another GPU) with a message
that says how to rebuild, instead of failing deep inside deserialisation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    source: str  # checkpoint path as given (HF folder or .gguf)
    source_sha256: str  # of the .gguf file, or of the HF folder's config + weights (see checkpoint_sha256)
    precision: str  # fp32 | fp16 | bf16 | int8
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


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "onnx", "onnxruntime", "tensorrt", "tensorrt-rtx-cu13-bindings", "kvtriton"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions
