"""POST /v1/responses, served by the chat path: the request as a chat completion (responses_protocol.py), its
one choice's deltas (chat_output.ChatOutput) as the response's output items, whole or as OpenAI's events.

The items open in the order their text arrives: the reasoning (with --reasoning-parser), the message, the
function calls. A whole response is the chat's whole message fed as one delta through the same builder, so
the streamed events join to what the whole response would have been.
"""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any, AsyncIterator

from kvtriton.client.api import AsyncLLMClient
from kvtriton.client.openai import protocol as p
from kvtriton.client.openai import responses_protocol as rp
from kvtriton.client.openai import serving
from kvtriton.client.openai.chat_output import ChatOptions, ChatOutput
from kvtriton.client.openai.errors import OpenAIError


class ResponseBuilder:
    """A response's output items from one chat choice's deltas, and the stream events that build them, numbered.

    Blank content is held back until it is more than blank: an answer that is only whitespace beside calls or
    reasoning is no message (whole_message's rule); a plain answer is a message, even an empty one."""

    def __init__(self, response: rp.Response) -> None:
        self.response = response
        self._sequence = 0
        self._open: list[rp.OutputItem] = []  # items not yet done
        self._reasoning: rp.OutputReasoning | None = None
        self._message: rp.OutputMessage | None = None
        self._calls: dict[int, rp.OutputFunctionCall] = {}  # by the chat's tool call index
        self._held = ""

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        dumped = {k: v.model_dump(mode="json", by_alias=True) if isinstance(v, p.BaseModel) else v
                  for k, v in fields.items()}
        self._sequence += 1
        return {"type": type, "sequence_number": self._sequence - 1, **dumped}

    def feed(self, delta: p.DeltaMessage | None) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if delta is None:
            return events
        if delta.reasoning_content:
            if self._reasoning is None:
                self._reasoning = rp.OutputReasoning()
                events += self._add(self._reasoning)
            events += self._text(self._reasoning, delta.reasoning_content)
        self._held += delta.content or ""
        if self._message is None and self._held.strip():
            events += self._done(self._reasoning) + self._open_message()
        if self._message is not None and self._held:
            events += self._text(self._message, self._held)
            self._held = ""
        for call in delta.tool_calls or ():
            if call.id is not None:  # a new call: the reasoning and the call before it are done
                events += self._done(self._reasoning) + self._done(self._calls.get(call.index - 1))
                self._calls[call.index] = rp.OutputFunctionCall(call_id=call.id, name=call.function.name)
                events += self._add(self._calls[call.index])
            if call.function.arguments:
                item = self._calls[call.index]
                item.arguments += call.function.arguments
                events.append(self.event("response.function_call_arguments.delta", item_id=item.id,
                                         output_index=self._index(item), delta=call.function.arguments))
        return events

    def finish(self, finish_reason: str, usage: p.Usage) -> list[dict[str, Any]]:
        """The open items done, then response.completed, or response.incomplete when the output was cut
        (max_output_tokens, or the server aborted it)."""
        events = []
        if self._message is None and not (self._calls or self._reasoning):
            events += self._open_message() + self._text(self._message, self._held)
        incomplete = finish_reason in ("length", "abort")
        for item in list(self._open):
            events += self._done(item, "incomplete" if incomplete else "completed")
        self.response.status = "incomplete" if incomplete else "completed"
        if finish_reason == "length":
            self.response.incomplete_details = rp.IncompleteDetails(reason="max_output_tokens")
        self.response.usage = rp.ResponseUsage.of(usage)
        return events + [self.event(f"response.{self.response.status}", response=self.response)]

    def failed(self, error: OpenAIError) -> dict[str, Any]:
        self.response.status = "failed"
        self.response.error = rp.ResponseError(code="server_error", message=error.message)
        return self.event("response.failed", response=self.response)

    def _open_message(self) -> list[dict[str, Any]]:
        self._message = rp.OutputMessage()
        return self._add(self._message)

    def _index(self, item: rp.OutputItem) -> int:
        return next(i for i, out in enumerate(self.response.output) if out is item)

    def _part(self, item: rp.OutputItem) -> rp.OutputText | rp.ReasoningText | None:
        return item.content[0] if isinstance(item, (rp.OutputMessage, rp.OutputReasoning)) else None

    def _add(self, item: rp.OutputItem) -> list[dict[str, Any]]:
        self.response.output.append(item)
        self._open.append(item)
        events = [self.event("response.output_item.added", output_index=self._index(item), item=item)]
        if isinstance(item, (rp.OutputMessage, rp.OutputReasoning)):
            part = rp.OutputText() if isinstance(item, rp.OutputMessage) else rp.ReasoningText()
            item.content.append(part)
            events.append(self.event("response.content_part.added", item_id=item.id, output_index=self._index(item),
                                     content_index=0, part=part))
        return events

    def _text(self, item: rp.OutputMessage | rp.OutputReasoning, text: str) -> list[dict[str, Any]]:
        self._part(item).text += text
        if not text:
            return []
        where = dict(item_id=item.id, output_index=self._index(item), content_index=0, delta=text)
        if isinstance(item, rp.OutputMessage):
            return [self.event("response.output_text.delta", **where, logprobs=[])]
        return [self.event("response.reasoning_text.delta", **where)]

    def _done(self, item: rp.OutputItem | None, status: str = "completed") -> list[dict[str, Any]]:
        if item is None or item not in self._open:
            return []
        self._open.remove(item)
        item.status = status
        where = dict(item_id=item.id, output_index=self._index(item))
        part = self._part(item)
        if isinstance(item, rp.OutputFunctionCall):
            events = [self.event("response.function_call_arguments.done", **where, arguments=item.arguments)]
        elif isinstance(item, rp.OutputMessage):
            events = [self.event("response.output_text.done", **where, content_index=0, text=part.text, logprobs=[])]
        else:
            events = [self.event("response.reasoning_text.done", **where, content_index=0, text=part.text)]
        if part is not None:
            events.append(self.event("response.content_part.done", **where, content_index=0, part=part))
        return events + [self.event("response.output_item.done", output_index=where["output_index"], item=item)]


