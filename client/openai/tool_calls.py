"""Tool calls: a chat completion's generated text as content and OpenAI `tool_calls`, as it streams.

Three ways a request can call tools, as vLLM's OpenAI server serves them:
- a named function (`tool_choice: {"type": "function", "function": {"name": ...}}`): the output is
  constrained to the function's parameters schema (structured output) and all of it is that call's
  arguments, streamed as they are generated;
- `"required"`: the output is constrained to a JSON list of {"name", "parameters"} objects, one per call;
  each call is sent once its object is complete;
- `"auto"`: the model decides, and a parser for its family's format finds the calls in free text:
  `--tool-call-parser hermes`, `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (Hermes 2/3,
  Qwen2.5/3, SmolLM3), `llama3_json`, `{"name": ..., "parameters": ...}` (Llama 3.1-3.3), `pythonic`,
  `[get_weather(city="Paris")]` (Llama 3.2 and 4), or `mistral`, `[TOOL_CALLS]...` (Mistral's models).

Every parser takes the text as it arrives (`feed`) and says what to send (`Piece`s); `finish` flushes
what it held back. The non-streamed response is the same pieces joined, so both paths parse alike.
"""

from __future__ import annotations

import ast
import json
import uuid
from dataclasses import dataclass
from typing import Any

from kvtriton.client.openai.streamed_tags import held_back


@dataclass(frozen=True)
class Piece:
    """Content text (`call` None), or a tool call's start (its `name`) or a part of its arguments."""

    text: str = ""
    call: int | None = None  # the tool call's index in the choice
    name: str | None = None  # set on a call's first piece only
    call_id: str | None = None


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _whole_call(index: int, name: str, arguments: Any) -> list[Piece]:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return [Piece(call=index, name=name, call_id=new_call_id()), Piece(text=text, call=index)]


def _whole_calls(calls: list[tuple[str, Any]]) -> list[Piece]:
    """(name, arguments) of calls found at once, numbered from 0."""
    return [piece for i, (name, arguments) in enumerate(calls) for piece in _whole_call(i, name, arguments)]


class NamedCall:
    """tool_choice names the function: every generated character is its arguments."""

    def __init__(self, name: str) -> None:
        self.name, self._started = name, False

    def feed(self, text: str) -> list[Piece]:
        pieces = [] if self._started else [Piece(call=0, name=self.name, call_id=new_call_id())]
        self._started = True
        return pieces + ([Piece(text=text, call=0)] if text else [])

    def finish(self) -> list[Piece]:
        return self.feed("")


class JsonCalls:
    """Calls written as whole JSON objects, `{"name": ..., "parameters" | "arguments": {...}}`, one after another
    between `separators`; each is sent once its object is whole. What never became a call (the output cut by
    max_tokens, or JSON that is not a call) is returned as content at the end, not dropped."""

    def __init__(self, separators: str, max_calls: int | None = None) -> None:
        self._separators, self._max_calls = separators, max_calls
        self._text, self._at, self._calls = "", 0, 0
        self._decoder = json.JSONDecoder()

    def feed(self, text: str) -> list[Piece]:
        self._text += text
        pieces: list[Piece] = []
        while True:
            start = self._at
            while start < len(self._text) and self._text[start] in self._separators:
                start += 1
            try:
                call, end = self._decoder.raw_decode(self._text, start)
            except json.JSONDecodeError:
                return pieces  # the next object is not whole yet
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return pieces
            if self._max_calls is None or self._calls < self._max_calls:
                pieces += _whole_call(self._calls, call["name"], call.get("parameters", call.get("arguments", {})))
            self._calls, self._at = self._calls + 1, end

    def finish(self) -> list[Piece]:
        rest = self._text[self._at:]
        return [Piece(text=rest)] if rest.strip(self._separators) else []


def required_calls() -> JsonCalls:
    """tool_choice "required": the output is `[{"name": ..., "parameters": {...}}, ...]`, held to that by the
    schema `required_calls_schema`."""
    return JsonCalls(" \t\r\n[,]")


