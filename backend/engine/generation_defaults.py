"""The checkpoint's recommended sampling (generation_config.json) as the default of requests that leave it unset.

Model creators ship their sampling settings in generation_config.json (Llama 3.2 Instruct: temperature 0.6,
top_p 0.9; Qwen2.5 Instruct: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05). vLLM has served
them as the default sampling parameters since v0.7 (`--generation-config auto`, its default), so a request that
sets no temperature gets the model's, and a client moving from vLLM gets the same sampling here (a GGUF's
llama.cpp sampling metadata becomes this file at conversion: models/gguf_checkpoint.py). The keys are
vLLM's: temperature, top_p, top_k, min_p, repetition_penalty. Its max_new_tokens is left out: the `llm`
model's own default length (max_tokens 128) stays, as generation_config's lengths (often the whole context)
would make every request that leaves max_tokens unset claim its full KV share. `do_sample` is ignored, as vLLM
ignores it. A request's own values always win; EngineConfig.generation_config "none" turns this off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvtriton.backend.engine.sampling_params import SamplingParams

KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(folder: str | Path, mode: str) -> dict[str, Any]:
    """The sampling keys `folder`'s generation_config.json sets ({} with mode "none" or without the file).
    ValueError naming the file and the key for a value no request could use, so that the load fails."""
    path = Path(folder) / "generation_config.json"
    if mode == "none" or not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); set generation_config: none to ignore it") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a JSON object; set generation_config: none to ignore it")
    defaults = {key: config[key] for key in KEYS if config.get(key) is not None}
    try:
        SamplingParams.from_dict(defaults)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}; set generation_config: none to ignore the file's sampling") from None
    return defaults


def describe(defaults: dict[str, Any]) -> str:
    """One log line: what requests that leave sampling unset get."""
    if not defaults:
        return "sampling defaults: kvtriton's (temperature 1, no top_p / top_k / min_p / repetition penalty)"
    settings = ", ".join(f"{k}={v}" for k, v in defaults.items())
    return (f"sampling defaults from the model's generation_config.json: {settings} (a request's own values win; "
            "generation_config: none turns them off)")
