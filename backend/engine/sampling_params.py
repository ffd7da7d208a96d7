"""Per-request sampling parameters, validated once at the edge.

`SamplingParams` follows vLLM / OpenAI semantics. Everything inside the engine
trusts an instance: construction either normalises the values or raises a
`ValueError` whose message starts with the offending field's name.
`SamplingParams.from_dict` is the JSON entry point (Triton's
`sampling_parameters` input), where numbers often arrive as strings. Its
keys are the field names; other clients' spellings (TensorRT-LLM's) are
their adapter's to translate.

Structured output (vLLM's names): at most one of `guided_json` (a JSON schema,
as a JSON string or an object), `guided_regex`, `guided_choice` (the output is
exactly one of a list of strings), `guided_grammar` (Lark or GBNF/EBNF) and
`guided_json_object` (any JSON object). Here they are checked
for shape only; whether the schema, regex or grammar compiles is found by the
grammar engine (structured_output.py) when the request is admitted.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

MAX_LOGPROBS = 20
# OpenAI's range for logit_bias values: -100 bans a token in effect, 100 all but forces it.
MAX_LOGIT_BIAS = 100.0
# Below this temperature softmax(logits / T) is one-hot in float32 and the
# division can overflow, so such rows are sampled greedily (the T -> 0 limit),
# as vLLM v1 does.
GREEDY_TEMPERATURE = 1e-5

_INT_FIELDS = ("max_tokens", "min_tokens", "top_k", "seed", "logprobs", "prompt_logprobs", "num_speculative_tokens",
               "priority", "truncate_prompt_tokens")
_FLOAT_FIELDS = (
    "temperature", "top_p", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty",
)
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "guided_json_object", "include_stop_str_in_output")
_NULLABLE_FIELDS = ("seed", "logprobs", "prompt_logprobs", "num_speculative_tokens", "truncate_prompt_tokens")
_GUIDED_TEXT_FIELDS = ("guided_json", "guided_regex", "guided_grammar")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1 on input) means off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt + output tokens; 1 = off
    presence_penalty: float = 0.0  # over output tokens; 0 = off
    frequency_penalty: float = 0.0  # over output tokens; 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: sampled token only; N: also top N
    # The prompt's tokens' logprobs (vLLM's prompt_logprobs; what OpenAI's echo + logprobs and lm-eval's
    # loglikelihood read): None: none; 0: each prompt token's own; N: also the top N at each position.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # vLLM's: the text ends with the stop string that ended it
    # vLLM's: keep only the prompt's last k tokens (-1: the model's context), cut at admission
    truncate_prompt_tokens: int | None = None
    # vLLM's: only these token ids may be sampled (empty: any); never these words (token_limits.py)
    allowed_token_ids: tuple[int, ...] = ()
    bad_words: tuple[str, ...] = ()
    # Speculative decoding for this request: None = the server's num_speculative_tokens, 0 = off, k = at most k
    # proposals per step (no more than the server's k).
    num_speculative_tokens: int | None = None
    # Scheduling, not sampling, but per request like the rest (vLLM's `priority`): under the engine's
    # scheduling_policy "priority", lower runs sooner (request_queue.py); under "fcfs" only 0 is accepted.
    priority: int = 0
    # The LoRA adapter to run through (EngineConfig.lora_modules' name, as Triton vllm_backend's key); None: the
    # base model. Known names are checked at admission.
    lora_name: str | None = None
    guided_json: str | None = None  # a JSON schema (an object is serialised)
    guided_regex: str | None = None
    guided_grammar: str | None = None  # Lark, or GBNF / EBNF (llama.cpp's)
    guided_choice: tuple[str, ...] = ()  # the output is exactly one of these strings
    guided_json_object: bool = False  # any JSON object
    # Added to the token's logit before penalties and sampling (OpenAI's and vLLM's logit_bias): token id ->
    # bias in [-100, 100]. Given as a mapping (JSON's string keys accepted); kept as sorted (id, bias) pairs.
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if value is None and name in _NULLABLE_FIELDS:
                continue
            if not _is_int(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name in _BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if self.lora_name is not None and (not isinstance(self.lora_name, str) or not self.lora_name):
            raise ValueError(f"lora_name must be an adapter's name (a non-empty string), got {self.lora_name!r}")
        self._normalise_sequences()
        self._check_ranges()
        self._check_guided()

    def _normalise_sequences(self) -> None:
        # Lists are accepted for convenience; tuples keep the instance hashable.
        if not isinstance(self.stop, (tuple, list)):
            raise ValueError(f"stop must be a list of strings, got {self.stop!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop entries must be non-empty strings, got {s!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.bad_words, (tuple, list)) or not all(isinstance(w, str) and w.strip()
                                                                    for w in self.bad_words):
            raise ValueError(f"bad_words must be a list of non-empty strings, got {self.bad_words!r}")
        object.__setattr__(self, "bad_words", tuple(self.bad_words))
        if not isinstance(self.stop_token_ids, (tuple, list)):
            raise ValueError(
                f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(
                    f"stop_token_ids entries must be integers >= 0, got {t!r}")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.allowed_token_ids, (tuple, list)) or not all(
                _is_int(t) and t >= 0 for t in self.allowed_token_ids):
            raise ValueError(f"allowed_token_ids must be a list of integers >= 0, got {self.allowed_token_ids!r}")
        object.__setattr__(self, "allowed_token_ids", tuple(sorted(set(self.allowed_token_ids))))
        object.__setattr__(self, "logit_bias", _logit_bias_pairs(self.logit_bias))

    def _check_ranges(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                f"got {self.min_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 or -1 (off) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        k = self.truncate_prompt_tokens
        if k is not None and k < 1 and k != -1:
            raise ValueError(f"truncate_prompt_tokens must be >= 1, or -1 for the model's context, got {k}")
        if not -2**31 <= self.priority < 2**31:  # the llm model's priority input is an INT32
            raise ValueError(f"priority must be a 32-bit integer, got {self.priority}")
        if self.num_speculative_tokens is not None and self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0 (0: off), got {self.num_speculative_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be null or in [0, {MAX_LOGPROBS}], got {value}")

    def _check_guided(self) -> None:
        if isinstance(self.guided_json, Mapping):
            # A string keeps the instance hashable and is the grammar cache's key. Key order is kept: it is the
            # order in which the properties are generated.
            object.__setattr__(self, "guided_json", json.dumps(self.guided_json))
        for name in _GUIDED_TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                what = "a JSON schema (a string or an object)" if name == "guided_json" else "a non-empty string"
                raise ValueError(f"{name} must be {what}, got {value!r}")
        if isinstance(self.guided_choice, list):
            object.__setattr__(self, "guided_choice", tuple(self.guided_choice))
        # (A string is refused, not read as its characters.)
        if isinstance(self.guided_choice, str) or not all(isinstance(c, str) and c for c in self.guided_choice):
            raise ValueError(f"guided_choice must be a list of non-empty strings, got {self.guided_choice!r}")
        given = [name for name in (*_GUIDED_TEXT_FIELDS, "guided_choice", "guided_json_object") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"{given[0]} and {given[1]} are both set; give at most one guided_* constraint")

    @property
    def guided_decoding(self) -> tuple[str, str] | None:
        """The structured-output constraint as (kind, spec), kind one of json, regex, grammar, choice (spec: the
        choices as a JSON list), json_object; None when the request is unconstrained."""
        for name in _GUIDED_TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return name.removeprefix("guided_"), value
        if self.guided_choice:
            return "choice", json.dumps(self.guided_choice, ensure_ascii=False)
        return ("json_object", "") if self.guided_json_object else None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """Parse JSON-decoded parameters: string numbers, null = default; an unknown key is an error.
        `defaults` (the model's, generation_defaults.py) stand in for the keys `d` leaves unset or null."""
        if not isinstance(d, Mapping):
            raise ValueError(
                f"sampling parameters must be a JSON object, got {type(d).__name__}")
        if defaults:
            d = {**defaults, **{k: v for k, v in d.items() if v is not None or k in _NULLABLE_FIELDS}}
        accepted = cls.accepted_keys()
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key not in accepted:
                raise ValueError(
                    f"unknown sampling parameter {key!r}; accepted: {', '.join(sorted(accepted))}")
            if value is None and key not in _NULLABLE_FIELDS:
                continue  # JSON null: keep the default
            kwargs[key] = _coerce(key, value)
        return cls(**kwargs)

    @classmethod
    def accepted_keys(cls) -> frozenset[str]:
        """The keys `from_dict` accepts: the field names."""
        return frozenset(f.name for f in dataclasses.fields(cls))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coerce(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _INT_FIELDS:
        return _coerce_int(name, value)
    if name in _FLOAT_FIELDS:
        return _coerce_float(name, value)
    if name in _BOOL_FIELDS:
        return _coerce_bool(name, value)
    if name in ("stop", "bad_words"):
        return (value,) if isinstance(value, str) else _as_list(name, value)
    if name in ("stop_token_ids", "allowed_token_ids"):
        return tuple(_coerce_int(name, v) for v in _as_list(name, value))
    if name == "guided_choice":
        return _as_list(name, value)  # its strings are checked by __post_init__
    if name in _GUIDED_TEXT_FIELDS or name in ("logit_bias", "lora_name"):
        return value  # checked by __post_init__ (guided_json may be an object, logit_bias is one)
    raise AssertionError(f"no coercion for field {name}")


def _coerce_int(name: str, value: Any) -> int:
    if _is_int(value):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _coerce_float(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if _is_int(value) or isinstance(value, float):
        return float(value)
    raise ValueError(f"{name} must be a number, got {value!r}")


def _coerce_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _as_list(name: str, value: Any) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {value!r}")
    return list(value)


def _logit_bias_pairs(value: Any) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs, from a mapping (token ids as integers or, as JSON and
    OpenAI's API send them, strings) or from pairs."""
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, (tuple, list)):
        items = value
    else:
        raise ValueError(f"logit_bias must be an object of token id -> bias, got {value!r}")
    pairs: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"logit_bias must be an object of token id -> bias, got {value!r}")
        token, bias = item
        try:
            token_id = _coerce_int("logit_bias token id", token)
            bias = _coerce_float(f"logit_bias[{token!r}]", bias)
        except ValueError as exc:
            raise ValueError(f"{exc} (logit_bias maps token ids to numbers)") from None
        if token_id < 0:
            raise ValueError(f"logit_bias token ids must be >= 0, got {token_id}")
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # NaN fails this too
            raise ValueError(f"logit_bias[{token_id}] must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                             f"got {bias}")
        pairs[token_id] = bias
    return tuple(sorted(pairs.items()))

