"""LoRA adapters served beside the base model: many adapters, one batch (multi-LoRA, as vLLM and Triton's
vllm_backend serve them).

Every adapter named in `lora_modules` is read from its PEFT folder (adapter_config.json and
adapter_model.safetensors) at load and stays resident. Each adapted projection then holds all of them stacked:
A (S*W, in) and B (out, S*W) for S adapters of W columns each, W = the largest rank times the projection's
parts (3 for the fused qkv, 2 for gate_up, where each part's A and B land in a block of their own). A step's
tokens carry their adapter, 1-based (0 is the base model), and a token keeps only its own adapter's columns
of x A^T:

    delta = ((x A^T) * [adapter(token) == adapter(column)]) B^T

Two matmuls a projection (each token's own, batched: StackedLoRA.delta says why), whatever the mix of adapters
in the step, so one step serves a batch of requests on different adapters (the job punica's SGMV kernels do in
vLLM, here for few adapters). They span only the adapters from the step's lowest to its highest (StepAdapters),
so a step of one adapter multiplies by that adapter's block alone, and a mix pays for the blocks between. A base
token's delta is exactly zero. PEFT's scaling (lora_alpha / r, or lora_alpha / sqrt(r) under rsLoRA) is folded
into B.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from kvtriton.backend.models.model_config import ModelConfig

# The model's projections and the PEFT target modules (HF names) that land in each, in the fused order.
FUSED_TARGETS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
TARGETS = {target.rsplit(".", 1)[1] for parts in FUSED_TARGETS.values() for target in parts}
# PEFT's key: base_model.model.model.layers.<i>.<self_attn|mlp>.<target>.lora_<A|B>[.<adapter name>].weight
_KEY = re.compile(r"layers\.(\d+)\.((?:self_attn|mlp)\.\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


@dataclass
class LoRAAdapter:
    name: str
    path: Path
    rank: int  # the largest of its modules' ranks (PEFT's r, or rank_pattern's)
    # (layer, HF target such as "self_attn.q_proj") -> (A (r, in), B (out, r) with the scaling folded in)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def load_adapter(name: str, path: str | Path, cfg: ModelConfig) -> LoRAAdapter:
    """A PEFT LoRA adapter of the model `cfg` describes; ValueError naming the adapter for anything kvtriton
    cannot serve as it was trained (DoRA, trained biases or extra modules, targets outside the decoder layers,
    shapes of another model)."""
    folder = Path(path).expanduser()
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(f"LoRA adapter {name!r}: {folder} needs adapter_config.json and adapter_model.safetensors "
                         "(a PEFT LoRA adapter saved with safetensors)")
    config = json.loads(config_file.read_text())
    why = _unsupported(config)
    if why:
        raise ValueError(f"LoRA adapter {name!r} ({folder}): {why}")
    tensors = load_file(str(weights_file))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.search(key)
        if match is None or match.group(2).rsplit(".", 1)[1] not in TARGETS:
            raise ValueError(f"LoRA adapter {name!r}: tensor {key} adapts no decoder-layer projection kvtriton "
                             f"serves (q/k/v/o_proj, gate/up/down_proj)")
        layer, target, side = int(match.group(1)), match.group(2), match.group(3)
        pairs.setdefault((layer, target), {})[side] = tensor
    weights = {}
    for (layer, target), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {name!r}: layer {layer} {target} has lora_{''.join(pair)} only")
        a, b = pair["A"], pair["B"]
        want_in, want_out = target_shape(cfg, target)
        rank, alpha = module_rank_and_alpha(config, f"model.layers.{layer}.{target}")
        if layer >= cfg.num_layers or a.shape != (rank, want_in) or b.shape != (want_out, rank):
            raise ValueError(f"LoRA adapter {name!r}: layer {layer} {target} has A {tuple(a.shape)} and B "
                             f"{tuple(b.shape)}; this model ({cfg.num_layers} layers) wants A ({rank}, {want_in}) "
                             f"and B ({want_out}, {rank}): an adapter of another base model?")
        scaling = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
        weights[(layer, target)] = (a.float(), b.float() * scaling)
    if not weights:
        raise ValueError(f"LoRA adapter {name!r}: {weights_file} holds no LoRA weights")
    return LoRAAdapter(name, folder, max(a.shape[0] for a, _ in weights.values()), weights)


def module_rank_and_alpha(config: dict, module: str) -> tuple[int, float]:
    """The rank and alpha PEFT gives `module` (its name in the base model, "model.layers.0.self_attn.q_proj"):
    rank_pattern's and alpha_pattern's first key that is the name or a dot-separated tail of it (PEFT's
    get_pattern_key, a key being a regular expression), else r and lora_alpha."""
    def pick(patterns: dict, default):
        key = next((k for k in patterns or {} if re.fullmatch(rf"(.*\.)?(?:{k})", module)), None)
        return default if key is None else patterns[key]

    rank = int(pick(config.get("rank_pattern"), config["r"]))
    return rank, float(pick(config.get("alpha_pattern"), config.get("lora_alpha") or config["r"]))


def _unsupported(config: dict) -> str:
    """Why an adapter_config.json describes an adapter served otherwise than as trained ("" if none)."""
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config['peft_type']}: only LoRA adapters are served"
    if config.get("use_dora"):
        return "DoRA (use_dora) adapters are not served"
    if config.get("bias", "none") != "none":
        return f"bias {config['bias']!r}: adapters that train biases are not served"
    if config.get("modules_to_save"):
        return f"modules_to_save {config['modules_to_save']}: adapters with fully trained modules are not served"
    if config.get("lora_bias"):
        return "lora_bias (a trained bias on B) is not served"
    if config.get("trainable_token_indices"):
        return "trainable_token_indices (trained embedding rows) are not served"
    if config.get("fan_in_fan_out"):
        return "fan_in_fan_out (weights stored transposed, GPT-2's Conv1D) does not apply to Llama-family models"
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        return f"r must be a positive integer, got {config.get('r')!r}"
    return ""


def target_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """(in, out) features of an HF projection of the model."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "self_attn.q_proj": (cfg.hidden_size, q), "self_attn.k_proj": (cfg.hidden_size, kv),
        "self_attn.v_proj": (cfg.hidden_size, kv), "self_attn.o_proj": (q, cfg.hidden_size),
        "mlp.gate_proj": (cfg.hidden_size, cfg.intermediate_size),
        "mlp.up_proj": (cfg.hidden_size, cfg.intermediate_size),
        "mlp.down_proj": (cfg.intermediate_size, cfg.hidden_size),
    }[target]


