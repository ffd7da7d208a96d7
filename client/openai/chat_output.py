"""One chat choice's generated text as OpenAI's message: `reasoning_content`, `content` and `tool_calls`.

The text is fed as it streams; each feed gives the delta to send (or None). The whole (non-streamed)
message is the same deltas joined, so both paths split the text alike. The reasoning split comes first
(reasoning.py), and only the answer after it goes to the tool call parser (tool_calls.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtriton.client.openai import protocol as p
from kvtriton.client.openai.errors import OpenAIError
from kvtriton.client.openai.reasoning import REASONING_PARSERS, ThinkSplit
from kvtriton.client.openai.tool_calls import TOOL_CALL_PARSERS, NamedCall, Piece, required_calls


@dataclass(frozen=True)
class ChatOptions:
    """The frontend's own settings for chats: vLLM's --tool-call-parser and --reasoning-parser (None: none)."""

    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        for flag, name, known in (("--tool-call-parser", self.tool_call_parser, TOOL_CALL_PARSERS),
                                  ("--reasoning-parser", self.reasoning_parser, REASONING_PARSERS)):
            if name is not None and name not in known:
                raise ValueError(f"{flag} {name!r} is not known; use one of {', '.join(known)}")

    def sampling(self, request: p.ChatCompletionRequest, choice: int) -> dict:
        """The request's sampling keys for choice `choice`. A tool call parser that reads a special token
        ([TOOL_CALLS]) gets special tokens in the text unless the request says otherwise, as vLLM asks."""
        params = request.sampling(choice)
        parser = TOOL_CALL_PARSERS.get(self.tool_call_parser) if request.tool_mode == "auto" else None
        if getattr(parser, "keeps_special_tokens", False):
            params.setdefault("skip_special_tokens", False)
        return params


def tool_call_parser(request: p.ChatCompletionRequest, auto_parser: str | None):
    """A new parser of one choice's output into tool calls, or None: no tools to call."""
    mode = request.tool_mode
    if mode == "none":
        return None
    if mode == "named":
        return NamedCall(request.tool_choice.function.name)
    if mode == "required":
        return required_calls()
    if auto_parser is None:
        raise OpenAIError('tool_choice "auto" (the default with tools) needs the frontend started with '
                          f'--tool-call-parser ({" or ".join(TOOL_CALL_PARSERS)}); or name the function in '
                          'tool_choice, or ask "required"', param="tool_choice")
    return TOOL_CALL_PARSERS[auto_parser](max_calls=1 if request.parallel_tool_calls is False else None)


class ChatOutput:
    """One choice's output, fed as it streams: the reasoning split, then the tool call parser on the answer."""

    def __init__(self, request: p.ChatCompletionRequest, options: ChatOptions) -> None:
        self._request = request
        self._tools = tool_call_parser(request, options.tool_call_parser)
        # An output held to a constraint from its first token (response_format, guided_*, a forced call) has no
        # reasoning.
        guided = bool(request.output_constraint())
        self._reasoning = None if options.reasoning_parser is None or guided else \
            ThinkSplit(REASONING_PARSERS[options.reasoning_parser])
        self.called = False  # a tool call was sent

    def feed(self, text: str, last: bool = False) -> p.DeltaMessage | None:
        """The delta for the next `text`; `last`: the output ends here, so what the parsers held back (a tail
        that might have begun a tag) goes too."""
        reasoning, content = self._reasoning.feed(text) if self._reasoning else ("", text)
        if last and self._reasoning:
            held_reasoning, held_content = self._reasoning.finish()
            reasoning, content = reasoning + held_reasoning, content + held_content
        if self._tools is None:
            return self._delta(reasoning, [Piece(text=content)])
        return self._delta(reasoning, self._tools.feed(content) + (self._tools.finish() if last else []))

    def finish_reason(self, reason: str) -> str:
        """OpenAI's "tool_calls" when the model stopped having called tools; a named call's stop stays "stop"."""
        return "tool_calls" if self.called and reason == "stop" and self._request.tool_mode != "named" else reason

    def _delta(self, reasoning: str, pieces: list[Piece]) -> p.DeltaMessage | None:
        content = "".join(piece.text for piece in pieces if piece.call is None)
        calls = [p.DeltaToolCall(index=piece.call, id=piece.call_id, type="function" if piece.name else None,
                                 function=p.DeltaFunctionCall(name=piece.name, arguments=piece.text))
                 for piece in pieces if piece.call is not None]
        self.called |= bool(calls)
        if not (reasoning or content or calls):
            return None
        return p.DeltaMessage(reasoning_content=reasoning or None, content=content or None, tool_calls=calls or None)


def whole_message(deltas: list[p.DeltaMessage | None]) -> p.ChatMessageOut:
    """The non-streamed message: the deltas joined (a call's first delta names it, the rest add arguments)."""
    deltas = [d for d in deltas if d is not None]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(d.reasoning_content or "" for d in deltas)
    calls: dict[int, p.ToolCall] = {}
    for call in (c for d in deltas for c in d.tool_calls or ()):
        if call.id is not None:
            calls[call.index] = p.ToolCall(id=call.id, function=p.FunctionCall(name=call.function.name, arguments=""))
        else:
            calls[call.index].function.arguments += call.function.arguments or ""
    # No answer beside calls or reasoning is content null, as OpenAI and vLLM send it; a plain answer stays as is.
    answer = None if (calls or reasoning) and not content.strip() else content
    return p.ChatMessageOut(content=answer, tool_calls=list(calls.values()), reasoning_content=reasoning or None)
