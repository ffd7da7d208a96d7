"""OpenAI's request and response bodies, and how a request becomes the `llm` model's sampling parameters.

Requests are parsed strictly: a field OpenAI defines but this server cannot honour (suffix, token-id
prompts) is a 400 naming it, and so is a field nobody defines (extra="forbid"), never a
silent drop. vLLM's extra sampling fields (top_k, min_p, ignore_eos, ...) are accepted, as vLLM's own
OpenAI server does, so benchmark clients written for vLLM work. Value ranges (temperature >= 0,
top_p in (0, 1], ...) are the server's to check: one set of rules, one set of messages.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from kvtriton.client.openai.errors import OpenAIError
from kvtriton.client.openai.structured_outputs import (
    GUIDED_FIELDS,
    ResponseFormat,
    StructuredOutputs,
    guided_keys,
    one_constraint,
)
from kvtriton.client.openai.tool_calls import required_calls_schema

MAX_N = 16  # choices per request: each is one Triton request, all in flight together
MAX_COMPLETION_LOGPROBS = 5  # /v1/completions: OpenAI's bound
MAX_TOP_LOGPROBS = 20  # /v1/chat/completions: OpenAI's bound, and the server's (SamplingParams.MAX_LOGPROBS)
REASONING_EFFORTS = ("minimal", "low", "medium", "high")  # OpenAI's reasoning_effort values


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestBody(StrictModel):
    """A route's whole request body: its text must be Unicode. JSON may escape half a surrogate pair ("\\ud800"),
    which decodes to a string no UTF-8 encoder takes, so it would fail later, as a 500, in whatever encodes it
    (the gRPC client, a response that echoes it): a 400 naming the field instead."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        if (problem := lone_surrogate(data)) is not None:
            raise PydanticCustomError("unicode", "{problem}", {"problem": problem})
        return data


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """Where `value` (parsed JSON) first holds a lone surrogate, in a string or a key, said for the client."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return (f"{path or 'body'} must be valid Unicode: a lone surrogate U+{ord(value[err.start]):04X} at "
                    f"character {err.start}")
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        problem = lone_surrogate(key, f"a key of {path or 'body'}") if isinstance(key, str) else None
        if (problem := problem or lone_surrogate(item, f"{path}.{key}" if path else str(key))) is not None:
            return problem
    return None


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries the usage so far (with include_usage)


class _GenerationRequest(RequestBody):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # accepted and ignored: the frontend keeps no per-user state
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions, the `llm` model's own sampling keys
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    truncate_prompt_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # vLLM's structured-output extensions (structured_outputs.py)
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's: each prompt token's logprob and rank, and the top N there (the answer's PromptLogprob lists)
    prompt_logprobs: int | None = None
    # vLLM's: the request's place under the server's scheduling_policy priority (lower first)
    priority: int | None = None

    _PASSED_THROUGH = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "logit_bias", "top_k",
                       "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                       "skip_special_tokens", "include_stop_str_in_output", "truncate_prompt_tokens",
                       "allowed_token_ids", "bad_words", "priority")

    def check(self) -> None:
        """What pydantic's types cannot say; OpenAIError (400) naming the field."""
        if not 1 <= self.n <= MAX_N:
            raise OpenAIError(f"n must be in [1, {MAX_N}], got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError("stream_options is only allowed when stream is true", param="stream_options")
        if self.prompt_logprobs is not None:
            if not 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS:
                raise OpenAIError(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.prompt_logprobs}",
                                  param="prompt_logprobs")
            if self.stream:  # vLLM's rule: its streamed chunks have no place for them
                raise OpenAIError("prompt_logprobs is not available with stream: true", param="prompt_logprobs")
        self.output_constraint()

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """vLLM's stream_options.continuous_usage_stats, which it honours only beside include_usage."""
        return self.include_usage and self.stream_options.continuous_usage_stats

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def _logprobs(self) -> int | None:
        return None

    def _prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs

    def _constraint_sources(self) -> dict[str, dict[str, Any]]:
        """Each field that may constrain the output -> the guided_* keys it asks for ({}: none)."""
        sources = {"response_format": self.response_format.sampling_keys() if self.response_format else {},
                   "structured_outputs": self.structured_outputs.sampling_keys() if self.structured_outputs else {}}
        sources.update((field, guided_keys({field: getattr(self, field)})) for field in GUIDED_FIELDS)
        return sources

    def output_constraint(self) -> dict[str, Any]:
        """The guided_* sampling keys of the request's one structured-output constraint ({}: unconstrained)."""
        return one_constraint(self._constraint_sources())

    def sampling(self, choice: int) -> dict[str, Any]:
        """The `llm` model's sampling parameters for choice `choice` (0 .. n-1).

        With a seed, choice i samples with seed + i: n choices of one seeded request differ from each other,
        and the same request gives the same n choices again.
        """
        params: dict[str, Any] = {key: getattr(self, key) for key in self._PASSED_THROUGH}
        params["max_tokens"] = self._max_tokens()
        params["logprobs"] = self._logprobs()
        params["prompt_logprobs"] = self._prompt_logprobs()
        if self.seed is not None:
            params["seed"] = self.seed + choice
        if self.stop is not None:
            params["stop"] = [self.stop] if isinstance(self.stop, str) else self.stop
        params.update(self.output_constraint())
        return {k: v for k, v in params.items() if v is not None}


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.suffix:
            raise OpenAIError("suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError("best_of is not supported by this server (only best_of == n)", param="best_of")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise OpenAIError(f"logprobs must be in [0, {MAX_COMPLETION_LOGPROBS}], got {self.logprobs}",
                              param="logprobs")
        self.prompts()

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a text or token ids (the `llm` model's input_ids), as OpenAI takes them: a string,
        a list of strings, a list of ids, or a list of lists of ids."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompts = [prompt]
        else:
            prompts = prompt
        if not prompts or not all(isinstance(p, str) or (p and all(isinstance(t, int) for t in p)) for p in prompts):
            raise OpenAIError("prompt must be a string, a list of strings, a list of token ids or a list of such "
                              "lists, none of them empty", param="prompt")
        return prompts

    @property
    def echoes_token_ids(self) -> bool:
        """echo of a token-id prompt: its text comes from the server's prompt_logprobs (the token texts), as the
        frontend has no tokenizer."""
        return self.echo and any(not isinstance(p, str) for p in self.prompts())

    def _logprobs(self) -> int | None:
        return self.logprobs

    def _prompt_logprobs(self) -> int | None:
        """echo with logprobs: the prompt's tokens' logprobs too (the server's prompt_logprobs), as OpenAI's legacy
        completions give them and lm-evaluation-harness reads them for loglikelihood tasks; with vLLM's
        prompt_logprobs as well, the larger top N of the two (each answer field cuts its own)."""
        echoed = (self.logprobs or 0) if self.echo and (self.logprobs is not None or self.echoes_token_ids) else None
        asked = [n for n in (echoed, self.prompt_logprobs) if n is not None]
        return max(asked) if asked else None


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionDefinition(StrictModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: the function takes no arguments
    strict: bool | None = None  # the named and required choices are always held to the schema


class Tool(StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends and returns it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # Other keys OpenAI's clients send (refusal, audio, ...) are allowed and not passed on.
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def as_template_message(self) -> dict[str, Any]:
        """The message as the `llm` model's `messages` input takes it: text parts joined, "" for no content;
        "developer" (OpenAI's newer name for the system role) is "system", the role chat templates know; the
        tool fields as sent, for the checkpoint's template to render."""
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(part.text for part in self.content)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat-template extensions: the template's own variables (e.g. Qwen3's enable_thinking), and HF's
    # two flags (continue_final_message: the answer continues the last message, e.g. a prefilled assistant turn).
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # OpenAI's, for reasoning models: the template's `reasoning_effort` variable (gpt-oss's templates read it;
    # others ignore it), as vLLM passes it.
    reasoning_effort: Literal[REASONING_EFFORTS] | None = None

    def check(self) -> None:
        super().check()
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise OpenAIError("tool_choice needs tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and \
                self.tool_choice.function.name not in [t.function.name for t in self.tools]:
            raise OpenAIError(f"tool_choice names {self.tool_choice.function.name!r}, which is not in tools",
                              param="tool_choice")
        if self.tools and len({t.function.name for t in self.tools}) != len(self.tools):
            raise OpenAIError("tools: two functions have the same name", param="tools")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise OpenAIError("top_logprobs needs logprobs: true", param="top_logprobs")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise OpenAIError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}",
                                  param="top_logprobs")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise OpenAIError("give max_completion_tokens or max_tokens (deprecated), not both",
                              param="max_completion_tokens")
        if self.continue_final_message and self.add_generation_prompt:
            raise OpenAIError("continue_final_message needs add_generation_prompt: false (the answer continues the "
                              "last message rather than starting a new one)", param="continue_final_message")

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.as_template_message() for m in self.messages]

    def template_kwargs(self) -> dict[str, Any] | None:
        """The `llm` model's chat_template_kwargs: the request's, with the two flags where not the default."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
        if not self.add_generation_prompt:
            kwargs["add_generation_prompt"] = False
        if self.continue_final_message:
            kwargs["continue_final_message"] = True
        return kwargs or None

    @property
    def tool_mode(self) -> Literal["none", "auto", "required", "named"]:
        """How this request calls tools; OpenAI's default is "auto" when tools are given, else "none"."""
        if not self.tools:
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tool definitions for the chat template (given with tool_choice "none" too, as vLLM does:
        the model may be told of tools it is not to call)."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def _constraint_sources(self) -> dict[str, dict[str, Any]]:
        """A forced call constrains the output to the call's JSON (structured output, as vLLM does)."""
        forced: dict[str, Any] = {}
        mode = self.tool_mode
        named = [t for t in self.tools or () if mode == "named" and t.function.name == self.tool_choice.function.name]
        if named:  # (a name not in tools is check()'s 400)
            forced = {"guided_json": json.dumps(named[0].function.parameters or {"type": "object"})}
        elif mode == "required":
            schema = required_calls_schema([t.model_dump() for t in self.tools], self.parallel_tool_calls is False)
            forced = {"guided_json": json.dumps(schema)}
        return {"tool_choice": forced, **super()._constraint_sources()}

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# Responses. `object` and the id prefix are OpenAI's; ids are random, `created` is Unix seconds.