def _as_delta(message: p.ChatMessageOut) -> p.DeltaMessage:
    """A whole chat message as the one delta that would have carried all of it."""
    return p.DeltaMessage(content=message.content, reasoning_content=message.reasoning_content, tool_calls=[
        p.DeltaToolCall(index=i, id=call.id, type="function",
                        function=p.DeltaFunctionCall(name=call.function.name, arguments=call.function.arguments))
        for i, call in enumerate(message.tool_calls)])


async def respond(client: AsyncLLMClient, request: rp.ResponsesRequest, model: str,
                  options: ChatOptions = ChatOptions(), lora_name: str | None = None) -> rp.Response:
    try:
        whole = await serving.chat(client, request.chat, model, options, lora_name)
    except OpenAIError as e:
        raise rp.in_responses_terms(e) from None
    [choice] = whole.choices
    builder = ResponseBuilder(rp.Response.started(request, model))
    builder.feed(_as_delta(choice.message))
    builder.finish(choice.finish_reason, whole.usage)
    return builder.response


def sse_event(event: dict[str, Any]) -> str:
    """OpenAI's Responses events name their type on an `event:` line too; there is no [DONE]."""
    return f"event: {event['type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n"


async def respond_events(client: AsyncLLMClient, request: rp.ResponsesRequest, model: str,
                         options: ChatOptions = ChatOptions(), lora_name: str | None = None) -> AsyncIterator[str]:
    """response.created and .in_progress, each item's events as its text arrives, then response.completed (or
    .incomplete) with the whole response. An error after the first event is response.failed, the last event."""
    output = ChatOutput(request.chat, options)
    counts = serving.TokenCounts(1)
    builder = ResponseBuilder(rp.Response.started(request, model))
    finish_reason = ""
    choices = serving.chat_choices(request.chat, options, lora_name)
    async with aclosing(serving.merged_chunks(client, choices)) as merged:
        try:
            chunks = await serving.started(merged)
        except OpenAIError as e:
            raise rp.in_responses_terms(e) from None
        for kind in ("response.created", "response.in_progress"):
            yield sse_event(builder.event(kind, response=builder.response))
        try:
            async for _, chunk in chunks:
                counts.add(0, chunk)
                for event in builder.feed(output.feed(chunk.text, last=bool(chunk.finish_reason))):
                    yield sse_event(event)
                finish_reason = chunk.finish_reason or finish_reason
        except OpenAIError as e:
            yield sse_event(builder.failed(rp.in_responses_terms(e)))
            return
    for event in builder.finish(finish_reason, counts.usage()):
        yield sse_event(event)
