"""OpenAI's Responses API bodies (POST /v1/responses), and a request as the chat completion it asks for.

A Responses request is translated into a `protocol.ChatCompletionRequest` (and checked as one), so it is
served by the chat path: the same template input, sampling parameters, tool calls and reasoning split.
Only the request's shape and the response's are new here. The server keeps no state: what needs a stored
response or conversation (previous_response_id, conversation, background, stored prompts) is a 400 naming
the field, as is a hosted tool (web_search, file_search, ...) and any field OpenAI does not define.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, ValidationError, model_serializer

from kvtriton.client.openai import protocol as p
from kvtriton.client.openai.errors import OpenAIError
from kvtriton.client.openai.protocol import RequestBody, StrictModel
from kvtriton.client.openai.structured_outputs import JsonSchema, ResponseFormat

# Input items. Items a client sends back from an earlier response's `output` carry their id and status.

def _type(value: Any) -> str | None:
    return value.get("type") if isinstance(value, dict) else getattr(value, "type", None)


def _one_of(*members: tuple[Any, str], tag=_type) -> Any:
    """A union told apart by `tag(value)` (a member's tag, or "other"), so that pydantic's complaint is about the
    member meant, not the first member tried."""
    tags = {name for _, name in members}
    return Annotated[Union[tuple(Annotated[t, Tag(name)] for t, name in members)],
                     Discriminator(lambda v: tag(v) if tag(v) in tags else "other")]


class TextPart(StrictModel):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # an output_text sent back as it came
    logprobs: list[Any] | None = None


class _Other(BaseModel):
    """A part, item or tool of a type this server does not serve; check() refuses it, naming where it is."""

    model_config = ConfigDict(extra="allow")
    type: str | None = None


_Parts = list[_one_of((TextPart, "input_text"), (TextPart, "output_text"), (_Other, "other"))]
_Text = _one_of((str, "str"), (_Parts, "list"), tag=lambda v: "str" if isinstance(v, str) else "list")


def _joined(content: str | list[TextPart | _Other]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _refused_parts(where: str, content: str | list[TextPart | _Other]) -> None:
    for j, part in enumerate([] if isinstance(content, str) else content):
        if isinstance(part, _Other):
            raise OpenAIError(f"{where}.content.{j}: {part.type!r} parts are not supported, only input_text and "
                              "output_text (the llm model takes text)", param="input")


class Message(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: _Text
    id: str | None = None
    status: str | None = None


class _CallItem(StrictModel):
    call_id: str
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_CallItem):
    type: Literal["function_call"]
    name: str
    arguments: str


class FunctionCallOutputItem(_CallItem):
    type: Literal["function_call_output"]
    output: _Text


class ReasoningItem(BaseModel):
    """An earlier response's reasoning, sent back with its output: accepted and not passed on (chat templates
    leave earlier turns' reasoning out)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["reasoning"]


InputItem = _one_of((Message, "message"), (FunctionCallItem, "function_call"),
                    (FunctionCallOutputItem, "function_call_output"), (ReasoningItem, "reasoning"), (_Other, "other"),
                    tag=lambda v: _type(v) or "message")


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


Tool = _one_of((FunctionTool, "function"), (_Other, "other"))  # other: web_search, file_search, mcp, ...


class FunctionChoice(StrictModel):
    type: Literal["function"]
    name: str


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_serializer(mode="wrap")
    def _given(self, dump) -> dict[str, Any]:  # echoed as given: {"type": "text"}, not four nulls beside it
        return {k: v for k, v in dump(self).items() if v is not None}


class TextConfig(StrictModel):
    format: TextFormat = TextFormat(type="text")


class ReasoningConfig(StrictModel):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(RequestBody):
    model: str
    input: _one_of((str, "str"), (list[InputItem], "list"), tag=lambda v: "str" if isinstance(v, str) else "list")
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Tool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig = TextConfig()
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None  # accepted and ignored, as in the chat route
    store: bool | None = None  # accepted: this server keeps no responses either way
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: ReasoningConfig | None = None
    priority: int | None = None  # vLLM's, as in the chat route
    # OpenAI's, refused by check(): they need state or work this server does not keep or do
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    include: list[str] | None = None
    prompt: Any = None
    _chat: p.ChatCompletionRequest | None = PrivateAttr(default=None)

    def check(self) -> None:
        """What this server cannot do, a 400 naming the field; then the chat request's own checks."""
        stateless = "this server keeps no responses or conversations (send the whole conversation in input)"
        for name, refused in (("previous_response_id", self.previous_response_id is not None),
                              ("conversation", self.conversation is not None),
                              ("prompt", self.prompt is not None)):
            if refused:
                raise OpenAIError(f"{name} is not supported: {stateless}", param=name)
        if self.background:
            raise OpenAIError(f"background is not supported: {stateless}", param="background")
        if self.include:
            raise OpenAIError(f"include is not supported (asked for {', '.join(self.include)})", param="include")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise OpenAIError(f"max_output_tokens must be >= 1, got {self.max_output_tokens}",
                              param="max_output_tokens")
        if self.truncation == "auto":
            raise OpenAIError('truncation "auto" is not supported: an input longer than the model takes is a 400',
                              param="truncation")
        # "auto" lets the server decide, and this one gives no summary (the item's `summary` is empty, its
        # `content` the whole reasoning), as vLLM answers it; agent clients (Codex CLI) send it by default.
        # A summary asked for by its kind cannot be honoured.
        asked = [v for v in (self.reasoning.summary, self.reasoning.generate_summary) if v not in (None, "auto")] \
            if self.reasoning is not None else []
        if asked:
            raise OpenAIError(f"reasoning summaries ({asked[0]!r}) are not supported: with --reasoning-parser the "
                              "model's reasoning comes whole as a reasoning item's content (summary \"auto\" is "
                              "accepted and gives none)", param="reasoning")
        if self.reasoning is not None and self.reasoning.effort not in (None, *p.REASONING_EFFORTS):
            raise OpenAIError(f"reasoning.effort must be one of {', '.join(p.REASONING_EFFORTS)}, got "
                              f"{self.reasoning.effort!r}", param="reasoning")
        if self.text.format.type == "json_schema" and self.text.format.schema_ is None:
            raise OpenAIError('text.format {"type": "json_schema"} needs a schema', param="text")
        for i, item in enumerate([] if isinstance(self.input, str) else self.input):
            if isinstance(item, _Other):
                raise OpenAIError(f"input.{i}: {item.type!r} items are not supported, only messages, function_call, "
                                  "function_call_output and reasoning (this server keeps no items to refer to)",
                                  param="input")
            if isinstance(item, (Message, FunctionCallOutputItem)):
                _refused_parts(f"input.{i}", item.content if isinstance(item, Message) else item.output)
        for i, tool in enumerate(self.tools):
            if isinstance(tool, _Other):
                raise OpenAIError(f"tools.{i}: {tool.type!r} tools are not supported, only type 'function' (this "
                                  "server runs no hosted tools)", param="tools")
        self._chat = self.chat_request()
        try:
            self._chat.check()
        except OpenAIError as e:
            raise in_responses_terms(e) from None

    def chat_request(self) -> p.ChatCompletionRequest:
        """The chat completion this request asks for (n 1)."""
        fmt = self.text.format
        response_format = None if fmt.type == "text" else ResponseFormat(
            type=fmt.type, json_schema=None if fmt.type != "json_schema" else JsonSchema(
                name=fmt.name, description=fmt.description, schema=fmt.schema_, strict=fmt.strict))
        tool_choice = self.tool_choice
        if isinstance(tool_choice, FunctionChoice):
            tool_choice = p.NamedToolChoice(type="function", function=p.FunctionName(name=tool_choice.name))
        try:
            return p.ChatCompletionRequest(
                model=self.model, messages=self.messages(), max_completion_tokens=self.max_output_tokens,
                temperature=self.temperature, top_p=self.top_p, user=self.user, stream=self.stream,
                priority=self.priority, response_format=response_format, tool_choice=tool_choice,
                parallel_tool_calls=self.parallel_tool_calls,
                reasoning_effort=self.reasoning.effort if self.reasoning is not None else None,
                tools=[p.Tool(type="function", function=p.FunctionDefinition(
                    **t.model_dump(exclude={"type"}))) for t in self.tools] or None)
        except ValidationError as e:  # what the Responses models let through and the chat ones do not
            first = e.errors()[0]
            raise OpenAIError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    @property
    def chat(self) -> p.ChatCompletionRequest:
        """The checked chat request (check() first)."""
        assert self._chat is not None, "check() first"
        return self._chat

    def messages(self) -> list[p.ChatMessage]:
        """`instructions` as a system message first, then the input: a function_call joins the assistant message
        before it (or starts one), so an earlier response's message and calls are one assistant turn again."""
        messages = [p.ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        items = [Message(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, Message):
                messages.append(p.ChatMessage(role=item.role, content=_joined(item.content)))
            elif isinstance(item, FunctionCallItem):
                call = p.ToolCall(id=item.call_id, function=p.FunctionCall(name=item.name, arguments=item.arguments))
                if not (messages and messages[-1].role == "assistant"):
                    messages.append(p.ChatMessage(role="assistant", content=None, tool_calls=[]))
                messages[-1].tool_calls = [*(messages[-1].tool_calls or []), call]
            elif isinstance(item, FunctionCallOutputItem):
                messages.append(p.ChatMessage(role="tool", tool_call_id=item.call_id, content=_joined(item.output)))
        if not messages:
            raise OpenAIError("input has no messages", param="input")
        return messages

    def echoed_tool_choice(self) -> Any:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


_RESPONSES_PARAMS = {"response_format": "text", "max_completion_tokens": "max_output_tokens",
                     "max_tokens": "max_output_tokens", "messages": "input"}


def in_responses_terms(error: OpenAIError) -> OpenAIError:
    """A chat request's error with the Responses field it is about as `param` (and in the message)."""
    param = _RESPONSES_PARAMS.get(error.param or "")
    if param is None:
        return error
    message = error.message.replace(error.param, "text.format" if param == "text" else param)
    return OpenAIError(message, error.status, param, error.code)


# The response. Ids: resp_, msg_, rs_, fc_ and hex, as OpenAI's.

def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: new_id("msg"))
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[OutputText] = Field(default_factory=list)


class OutputReasoning(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str = Field(default_factory=lambda: new_id("rs"))
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningText] = Field(default_factory=list)
    status: ItemStatus = "in_progress"


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: new_id("fc"))
    call_id: str
    name: str
    arguments: str = ""
    status: ItemStatus = "in_progress"


OutputItem = Union[OutputReasoning, OutputMessage, OutputFunctionCall]


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0  # input tokens the server's prefix cache served
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0  # not counted apart from the answer's


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()

    @classmethod
    def of(cls, usage: p.Usage) -> "ResponseUsage":
        return cls(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens,
                   total_tokens=usage.total_tokens,
                   input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens))


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class Response(BaseModel):
    id: str = Field(default_factory=lambda: new_id("resp"))
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    # the request's settings, echoed
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[Any] = Field(default_factory=list)
    tool_choice: Any = "none"
    parallel_tool_calls: bool = True
    text: TextConfig = TextConfig()
    truncation: Literal["disabled"] = "disabled"
    reasoning: ReasoningConfig | None = None
    previous_response_id: None = None
    store: bool = False  # nothing is kept, whatever the request said
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def started(cls, request: ResponsesRequest, model: str) -> "Response":
        """The in-progress response to `request`, its settings echoed."""
        return cls(model=model, instructions=request.instructions, max_output_tokens=request.max_output_tokens,
                   temperature=request.temperature, top_p=request.top_p, tools=request.tools,
                   tool_choice=request.echoed_tool_choice(), text=request.text, reasoning=request.reasoning,
                   parallel_tool_calls=request.parallel_tool_calls is not False, user=request.user,
                   metadata=request.metadata or {})
