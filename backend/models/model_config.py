"""ModelConfig: the architecture facts of a Llama-family checkpoint, read from config.json.

One definition (kvtriton.backend.models.llama) serves Llama 2/3, SmolLM, Qwen2/2.5
and Mistral without sliding window; the differences are all data (bias flags,
rope scaling, tied embeddings), captured here and validated once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# architectures[0] in config.json -> whether q/k/v projections carry a bias by default.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
    "Qwen3ForCausalLM": False,
}
# Those whose attention RMS-normalises each head of q and k before RoPE (Qwen3's QK-norm).
QK_NORM_ARCHITECTURES = ("Qwen3ForCausalLM",)
SUPPORTED_ROPE_SCALING = ("llama3", "linear")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen dict of HF's rope_scaling
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    qk_norm: bool = False  # q and k RMS-normalised per head (weights of head_dim) before RoPE

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def num_params(self) -> int:
        """Parameter count (embedding counted once when tied)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        layer = attn + 3 * h * i + 2 * h + (2 * d if self.qk_norm else 0)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}: kvtriton serves the Llama family "
                f"({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        sliding = cfg.get("sliding_window")
        max_pos = int(cfg.get("max_position_embeddings", 2048))
        if sliding is not None and cfg.get("use_sliding_window", True) and sliding < max_pos:
            raise ValueError(
                f"sliding_window={sliding} is not supported (only full attention); "
                f"use a checkpoint without sliding window or with sliding_window >= {max_pos}"
            )
        # transformers 4 writes rope_theta + rope_scaling; transformers 5 one rope_parameters dict.
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_theta = float(rope_params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        rope_scaling = cfg.get("rope_scaling") or rope_params or None
        if rope_scaling:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind == "default":
                rope_scaling = None
            elif kind not in SUPPORTED_ROPE_SCALING:
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_ROPE_SCALING)}"
                )
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", SUPPORTED_ARCHITECTURES[arch])),
            rope_scaling=tuple(sorted(rope_scaling.items())) if rope_scaling else None,
            eos_token_ids=eos_ids,
            bos_token_id=cfg.get("bos_token_id"),
            qk_norm=arch in QK_NORM_ARCHITECTURES,
        )

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ModelConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: a model folder needs config.json (HF layout)")
        return cls.from_dict(json.loads(path.read_text()))