class OmitsUnset(BaseModel):
    """vLLM's extra answer fields appear only when they have a value: OpenAI's shape has no such keys, and
    clients that validate it strictly see none (vLLM sends them as null)."""

    _omitted_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler):
        data = handler(self)
        for key in self._omitted_when_none:
            if data.get(key, 0) is None:
                del data[key]
        return data


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens the server's prefix cache served (computed once, earlier)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()


class ModelCard(OmitsUnset):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvtriton"
    # vLLM's: the context the prompt and the answer share (clients size their prompts by it); the model's
    # tokenize task reports it. Left out while no model answers.
    max_model_len: int | None = None
    # vLLM's, on a LoRA adapter's card: the adapter's path (lora_modules'), and the served model it runs on
    root: str | None = None
    parent: str | None = None
    _omitted_when_none = ("max_model_len", "root", "parent")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """vLLM's Logprob, as its answers carry prompt_logprobs: {token id: this} per prompt token after the first."""

    logprob: float
    rank: int | None = None  # 1: the likeliest token there
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]  # None for the first prompt token (nothing before it)


class CompletionChoice(OmitsUnset):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's
    _omitted_when_none = ("prompt_logprobs",)


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = Field(default_factory=list)
    reasoning_content: str | None = None  # vLLM's field, with --reasoning-parser


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OmitsUnset):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, for the one prompt that every choice shares
    _omitted_when_none = ("prompt_logprobs",)


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A call's first delta carries its id, type and name; the rest carry parts of its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None
    reasoning_content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
