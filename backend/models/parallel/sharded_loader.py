"""Load one rank's shard of a Llama checkpoint: the model is split first, then each parameter's
weight_loader reads only its part of the safetensors file (safe_open + get_slice).

So no rank ever holds the whole model, not even while loading: `ShardReport` counts
the bytes each rank read from the checkpoint and the bytes of its parameters, and
tests/test_tensor_parallel.py checks both against the model's size / tp.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from kvtriton.backend.distributed.parallel_state import get_tp_world_size
from kvtriton.backend.models.llama import LlamaForCausalLM
from kvtriton.backend.models.loader import _expected_names, _init_dummy, _locate, _shard_offsets
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.models.parallel.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    copy_checked,
)
from kvtriton.backend.models.parallel.sharding import check_tensor_parallel
from kvtriton.backend.models.parallel.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding


@dataclass(frozen=True)
class ShardReport:
    param_bytes: int  # this rank's parameters
    checkpoint_bytes_read: int  # bytes this rank read from the checkpoint (0 with dummy weights)


def split_llama(model: LlamaForCausalLM) -> None:
    """Swap the Llama core's projections, embedding and head for their tensor-parallel layers (on the meta
    device: nothing is allocated yet). The attention and MLP blocks then compute this rank's heads and
    columns; RowParallelLinear's all-reduce makes each block's output whole again."""
    cfg = model.config
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads,
                                          bias=cfg.attention_bias)
        attn.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        attn.num_heads, attn.num_kv_heads = attn.qkv_proj.num_heads, attn.qkv_proj.num_kv_heads
        attn.q_size, attn.kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        mlp.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        mlp.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)
        mlp.intermediate_size = mlp.gate_up_proj.output_sizes[0]
    model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
    model.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)


def load_sharded_model(folder: str | Path | None, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
                       dummy: bool = False) -> tuple[LlamaForCausalLM, ShardReport]:
    """This rank's shard of the model in `folder` (or random weights with dummy=True)."""
    check_tensor_parallel(cfg, get_tp_world_size())
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
        split_llama(model)
    model = model.to_empty(device=device).to(dtype)
    model.rotary.build_tables(device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    read = 0
    if dummy:
        _init_dummy(model)
    else:
        read = _load_shards(model, cfg, Path(folder))
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return model.eval(), ShardReport(param_bytes, read)


def _load_shards(model: LlamaForCausalLM, cfg: ModelConfig, folder: Path) -> int:
    """Every parameter's shard from the *.safetensors in `folder` -> the bytes read."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    loaded: set[str] = set()
    read = 0
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for hf_name in f.keys():
                    name = hf_name.removeprefix("model.")
                    if "rotary_emb" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                        continue
                    target, rows = _locate(cfg, name)
                    if target not in params:
                        raise ValueError(f"{file.name}: unexpected tensor {hf_name!r} for {cfg.architecture}")
                    module_name = target.rpartition(".")[0]
                    shard_id = None if rows is None else _shard_offsets(cfg, module_name).index(rows[0])
                    loader = getattr(modules[module_name], "weight_loader", None)
                    source = _CountingSlice(f.get_slice(hf_name))
                    try:
                        if loader is None:  # a replicated tensor (the norms): whole on every rank
                            copy_checked(params[target].data, source[:])
                        else:
                            loader(params[target], source, shard_id)
                    except ValueError as exc:
                        raise ValueError(f"{hf_name}: {exc}") from None
                    read += source.bytes_read
                    loaded.add(target if rows is None else f"{target}[{rows[0]}]")
    missing = sorted(_expected_names(model, cfg) - loaded)
    if missing:
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return read


class _CountingSlice:
    """A safetensors slice that counts the bytes its indexing reads from the file."""

    def __init__(self, source):
        self.source, self.bytes_read = source, 0

    def __getitem__(self, index) -> torch.Tensor:
        tensor = self.source[index]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor
