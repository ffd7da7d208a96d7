"""One OpenAI request as Triton requests to the `llm` model, answered whole or as server-sent events.

Every choice is one Triton request over gRPC streaming (AsyncLLMClient, the client's own transport):
a request with n choices and p prompts sends n * p requests, all in flight together, and choice
index = prompt * n + j, as OpenAI numbers them. Leaving `merged_chunks` early (a disconnect, an error in
another choice) cancels every unfinished request on the server, which frees its KV blocks.

Chat messages go to the model's `messages` input, tool definitions to its `tools` input: the server renders
them with the checkpoint's own chat template (its tokenizer lives with the model, not with this frontend,
which may run anywhere). A chat's output becomes reasoning, content and tool calls in chat_output.py.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from kvtriton.client.api import AsyncLLMClient
from kvtriton.client.errors import LLMClientError
from kvtriton.client.openai import protocol as p
from kvtriton.client.openai.chat_output import ChatOptions, ChatOutput, whole_message
from kvtriton.client.openai.errors import OpenAIError, from_client_error
from kvtriton.client.types import Chunk, CompletionBuilder

SSE_DONE = "data: [DONE]\n\n"


@dataclass
class ChoiceRequest:
    """The AsyncLLMClient.stream arguments of one choice."""

    sampling: dict[str, Any]
    prompt: str | list[int] | None = None  # text or token ids
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    lora_name: str | None = None  # the LoRA adapter the request's `model` names; None: the base model


def completion_choices(request: p.CompletionRequest, lora_name: str | None = None) -> list[ChoiceRequest]:
    return [ChoiceRequest(request.sampling(j), prompt=prompt, lora_name=lora_name)
            for prompt in request.prompts() for j in range(request.n)]


def chat_choices(request: p.ChatCompletionRequest, options: ChatOptions,
                 lora_name: str | None = None) -> list[ChoiceRequest]:
    messages, tools, kwargs = request.template_messages(), request.template_tools(), request.template_kwargs()
    return [ChoiceRequest(options.sampling(request, j), messages=messages, tools=tools, chat_template_kwargs=kwargs,
                          lora_name=lora_name) for j in range(request.n)]


async def merged_chunks(client: AsyncLLMClient, choices: list[ChoiceRequest]) -> AsyncIterator[tuple[int, Chunk]]:
    """(choice index, chunk) as they arrive from all choices; OpenAIError for the first that fails."""
    arrived: asyncio.Queue = asyncio.Queue()
    ENDED = object()

    async def pump(index: int, choice: ChoiceRequest) -> None:
        try:
            async with client.stream(choice.prompt, messages=choice.messages, tools=choice.tools,
                                     chat_template_kwargs=choice.chat_template_kwargs, lora_name=choice.lora_name,
                                     **choice.sampling) as stream:
                async for chunk in stream:
                    arrived.put_nowait((index, chunk))
            arrived.put_nowait((index, ENDED))
        except LLMClientError as e:
            arrived.put_nowait((index, from_client_error(e)))
        except ValueError as e:  # the client's own request checks (kvtriton.client.types.GenerateRequest)
            arrived.put_nowait((index, OpenAIError(str(e))))

    tasks = [asyncio.create_task(pump(i, c)) for i, c in enumerate(choices)]
    try:
        running = len(tasks)
        while running:
            index, item = await arrived.get()
            if item is ENDED:
                running -= 1
            elif isinstance(item, OpenAIError):
                raise item
            else:
                yield index, item
    finally:
        # Cancelling a pump closes its stream, which cancels its Triton request (grpc call.cancel()).
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> p.Usage:
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached_tokens))


@dataclass
class TokenCounts:
    """Token counts per choice; a prompt's tokens count once however many choices share it (OpenAI's usage)."""

    n: int
    prompt: dict[int, int] = field(default_factory=dict)  # prompt index -> its tokens
    cached: dict[int, int] = field(default_factory=dict)  # prompt index -> those the prefix cache served
    completion: int = 0

    def add(self, index: int, counted: Chunk | CompletionBuilder) -> None:
        """A streamed chunk's counts, or a whole choice's (its builder)."""
        if counted.num_input_tokens:
            self.prompt[index // self.n] = counted.num_input_tokens
        if counted.num_cached_tokens:
            self.cached[index // self.n] = counted.num_cached_tokens
        self.completion += counted.num_output_tokens

    def usage(self) -> p.Usage:
        return _usage(sum(self.prompt.values()), self.completion, sum(self.cached.values()))


def _token_text(entry: dict, key: str) -> Any:
    try:
        return entry[key]
    except KeyError:
        raise OpenAIError("the server's logprobs carry no token text (a kvtriton llm model older than the OpenAI "
                          "frontend); update the server or leave logprobs unset", 500) from None


def chat_logprobs(entries: tuple[dict, ...] | list[dict] | None) -> p.ChatLogprobs | None:
    """The server's logprobs ({"token_id", "token", "logprob", "top": [[id, logprob]], "top_tokens"}) in
    OpenAI's chat shape."""
    if entries is None:
        return None
    content = []
    for e in entries:
        token = _token_text(e, "token")
        top = [p.TopLogprob(token=t, logprob=lp, bytes=list(t.encode()))
               for t, (_, lp) in zip(_token_text(e, "top_tokens"), e["top"])]
        content.append(p.TokenLogprob(token=token, logprob=e["logprob"], bytes=list(token.encode()),
                                      top_logprobs=top))
    return p.ChatLogprobs(content=content)


def completion_logprobs(entries: tuple[dict, ...] | list[dict] | None, offset: int) -> p.CompletionLogprobs | None:
    """OpenAI's legacy completions shape; `offset` is where the first token starts in the choice's text."""
    if entries is None:
        return None
    out = p.CompletionLogprobs()
    for e in entries:
        token = _token_text(e, "token")
        out.tokens.append(token)
        out.token_logprobs.append(e["logprob"])
        # An echoed prompt's first token has nothing before it: no logprob, and OpenAI's top_logprobs null.
        top = None if e["logprob"] is None else {t: lp for t, (_, lp) in zip(_token_text(e, "top_tokens"), e["top"])}
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(token)
    return out


def vllm_prompt_logprobs(entries: tuple[dict, ...] | None, top_n: int | None) -> p.PromptLogprobs | None:
    """The server's prompt_logprobs as vLLM's answers give them (None unless the request set top_n): per prompt
    token after the first, the token's own entry (its logprob and rank), then the top N there, ranked 1 .. N."""
    if entries is None or top_n is None:
        return None
    out: p.PromptLogprobs = []
    for e in entries:
        if e["logprob"] is None:  # the first token: nothing before it
            out.append(None)
            continue
        ranked = {str(e["token_id"]): p.PromptLogprob(logprob=e["logprob"], rank=e.get("rank"),
                                                      decoded_token=_token_text(e, "token"))}
        for rank, ((token_id, logprob), text) in enumerate(zip(e["top"][:top_n], _token_text(e, "top_tokens")), 1):
            ranked.setdefault(str(token_id), p.PromptLogprob(logprob=logprob, rank=rank, decoded_token=text))
        out.append(ranked)
    return out


def _top(entries: tuple[dict, ...] | None, n: int) -> tuple[dict, ...] | None:
    """Entries with their top lists cut to n (the server computed the larger N that another field asked for)."""
    if entries is None:
        return None
    return tuple({**e, "top": e["top"][:n], "top_tokens": e.get("top_tokens", [])[:n]} for e in entries)


def echoed_prompt(prompt: str | list[int], prompt_logprobs: tuple[dict, ...] | None) -> str:
    """The text an echo starts with: a text prompt as sent; token ids as the server named each token (the
    prompt_logprobs asked for with them: CompletionRequest.sampling)."""
    if isinstance(prompt, str):
        return prompt
    return "".join(_token_text(e, "token") for e in prompt_logprobs or ())


async def _collect(client: AsyncLLMClient, choices: list[ChoiceRequest]) -> dict[int, CompletionBuilder]:
    builders = {i: CompletionBuilder() for i in range(len(choices))}
    async with aclosing(merged_chunks(client, choices)) as merged:
        async for index, chunk in merged:
            builders[index].add(chunk)
    return builders


