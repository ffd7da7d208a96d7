"""Build a LlamaForCausalLM from an HF folder (safetensors) or with random ("dummy") weights.

HF checkpoints keep q/k/v and gate/up as separate tensors; the model fuses
them. `_FUSED` says which HF name lands in which slice of which fused
parameter, so loading never materialises an unfused copy of the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from kvtriton.backend.models.llama import LlamaForCausalLM
from kvtriton.backend.models.model_config import ModelConfig

# HF suffix -> (fused parameter suffix, shard index)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def _shard_offsets(cfg: ModelConfig, fused: str) -> list[int]:
    if fused.endswith("qkv_proj"):
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [0, q, q + kv, q + 2 * kv]
    return [0, cfg.intermediate_size, 2 * cfg.intermediate_size]


def load_model(
    folder: str | Path | None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
    dummy: bool = False,
    quantization: str | None = None,
) -> LlamaForCausalLM:
    """Load weights from `folder` (*.safetensors), or random weights when dummy=True
    (for benchmarks at real sizes from a bare config.json). quantization="int8": every Linear
    becomes an Int8Linear (weight-only, per output channel; models/int8.py) after loading."""
    if quantization not in (None, "int8"):
        raise ValueError(f"quantization must be None or 'int8', got {quantization!r}")
    cfg = config or ModelConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    # Built on meta so that no random init runs; the RoPE tables are then rebuilt for real.
    model = model.to_empty(device=device).to(dtype)
    model.rotary.build_tables(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if dummy:
        _init_dummy(model)
    else:
        _load_safetensors(model, cfg, Path(folder))
    if quantization == "int8":
        from kvtriton.backend.models.int8 import quantize_linears

        quantize_linears(model)
    return model.eval()


def _init_dummy(model: LlamaForCausalLM) -> None:
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            else:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


def _load_safetensors(model: LlamaForCausalLM, cfg: ModelConfig, folder: Path) -> None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for hf_name in f.keys():
                    name = hf_name.removeprefix("model.")
                    if "rotary_emb" in name:
                        continue
                    if name == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue
                    tensor = f.get_tensor(hf_name)
                    target, rows = _locate(cfg, name)
                    if target not in params:
                        raise ValueError(f"{file.name}: unexpected tensor {hf_name!r} for {cfg.architecture}")
                    dst = params[target] if rows is None else params[target][rows[0] : rows[1]]
                    if dst.shape != tensor.shape:
                        raise ValueError(f"{hf_name}: shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
                    dst.copy_(tensor.to(dst.dtype))
                    loaded.add(target if rows is None else f"{target}[{rows[0]}]")
    expected = _expected_names(model, cfg)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")


def _locate(cfg: ModelConfig, name: str) -> tuple[str, tuple[int, int] | None]:
    """HF parameter name (without 'model.') -> (fused parameter name, row range or None)."""
    for hf_suffix, (fused, shard) in _FUSED.items():
        marker = f".{hf_suffix}."
        if marker in name:
            prefix, kind = name.split(marker)
            offsets = _shard_offsets(cfg, fused)
            return f"{prefix}.{fused}.{kind}", (offsets[shard], offsets[shard + 1])
    return name, None


def _expected_names(model: LlamaForCausalLM, cfg: ModelConfig) -> set[str]:
    names = set()
    for name, _ in model.named_parameters():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        fused = next((f for f, _ in _FUSED.values() if f".{f}." in name), None)
        if fused:
            n_shards = len(_shard_offsets(cfg, fused)) - 1
            names.update(f"{name}[{o}]" for o in _shard_offsets(cfg, fused)[:n_shards])
        else:
            names.add(name)
    return names
