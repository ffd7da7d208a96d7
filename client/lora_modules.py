"""The `llm` model's LoRA adapters as its config names them: parameter `lora_modules`, `name=path[,name=path...]`
(vLLM's --lora-modules format). A request selects one by name (sampling_parameters' `lora_name`).

The client reads the string back from Triton's model config (it imports nothing of the backend). A model loads
only with a well-formed string (the backend's EngineConfig checks it and fails the load otherwise), so what a
served model's config shows is read here without checking it again.
"""

from __future__ import annotations

from typing import Any, Mapping

LORA_MODULES = "lora_modules"  # the config.pbtxt parameter


def lora_modules_in(config: Mapping[str, Any]) -> dict[str, str]:
    """The adapters in a Triton model config (JSON, as both protocols show it; its parameters are
    {"name": {"string_value": ...}}), name -> path in order; {} for a model without the parameter."""
    text = config.get("parameters", {}).get(LORA_MODULES, {}).get("string_value", "")
    entries = (entry.partition("=") for entry in text.split(","))
    return {name.strip(): path.strip() for name, _, path in entries if name.strip()}
