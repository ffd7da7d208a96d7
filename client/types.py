"""What a client sends (GenerateRequest) and gets back (Chunk, Completion).

The wire format is the `llm` model's contract (vLLM backend inputs): the prompt
as `text_input` or a chat as `messages` (JSON), a `stream` flag, and sampling
parameters as one JSON object. Sampling keys and values are the server's to
validate (an unknown key comes back as an InvalidRequestError naming it), so
there is one set of rules and one set of messages.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from kvtriton.client.errors import ServerError

FINISH_REASONS = ("stop", "length", "abort")
TASKS = ("generate", "tokenize", "detokenize")  # the llm model's `task` input
MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "tool_call_id", "name"})  # what the chat template sees

_request_ids = itertools.count()


@dataclass(frozen=True)
class GenerateRequest:
    """One generation: exactly one of `prompt` and `messages`; `tools` (OpenAI's tool definitions, which the
    server's chat template renders) and `chat_template_kwargs` (more template variables, and HF's
    add_generation_prompt / continue_final_message) only with messages."""

    prompt: str | list[int] | None = None  # text, or token ids (sent as input_ids)
    messages: tuple[Mapping[str, Any], ...] | None = None
    stream: bool = True
    sampling: Mapping[str, Any] = field(default_factory=dict)
    request_id: str = field(default_factory=lambda: f"kvtriton-{os.getpid()}-{next(_request_ids)}")
    tools: tuple[Mapping[str, Any], ...] | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None
    # "tokenize": the prompt's token ids instead of a generation; "detokenize": the text of `prompt`, token ids
    task: str = "generate"

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "detokenize" and not isinstance(self.prompt, list):
            raise ValueError("detokenize takes the token ids as the prompt")
        if self.prompt is not None and not isinstance(self.prompt, str) and not (
                isinstance(self.prompt, list) and self.prompt and all(type(t) is int for t in self.prompt)):
            raise ValueError(f"prompt must be a string or a non-empty list of token ids, got {self.prompt!r:.80}")
        if self.messages is not None:
            for m in self.messages:
                if not isinstance(m, Mapping) or "role" not in m or not ({"content", "tool_calls"} & set(m)) \
                        or not set(m) <= MESSAGE_KEYS:
                    raise ValueError(f'messages must be {{"role": ..., "content": ...}} objects (and OpenAI\'s '
                                     f'{", ".join(sorted(MESSAGE_KEYS - {"role", "content"}))}), got {m!r}')
            object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))
        if self.tools is not None:
            if self.messages is None:
                raise ValueError("tools needs messages: the chat template renders them")
            object.__setattr__(self, "tools", tuple(dict(t) for t in self.tools))
        if self.chat_template_kwargs is not None and self.messages is None:
            raise ValueError("chat_template_kwargs needs messages: the chat template renders them")
        # None means "server default": such keys are not sent at all.
        object.__setattr__(self, "sampling", {k: v for k, v in self.sampling.items() if v is not None})

    def inputs(self) -> dict[str, Any]:
        """Input name -> Python value, as both protocols send them."""
        # exclude_input_in_output: a completion is the generated text only, whatever the mode
        # (non-streamed, the server would otherwise prepend the prompt or the templated chat).
        inputs: dict[str, Any] = {"stream": self.stream, "sampling_parameters": json.dumps(self.sampling),
                                  "exclude_input_in_output": True}
        if isinstance(self.prompt, list):
            inputs["input_ids"] = self.prompt
        elif self.prompt is not None:
            inputs["text_input"] = self.prompt
        else:
            inputs["messages"] = json.dumps(list(self.messages))
        if self.tools:
            inputs["tools"] = json.dumps(list(self.tools))
        if self.chat_template_kwargs:
            inputs["chat_template_kwargs"] = json.dumps(dict(self.chat_template_kwargs))
        if self.task != "generate":
            inputs["task"] = self.task
        return inputs


@dataclass(frozen=True)
class Chunk:
    """One response: a text delta and the tokens it holds (a streamed request gets many)."""

    text: str
    num_output_tokens: int
    finish_reason: str  # "" until the last response
    num_input_tokens: int = 0
    logprobs: tuple[dict, ...] | None = None  # one entry per token when asked for
    # prompt_logprobs asked for: on the first chunk, one entry per prompt token (the first's logprob None)
    prompt_logprobs: tuple[dict, ...] | None = None
    token_ids: tuple[int, ...] | None = None  # a tokenize task's answer
    max_model_len: int = 0  # with token_ids: the context they must fit in
    num_cached_tokens: int = 0  # on the last chunk: prompt tokens the server's prefix cache served

    @classmethod
    def from_outputs(cls, text: str, num_input_tokens: int, num_output_tokens: int, finish_reason: str,
                     logprobs: str = "", prompt_logprobs: str = "", token_ids=None, max_model_len: int = 0,
                     num_cached_tokens: int = 0) -> "Chunk":
        if finish_reason not in ("", *FINISH_REASONS):
            raise ServerError(f"the server sent finish_reason {finish_reason!r}, not one of "
                              f"{', '.join(FINISH_REASONS)}: is the model kvtriton's llm?")
        return cls(text, int(num_output_tokens), finish_reason, int(num_input_tokens),
                   tuple(json.loads(logprobs)) if logprobs else None,
                   tuple(json.loads(prompt_logprobs)) if prompt_logprobs else None,
                   None if token_ids is None else tuple(int(t) for t in token_ids), int(max_model_len),
                   int(num_cached_tokens))


@dataclass(frozen=True)
class Tokens:
    """A prompt's token ids as the server's tokenizer (and chat template) gives them (a tokenize task)."""

    token_ids: tuple[int, ...]
    max_model_len: int  # the model's context, which the prompt and the answer share

    @property
    def count(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class Completion:
    text: str
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str
    ttft_s: float  # request sent -> first response with a token (non-streamed: the one response)
    latency_s: float  # request sent -> last response
    logprobs: tuple[dict, ...] | None = None
    prompt_logprobs: tuple[dict, ...] | None = None
    num_cached_tokens: int = 0  # prompt tokens the server's prefix cache served

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("text", "num_input_tokens", "num_output_tokens", "num_cached_tokens",
                                           "finish_reason", "ttft_s", "latency_s")}
        for key in ("logprobs", "prompt_logprobs"):
            if getattr(self, key) is not None:
                d[key] = list(getattr(self, key))
        return d


class CompletionBuilder:
    """Accumulates one request's chunks, with their arrival times, into a Completion."""

    def __init__(self, sent_at: float | None = None):
        self.sent_at = time.perf_counter() if sent_at is None else sent_at
        self.first_token_at: float | None = None
        self.last_at: float | None = None
        self.chunk_times: list[float] = []  # arrival of every chunk holding tokens
        self.chunk_tokens: list[int] = []
        self._text: list[str] = []
        self._logprobs: list[dict] | None = None
        self.prompt_logprobs: tuple[dict, ...] | None = None
        self.num_input_tokens = 0
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.finish_reason = ""

    def add(self, chunk: Chunk, at: float | None = None) -> None:
        at = time.perf_counter() if at is None else at
        self.last_at = at
        self._text.append(chunk.text)
        self.num_input_tokens = chunk.num_input_tokens or self.num_input_tokens
        self.num_cached_tokens = chunk.num_cached_tokens or self.num_cached_tokens
        if chunk.num_output_tokens:
            self.num_output_tokens += chunk.num_output_tokens
            self.chunk_times.append(at)
            self.chunk_tokens.append(chunk.num_output_tokens)
            if self.first_token_at is None:
                self.first_token_at = at
        if chunk.logprobs is not None:
            self._logprobs = (self._logprobs or []) + list(chunk.logprobs)
        if chunk.prompt_logprobs is not None:
            self.prompt_logprobs = chunk.prompt_logprobs
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason

    @property
    def text(self) -> str:
        return "".join(self._text)

    def build(self) -> Completion:
        if not self.finish_reason:
            raise ValueError("the request has not finished: no response carried a finish_reason")
        end = self.last_at if self.last_at is not None else self.sent_at
        first = self.first_token_at if self.first_token_at is not None else end
        return Completion(self.text, self.num_input_tokens, self.num_output_tokens, self.finish_reason,
                          ttft_s=first - self.sent_at, latency_s=end - self.sent_at,
                          logprobs=tuple(self._logprobs) if self._logprobs is not None else None,
                          prompt_logprobs=self.prompt_logprobs, num_cached_tokens=self.num_cached_tokens)
