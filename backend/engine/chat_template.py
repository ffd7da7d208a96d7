"""A checkpoint's chat template: messages -> prompt text, rendered as HF transformers renders it.

The template is Jinja compiled once, in the sandboxed environment HF uses (its `tojson`,
`raise_exception` and `strftime_now`, the `{% generation %}` tag), so that kvtriton's prompts are
HF's prompts token for token. Immutable after construction: request threads share it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplate:
    def __init__(self, source_text: str, source: str) -> None:
        """source: where the template came from, for error messages."""
        self._template = _compile(source_text, source)

    def render(self, messages: list[dict], add_generation_prompt: bool,
               special_tokens: Mapping[str, str | None], tools: list[dict] | None = None,
               continue_final_message: bool = False, template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The prompt; ValueError for messages that are malformed or that the template itself rejects.
        `tools`: the template's `tools` variable as HF passes it (None when the request has none).
        `continue_final_message`: the prompt ends inside the last message (HF's: the text after its content, the
        end of turn, is cut), so the model continues it. `template_kwargs`: more template variables (HF's
        apply_chat_template **kwargs, e.g. Qwen3's enable_thinking), over the special tokens' names."""
        _check_messages(messages)
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true")
        taken = sorted({"messages", "tools", "add_generation_prompt"} & set(template_kwargs or ()))
        if taken:
            raise ValueError(f"chat_template_kwargs cannot set {', '.join(taken)}")
        try:
            prompt = self._template.render(
                **{**special_tokens, **(template_kwargs or {})}, messages=_with_parsed_arguments(messages),
                tools=tools, add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as exc:
            # raise_exception() in templates reports user errors such as non-alternating roles.
            raise ValueError(f"the chat template rejected the messages: {exc}") from exc
        return _cut_after_final_message(prompt, messages[-1]) if continue_final_message else prompt


def select_template(template: Any, config_file: Path) -> str | None:
    """tokenizer_config.json holds one template string or a list of named ones."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(
            f"{config_file}: chat_template lists {sorted(map(str, named))} but no 'default' template"
        )
    raise ValueError(f"{config_file}: chat_template must be a string or a list of named templates")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body; HF uses it only to mark training spans."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Any) -> str:
        return caller()


def _compile(source_text: str, source: str) -> jinja2.Template:
    """Compile once with the environment HF transformers renders templates in."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(
        value: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        # Jinja's own tojson HTML-escapes; templates expect plain JSON.
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source_text)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(
            f"{source}: chat template does not compile (line {exc.lineno}): {exc.message}"
        ) from exc


def _cut_after_final_message(prompt: str, final: dict) -> str:
    """The prompt up to the end of the last message's content, as HF's continue_final_message cuts it."""
    content = final.get("content") or ""
    for text in (content, content.strip()):
        at = prompt.rfind(text) if text else -1
        if at >= 0:
            return prompt[:at + len(text)]
    raise ValueError("continue_final_message: the last message's content is not in the rendered prompt (an empty "
                     "message, or one the template rewrites)")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role'")
        if "content" not in message and "tool_calls" not in message:
            raise ValueError(f"messages[{i}] ({message['role']}) has no 'content'")


def _with_parsed_arguments(messages: list[dict]) -> list[dict]:
    """OpenAI sends a tool call's arguments as a JSON string; templates write them with `| tojson` and expect
    the object (vLLM parses them the same way before rendering). Messages are copied, never changed."""
    out = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [_parsed_call(i, j, call) for j, call in enumerate(calls)]}
        out.append(message)
    return out


def _parsed_call(i: int, j: int, call: dict) -> dict:
    function = call.get("function", {})
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError as exc:
        raise ValueError(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {exc.msg}") from None
    return {**call, "function": {**function, "arguments": parsed}}
