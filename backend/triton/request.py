"""Parse one Triton inference request into a prompt + SamplingParams, or a RequestError naming the field.

Accepts the vLLM backend's format (text_input, stream, sampling_parameters JSON,
exclude_input_in_output) and the TensorRT-LLM tensor names (max_tokens,
temperature, top_k, random_seed, stop_words, min_length, return_log_probs, ...).
Precedence, lowest first: sampling_parameters JSON, the request's parameters
(Triton's generate endpoint puts `"parameters": {...}` there), typed inputs.
Independent of pb_utils so it is unit-testable: inputs arrive through a getter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from kvtriton.backend.engine.sampling_params import SamplingParams

# typed input -> sampling key (TensorRT-LLM names map onto vLLM's)
TYPED_INPUTS = {
    "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
    "min_p": "min_p", "seed": "seed", "random_seed": "seed", "ignore_eos": "ignore_eos",
    "min_tokens": "min_tokens", "min_length": "min_tokens", "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "logprobs": "logprobs",
}
STOP_INPUTS = ("stop", "stop_words")
FLAG_KEYS = ("stream", "exclude_input_in_output")


class RequestError(ValueError):
    """A client mistake; its message is sent back as the error response."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    stream: bool
    exclude_input_in_output: bool
    params: SamplingParams


def parse_generate_request(get_input: Callable[[str], np.ndarray | None], parameters_json: str | None,
                           apply_chat_template: Callable[[list], str]) -> GenerateRequest:
    sampling: dict[str, Any] = {}
    flags = {"stream": False, "exclude_input_in_output": False}

    raw = get_input("sampling_parameters")
    if raw is not None:
        sampling.update(_json_object("sampling_parameters", _text("sampling_parameters", raw)))
    if parameters_json:
        for key, value in _json_object("parameters", parameters_json).items():
            if key.startswith("triton_"):  # set by Triton / tritonclient themselves
                continue
            (flags if key in FLAG_KEYS else sampling)[key] = value
    for key in FLAG_KEYS:
        sampling_value = sampling.pop(key, None)  # vLLM clients sometimes put "stream" in the JSON
        if sampling_value is not None:
            flags[key] = sampling_value
        tensor = get_input(key)
        if tensor is not None:
            flags[key] = bool(_scalar(key, tensor))
    for name, key in TYPED_INPUTS.items():
        tensor = get_input(name)
        if tensor is not None:
            sampling[key] = _scalar(name, tensor)
    if (tensor := get_input("return_log_probs")) is not None and bool(_scalar("return_log_probs", tensor)):
        sampling.setdefault("logprobs", 0)
    for name in STOP_INPUTS:
        tensor = get_input(name)
        if tensor is not None:
            sampling["stop"] = [_decode(name, b) for b in tensor.reshape(-1)]

    try:
        params = SamplingParams.from_dict(sampling)
    except ValueError as exc:
        raise RequestError(str(exc)) from None
    return GenerateRequest(_prompt(get_input, apply_chat_template), _bool("stream", flags["stream"]),
                           _bool("exclude_input_in_output", flags["exclude_input_in_output"]), params)


def _prompt(get_input, apply_chat_template) -> str:
    messages = get_input("messages")
    if messages is not None:
        value = _json("messages", _text("messages", messages))
        if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                  for m in value):
            raise RequestError('messages must be a JSON list of {"role": ..., "content": ...} objects')
        return apply_chat_template(value)
    text = get_input("text_input")
    if text is None:
        raise RequestError("text_input is required (or messages)")
    return _text("text_input", text)


def _text(name: str, tensor: np.ndarray) -> str:
    flat = tensor.reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name} must hold exactly one element, got shape {list(tensor.shape)}")
    return _decode(name, flat[0])


def _decode(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    return str(value)


def _scalar(name: str, tensor: np.ndarray) -> Any:
    flat = tensor.reshape(-1)
    if flat.size != 1:
        raise RequestError(f"{name} must hold exactly one element, got shape {list(tensor.shape)}")
    value = flat[0]
    if isinstance(value, bytes):
        return _decode(name, value)
    return value.item() if isinstance(value, np.generic) else value


def _json(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RequestError(f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _json_object(name: str, text: str) -> dict[str, Any]:
    value = _json(name, text) if text.strip() else {}
    if not isinstance(value, dict):
        raise RequestError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise RequestError(f"{name} must be a boolean, got {value!r}")