class Llama3JsonCalls:
    """Llama 3.1-3.3's JSON tool calls (vLLM's llama3_json): an answer that starts with `{` (or <|python_tag|>,
    where special tokens are kept) is calls, `{"name": ..., "parameters": {...}}` separated by `;`; any other
    answer is content, streamed as it comes."""

    TAG = "<|python_tag|>"

    def __init__(self, max_calls: int | None = None) -> None:
        self._head, self._max_calls = "", max_calls
        self._calls: JsonCalls | None = None
        self._content = False

    def feed(self, text: str) -> list[Piece]:
        if self._content:
            return [Piece(text=text)] if text else []
        if self._calls is not None:
            return self._calls.feed(text)
        self._head += text
        head = self._head.lstrip()
        if not head or self.TAG.startswith(head):  # not decided yet
            return []
        if head.startswith((self.TAG, "{")):
            self._calls = JsonCalls(" \t\r\n;", self._max_calls)
            return self._calls.feed(head.removeprefix(self.TAG))
        self._content = True
        return [Piece(text=self._head)]

    def finish(self) -> list[Piece]:
        if self._calls is not None:
            return self._calls.finish()
        pieces = [] if self._content or not self._head else [Piece(text=self._head)]
        self._content = True
        return pieces


class HermesCalls:
    """`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks in free text; the text around them is
    content. A block that is not such JSON stays content, as the model wrote it."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, max_calls: int | None = None) -> None:
        self._pending, self._inside, self._calls = "", False, 0
        self._max_calls = max_calls  # parallel_tool_calls false: calls after the first are dropped

    def feed(self, text: str) -> list[Piece]:
        self._pending += text
        pieces: list[Piece] = []
        while True:
            if self._inside:
                end = self._pending.find(self.CLOSE)
                if end < 0:
                    return pieces
                pieces += self._call(self._pending[:end], self.CLOSE)
                self._pending, self._inside = self._pending[end + len(self.CLOSE):], False
                continue
            start = self._pending.find(self.OPEN)
            if start < 0:
                cut = len(self._pending) - held_back(self._pending, self.OPEN)
                pieces += self._content(self._pending[:cut])
                self._pending = self._pending[cut:]
                return pieces
            pieces += self._content(self._pending[:start])
            self._pending, self._inside = self._pending[start + len(self.OPEN):], True

    def finish(self) -> list[Piece]:
        if self._inside:  # no closing tag: some models end at EOS right after the JSON
            pieces = self._call(self._pending, "")
        else:
            pieces = self._content(self._pending)
        self._pending, self._inside = "", False
        return pieces

    def _content(self, text: str) -> list[Piece]:
        if not text or (self._calls and not text.strip()):  # whitespace between calls is not content
            return []
        return [Piece(text=text)]

    def _call(self, body: str, close: str) -> list[Piece]:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            call = None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return [Piece(text=self.OPEN + body + close)]
        if self._max_calls is not None and self._calls >= self._max_calls:
            return []
        self._calls += 1
        return _whole_call(self._calls - 1, call["name"], call.get("arguments", {}))


class PythonicCalls:
    """Calls as a Python list of function calls with keyword arguments of Python literals,
    `[get_weather(city="Paris"), get_time()]` (vLLM's pythonic: Llama 3.2 and 4, ToolACE), optionally between
    Llama 4's <|python_start|> and <|python_end|> where special tokens are kept. An answer that starts with `[`
    is held back to its end; if it is such a list its calls are sent, else it is content as written. Any other
    answer is content, streamed as it comes. The list is read by Python's parser, never evaluated."""

    START, END = "<|python_start|>", "<|python_end|>"

    def __init__(self, max_calls: int | None = None) -> None:
        self._text, self._max_calls = "", max_calls
        self._mode: str | None = None  # None: undecided, "calls" (held back) or "content"

    def feed(self, text: str) -> list[Piece]:
        if self._mode == "content":
            return [Piece(text=text)] if text else []
        self._text += text
        if self._mode == "calls":
            return []
        head = self._text.lstrip()
        if not head or self.START.startswith(head):  # not decided yet
            return []
        if head.removeprefix(self.START).lstrip().startswith("["):
            self._mode = "calls"
            return []
        if head.startswith(self.START) and not head.removeprefix(self.START).strip():
            return []
        self._mode = "content"
        return [Piece(text=self._text)]

    def finish(self) -> list[Piece]:
        text, mode = self._text, self._mode
        self._text, self._mode = "", "content"
        if mode == "content" or not text:
            return []
        calls = python_calls(text.strip().removeprefix(self.START).removesuffix(self.END))
        if calls is None:
            return [Piece(text=text)]
        return _whole_calls(calls[:self._max_calls])


def python_calls(text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """`[f(a=1), g(b="x")]` -> [("f", {"a": 1}), ("g", {"b": "x"})]; None if the text is not such a list."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not isinstance(tree.body, ast.List):
        return None
    calls = []
    for node in tree.body.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args or \
                any(keyword.arg is None for keyword in node.keywords):  # positional or **kwargs: not a call
            return None
        try:
            calls.append((node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords}))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None
    return calls


class MistralCalls:
    """Mistral's tool calls (vLLM's mistral): the [TOOL_CALLS] token, then a JSON list of {"name", "arguments"}
    (Mistral 7B v0.3, Mixtral, Nemo) or `name[ARGS]{...}` after each call's own [TOOL_CALLS] (tokenizer v11 and
    later: Mistral Small 3.2, Magistral, Devstral). The text before the first [TOOL_CALLS] is content, streamed;
    what follows is held back to the end, and sent as calls if it reads as such, else as content as written.
    [TOOL_CALLS] is a special token: the frontend asks for special tokens in the text (`keeps_special_tokens`),
    as vLLM does for this parser."""

    TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"
    keeps_special_tokens = True

    def __init__(self, max_calls: int | None = None) -> None:
        self._pending, self._calls_began, self._max_calls = "", False, max_calls

    def feed(self, text: str) -> list[Piece]:
        self._pending += text
        if self._calls_began:
            return []
        start = self._pending.find(self.TAG)
        cut = start if start >= 0 else len(self._pending) - held_back(self._pending, self.TAG)
        content, self._pending = self._pending[:cut], self._pending[cut:]
        self._calls_began = start >= 0
        return [Piece(text=content)] if content else []

    def finish(self) -> list[Piece]:
        text, calls_began = self._pending, self._calls_began
        self._pending, self._calls_began = "", False
        calls = mistral_calls(text) if calls_began else None
        if calls is None:
            return [Piece(text=text)] if text else []
        return _whole_calls(calls[:self._max_calls])


def mistral_calls(text: str) -> list[tuple[str, Any]] | None:
    """The calls after [TOOL_CALLS] in either of Mistral's formats; None if the text is not calls."""
    calls: list[tuple[str, Any]] = []
    for part in text.split(MistralCalls.TAG)[1:]:
        name, has_args, arguments = part.strip().partition(MistralCalls.ARGS)
        try:
            value = json.loads(arguments if has_args else name)
        except (json.JSONDecodeError, RecursionError):
            return None
        if has_args:  # v11: name[ARGS]{...}
            if not name.strip():
                return None
            calls.append((name.strip(), value))
            continue
        for call in value if isinstance(value, list) else [value]:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return None
            calls.append((call["name"], call.get("arguments", {})))
    return calls or None


def required_calls_schema(tools: list[dict], one_call: bool) -> dict:
    """The JSON schema that makes tool_choice "required" produce calls of the given tools only (vLLM's)."""
    items = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
              "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                             "parameters": t["function"].get("parameters") or {"type": "object"}}}
             for t in tools]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if one_call:
        schema["maxItems"] = 1
    return schema


# `--tool-call-parser` names (vLLM's) -> the parser of one choice's output for tool_choice "auto".
TOOL_CALL_PARSERS = {"hermes": HermesCalls, "llama3_json": Llama3JsonCalls, "pythonic": PythonicCalls,
                     "mistral": MistralCalls}
