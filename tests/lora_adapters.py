"""Random LoRA adapters saved as PEFT saves them, and the HF model with an adapter merged into its weights
(W + scaling B A), the reference a served adapter is compared with. (benchmarks/lora_bench.py writes its
adapters with make_adapter too.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvtriton.backend.models.lora import target_shape
from kvtriton.backend.models.model_config import ModelConfig

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _module(target: str) -> str:
    return f"{'mlp' if target in ('gate_proj', 'up_proj', 'down_proj') else 'self_attn'}.{target}"


def make_adapter(folder: Path, model_folder: Path, targets=("q_proj", "v_proj"), rank: int = 4, alpha: float = 8,
                 seed: int = 0, use_rslora: bool = False, scale: float = 1.0, ranks: dict | None = None,
                 **config) -> Path:
    """A PEFT LoRA adapter of the model in model_folder (its config.json's shapes) with random A and B (PEFT
    starts B at zero; a trained one is not), B A large enough to move greedy output. `ranks`: {(layer, target):
    rank} for modules of another rank than `rank` (what a rank_pattern in `config` gives them). `config`: more
    adapter_config.json keys."""
    cfg = ModelConfig.from_pretrained(model_folder)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg.num_layers):
        for target in targets:
            module = _module(target)
            in_features, out_features = target_shape(cfg, module)
            key = f"base_model.model.model.layers.{layer}.{module}"
            r = (ranks or {}).get((layer, target), rank)
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_features, generator=gen) * scale / in_features**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, r, generator=gen) * scale
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets), "bias": "none",
        "use_rslora": use_rslora, "use_dora": False, "modules_to_save": None, "task_type": "CAUSAL_LM", **config}))
    return folder


def merged_hf_model(model_folder: Path, adapter_folder: Path | None, alphas: dict | None = None):
    """The HF model with the adapter merged in fp32 (None: the base model): each module's W + alpha / r B A (r
    its A's rows, or sqrt(r) under rsLoRA), alpha the config's lora_alpha or `alphas`' {(layer, target): alpha}
    (what an alpha_pattern gives those modules)."""
    import transformers
    from safetensors.torch import load_file

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32).eval()
    if adapter_folder is None:
        return hf
    config = json.loads((Path(adapter_folder) / "adapter_config.json").read_text())
    tensors = load_file(str(Path(adapter_folder) / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, linear in hf.model.named_modules():
            key = f"base_model.model.model.{name}"
            if isinstance(linear, torch.nn.Linear) and f"{key}.lora_A.weight" in tensors:
                a, b = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
                layer, target = int(name.split(".")[1]), name.rsplit(".", 1)[1]
                alpha = (alphas or {}).get((layer, target), config["lora_alpha"])
                linear.weight += alpha / (a.shape[0] ** 0.5 if config.get("use_rslora") else a.shape[0]) * b @ a
    return hf


def hf_greedy(hf_model, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """HF's greedy continuation, EOS ignored."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()