async def started(merged: AsyncIterator[tuple[int, Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """`merged`, once its first chunk has arrived. The events generators await this before their first event,
    so that an error before any output (a bad sampling parameter) raises before the response starts and
    gets its own status code instead of an error event in a 200 stream."""
    first = await anext(merged)

    async def rest():
        yield first
        async for item in merged:
            yield item
    return rest()


async def complete(client: AsyncLLMClient, request: p.CompletionRequest, model: str,
                   lora_name: str | None = None) -> p.CompletionResponse:
    choices = completion_choices(request, lora_name)
    builders = await _collect(client, choices)
    counts, out = TokenCounts(request.n), []
    for i, b in builders.items():
        counts.add(i, b)
        echo = echoed_prompt(choices[i].prompt, b.prompt_logprobs) if request.echo else ""
        logprobs = b.build().logprobs
        if logprobs is not None and request.echo:  # one list over the echoed prompt and the answer
            logprobs = [*(_top(b.prompt_logprobs, request.logprobs) or ()), *logprobs]
        out.append(p.CompletionChoice(index=i, text=echo + b.text, finish_reason=b.finish_reason,
                                      logprobs=completion_logprobs(logprobs, 0),
                                      prompt_logprobs=vllm_prompt_logprobs(b.prompt_logprobs, request.prompt_logprobs)))
    return p.CompletionResponse(model=model, choices=out, usage=counts.usage())


async def chat(client: AsyncLLMClient, request: p.ChatCompletionRequest, model: str,
               options: ChatOptions = ChatOptions(), lora_name: str | None = None) -> p.ChatCompletionResponse:
    outputs = {i: ChatOutput(request, options) for i in range(request.n)}
    builders = await _collect(client, chat_choices(request, options, lora_name))
    counts, out = TokenCounts(request.n), []
    for i, b in builders.items():
        counts.add(i, b)
        message = whole_message([outputs[i].feed(b.text, last=True)])
        out.append(p.ChatChoice(index=i, message=message, finish_reason=outputs[i].finish_reason(b.finish_reason),
                                logprobs=chat_logprobs(b.build().logprobs)))
    ranked = vllm_prompt_logprobs(builders[0].prompt_logprobs, request.prompt_logprobs)  # the choices' one prompt
    return p.ChatCompletionResponse(model=model, choices=out, usage=counts.usage(), prompt_logprobs=ranked)


def sse(body: p.BaseModel | dict) -> str:
    data = body.model_dump_json() if isinstance(body, p.BaseModel) else json.dumps(body)
    return f"data: {data}\n\n"


async def complete_events(client: AsyncLLMClient, request: p.CompletionRequest, model: str,
                          lora_name: str | None = None) -> AsyncIterator[str]:
    """Server-sent events of a streamed completion: text deltas per choice, [DONE] last."""
    choices = completion_choices(request, lora_name)
    counts = TokenCounts(request.n)
    offsets = {i: 0 for i in range(len(choices))}
    head = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model)
    echoed: set[int] = set()
    async with aclosing(merged_chunks(client, choices)) as merged:
        chunks = await started(merged)
        async for index, chunk in chunks:
            if request.echo and index not in echoed:  # the prompt first, with its logprobs (on the first chunk)
                echoed.add(index)
                prompt = echoed_prompt(choices[index].prompt, chunk.prompt_logprobs)
                offsets[index] = len(prompt)
                logprobs = completion_logprobs(chunk.prompt_logprobs, 0) if request.logprobs is not None else None
                yield sse(p.CompletionResponse(**head, choices=[p.CompletionChoice(
                    index=index, text=prompt, logprobs=logprobs)]))
            counts.add(index, chunk)
            logprobs = completion_logprobs(chunk.logprobs, offsets[index])
            offsets[index] += len(chunk.text)
            if chunk.text or logprobs or chunk.finish_reason:
                yield sse(p.CompletionResponse(**head, choices=[p.CompletionChoice(
                    index=index, text=chunk.text, logprobs=logprobs, finish_reason=chunk.finish_reason or None)],
                    usage=counts.usage() if request.continuous_usage else None))
    if request.include_usage:
        yield sse(p.CompletionResponse(**head, choices=[], usage=counts.usage()))
    yield SSE_DONE


async def chat_events(client: AsyncLLMClient, request: p.ChatCompletionRequest, model: str,
                      options: ChatOptions = ChatOptions(), lora_name: str | None = None) -> AsyncIterator[str]:
    """Server-sent events of a streamed chat: the role first, then reasoning, content or tool call deltas, an
    empty delta with the finish_reason, and with stream_options.include_usage a last chunk with no choices and
    the usage (with continuous_usage_stats, vLLM's, every chunk also carries the usage so far)."""
    outputs = {i: ChatOutput(request, options) for i in range(request.n)}
    counts = TokenCounts(request.n)
    head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model)

    def event(index: int, delta: p.DeltaMessage, finish_reason: str | None = None, logprobs=None,
              counted: bool = True) -> str:
        return sse(p.ChatCompletionChunk(**head, choices=[p.ChatChunkChoice(
            index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)],
            usage=counts.usage() if request.continuous_usage and counted else None))

    async with aclosing(merged_chunks(client, chat_choices(request, options, lora_name))) as merged:
        chunks = await started(merged)
        for i in range(request.n):
            yield event(i, p.DeltaMessage(role="assistant", content=""), counted=False)  # nothing counted yet
        async for index, chunk in chunks:
            counts.add(index, chunk)
            output = outputs[index]
            delta = output.feed(chunk.text, last=bool(chunk.finish_reason))
            if delta is not None or chunk.logprobs:
                yield event(index, delta or p.DeltaMessage(content=""), logprobs=chat_logprobs(chunk.logprobs))
            if chunk.finish_reason:
                yield event(index, p.DeltaMessage(), output.finish_reason(chunk.finish_reason))
    if request.include_usage:
        yield sse(p.ChatCompletionChunk(**head, choices=[], usage=counts.usage()))
    yield SSE_DONE

