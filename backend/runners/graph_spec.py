"""GraphSpec: what a step graph promises its runners, stored in the ONNX file's metadata_props.

`kvtriton build` writes it (set_metadata); the onnxruntime and tensorrt runners
read it (read_spec) and refuse a graph that disagrees with their engine config
instead of producing garbage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class GraphSpec:
    """What every consumer of the graph must agree with; stored as the ONNX file's metadata_props."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    block_size: int
    kv_dtype: str  # float32 | float16 | bfloat16: the pools' element type
    precision: str  # fp32 | fp16 | bf16 | int8: how the weights are stored

    def to_metadata(self) -> dict[str, str]:
        return {f"kvtriton.{k}": str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str) -> "GraphSpec":
        values = {k.removeprefix("kvtriton."): v for k, v in props.items() if k.startswith("kvtriton.")}
        fields = cls.__dataclass_fields__
        missing = sorted(set(fields) - set(values))
        if missing:
            raise ValueError(f"{source}: not a kvtriton step graph (metadata lacks {', '.join(missing)}); "
                             f"build it with `kvtriton build`")
        return cls(**{k: (int(values[k]) if fields[k].type == "int" else values[k]) for k in fields})


def set_metadata(proto, spec: GraphSpec) -> None:
    import onnx

    keep = [p for p in proto.metadata_props if not p.key.startswith("kvtriton.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in spec.to_metadata().items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))


def read_spec(path: str | Path) -> GraphSpec:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return GraphSpec.from_metadata({p.key: p.value for p in proto.metadata_props}, str(path))