@dataclass(frozen=True)
class StepAdapters:
    """A step's adapters: each packed token's, 1-based (0: the base model), and the lowest and highest adapter
    in the step, whose span of blocks the projections multiply by."""

    token_adapters: torch.Tensor  # (N,) int64
    first: int
    last: int

    @classmethod
    def of_rows(cls, token_adapters: torch.Tensor, row_adapters) -> StepAdapters | None:
        """token_adapters for rows of these adapters (a sequence of ints), or None when every row is the base's."""
        used = [a for a in row_adapters if a]
        return cls(token_adapters, min(used), max(used)) if used else None


class StackedLoRA(nn.Module):
    """All adapters' A and B for one (fused) projection; see the module docstring for the layout."""

    def __init__(self, a: torch.Tensor, b_t: torch.Tensor, column_adapter: torch.Tensor, columns: torch.Tensor,
                 block: int):
        super().__init__()
        self.block = block  # W: columns per adapter
        self.register_buffer("a", a)  # (S*W, in)
        self.register_buffer("b_t", b_t)  # (S*W, out): B transposed, so that an adapter span is a row slice
        self.register_buffer("column_adapter", column_adapter)  # (S*W,) int64: each column's adapter, 1..S
        # (S*W, 2) int64: the output columns [first, last) each row of b_t reaches (its part's; empty for padding
        # and parts an adapter leaves alone), which the CPU kernel skips to.
        self.register_buffer("columns", columns)
        # On the CPU in fp32, where the int4 kernels' library is loaded (the quantized models that take the one-call
        # decode step): kernels/cpu_lora.cpp, the function that step calls too, so both round alike.
        self.native = a.device.type == "cpu" and a.dtype == torch.float32 and hasattr(torch.ops.kvtriton, "lora_delta")

    def delta(self, x: torch.Tensor, adapters: StepAdapters) -> torch.Tensor:
        """x (N, in) -> the adapters' addition (N, out), over the step's span of adapters only."""
        if self.native and x.dtype == torch.float32:  # each token over its own adapter's rows: no span needed
            return torch.ops.kvtriton.lora_delta(x, self.a, self.b_t, self.columns, adapters.token_adapters, self.block)
        span = slice((adapters.first - 1) * self.block, adapters.last * self.block)
        n = x.shape[0]
        # One (1, in) x (in, W) product a token (a batched matmul over the tokens, the weights broadcast): a GEMM
        # over all rows rounds a row by where it sits in the kernel's blocking, so a request's greedy output
        # could change with its neighbours in the batch (seen at a near-tie on the CPU); this way it cannot.
        xa = torch.bmm(x[:, None, :], self.a[span].T.expand(n, -1, -1))
        own = adapters.token_adapters[:, None, None] == self.column_adapter[span]  # each token's own adapter's
        return torch.bmm(torch.where(own, xa, 0), self.b_t[span].expand(n, -1, -1))[:, 0]


def attach_adapters(model: nn.Module, adapters: list[LoRAAdapter], dtype: torch.dtype, device) -> None:
    """Give every projection some adapter targets a StackedLoRA (its `lora` attribute), adapters numbered 1..S in
    list order. Parts an adapter leaves alone stay zero blocks."""
    cfg: ModelConfig = model.config
    width = max(adapter.rank for adapter in adapters)  # each adapter's block is padded to the largest rank
    for layer_idx, layer in enumerate(model.layers):
        for fused, parts in FUSED_TARGETS.items():
            if not any((layer_idx, part) in adapter.weights for adapter in adapters for part in parts):
                continue
            shapes = [target_shape(cfg, part) for part in parts]
            in_features, outs = shapes[0][0], [out for _, out in shapes]
            block = width * len(parts)
            a = torch.zeros(len(adapters) * block, in_features)
            b_t = torch.zeros(len(adapters) * block, sum(outs))
            columns = torch.zeros(len(adapters) * block, 2, dtype=torch.int64)
            for s, adapter in enumerate(adapters):
                out = 0
                for p, part in enumerate(parts):
                    if (layer_idx, part) in adapter.weights:
                        pa, pb = adapter.weights[(layer_idx, part)]
                        col, rank = s * block + p * width, pa.shape[0]  # a module's rank: up to the width
                        a[col : col + rank] = pa
                        b_t[col : col + rank, out : out + outs[p]] = pb.T
                        columns[col : col + rank] = torch.tensor([out, out + outs[p]])
                    out += outs[p]
            column_adapter = torch.arange(1, len(adapters) + 1).repeat_interleave(block)
            module = layer.get_submodule(fused)
            module.lora = StackedLoRA(a.to(device, dtype), b_t.to(device, dtype), column_adapter.to(device),
                                      columns.to(device), block)
