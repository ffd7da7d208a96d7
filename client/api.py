"""LLMClient / AsyncLLMClient: generate and stream text from kvtriton's `llm` model.

    client = LLMClient("localhost:8001")                    # gRPC; "http://localhost:8000" for HTTP
    print(client.generate("Hi", max_tokens=16, temperature=0).text)
    for chunk in client.stream("Tell me a story", max_tokens=64):
        print(chunk.text, end="", flush=True)               # break (or .close()) cancels on the server

    async with AsyncLLMClient("localhost:8001") as client:
        completion = await client.generate("Hi")             # cancelling the task cancels the request
        async for chunk in client.stream("Hi"): ...

    client.tokenize(messages=[...]).count                   # a prompt's tokens as the server counts them
    client.detokenize([9906, 1917])                         # and back to text
    await client.lora_modules()                             # the model's LoRA adapters: {"sql": "/adapters/sql"}

Sampling keyword arguments are the contract's names (max_tokens, temperature,
top_p, top_k, min_p, seed, stop, stop_token_ids, ignore_eos, min_tokens,
repetition_penalty, presence_penalty, frequency_penalty, logprobs,
skip_special_tokens, priority, which orders requests on a server whose scheduling_policy
is priority, and lora_name, one of the model's LoRA adapters (lora_modules()), as Triton's
vllm_backend takes it); None leaves the server default (lora_name: the base model). The first
request waits for readiness: `connect_retries` more probes with exponential backoff, then
ServerUnavailableError naming the URL. `timeout_s` is the longest silence
allowed between two responses of one request (RequestTimeoutError).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Mapping, Sequence

from kvtriton.client.endpoint import Endpoint
from kvtriton.client.errors import ServerError
from kvtriton.client.grpc_client import AsyncGrpcTransport, GrpcTransport
from kvtriton.client.http_client import AsyncHttpTransport, HttpTransport
from kvtriton.client.lora_modules import lora_modules_in
from kvtriton.client.probe import Probe, async_wait_ready, wait_ready
from kvtriton.client.types import Chunk, Completion, CompletionBuilder, GenerateRequest, Tokens

DEFAULT_MODEL = "llm"
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CONNECT_RETRIES = 5  # about 6 s of backoff in all


def user_turn(text: str, raw: bool = False) -> dict[str, Any]:
    """stream()/generate() keyword arguments for one user text: one user message, which the server renders with
    the model's chat template (what an instruct model answers), or with `raw` the text as the prompt itself."""
    return {"prompt": text} if raw else {"messages": [{"role": "user", "content": text}]}


def _request(prompt: str | list[int] | None, messages: Sequence[Mapping[str, Any]] | None, stream: bool,
             sampling: dict[str, Any], tools: Sequence[Mapping[str, Any]] | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None, task: str = "generate") -> GenerateRequest:
    return GenerateRequest(prompt=prompt, messages=tuple(messages) if messages is not None else None,
                           stream=stream, sampling=sampling, tools=tuple(tools) if tools is not None else None,
                           chat_template_kwargs=chat_template_kwargs, task=task)


def _task_answer(endpoint: Endpoint, request: GenerateRequest, chunks: list[Chunk]) -> Chunk:
    """The one response of a tokenize or detokenize request."""
    if len(chunks) != 1 or (request.task == "tokenize" and chunks[0].token_ids is None):
        raise ServerError(f"{endpoint.url} did not answer the {request.task} task with one response of token ids: "
                          "is the model kvtriton's llm, of a version that has tasks?")
    return chunks[0]


def _tokens(chunk: Chunk) -> Tokens:
    return Tokens(chunk.token_ids, chunk.max_model_len)


def _check_options(timeout_s: float, connect_retries: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if not (isinstance(connect_retries, int) and connect_retries >= 0):
        raise ValueError(f"connect_retries must be an integer >= 0, got {connect_retries!r}")


def _unfinished(endpoint: Endpoint) -> ServerError:
    return ServerError(f"{endpoint.url} ended the response stream without a finish_reason")


class _RecordedStream:
    """What the sync and asyncio streams share: one request's chunks, recorded into a Completion."""

    def __init__(self, endpoint: Endpoint, responses):
        self._endpoint, self._responses = endpoint, responses
        self._builder: CompletionBuilder | None = None

    def _start(self) -> None:
        if self._builder is None:
            self._builder = CompletionBuilder()

    def _record(self, chunk: Chunk) -> Chunk:
        self._builder.add(chunk)
        return chunk

    def _check_finished(self) -> None:
        """At the end of the responses: a stream without a finish_reason was cut off."""
        if not self._builder.finish_reason:
            raise _unfinished(self._endpoint) from None

    @property
    def completion(self) -> Completion:
        """The whole request (text, token counts, TTFT, latency); only after the last chunk."""
        if self._builder is None:
            raise ValueError("the stream has not been read yet")
        return self._builder.build()

    @property
    def builder(self) -> CompletionBuilder | None:
        """Per-chunk arrival times and token counts (for load generators)."""
        return self._builder


class TokenStream(_RecordedStream):
    """The chunks of one streamed request; `.completion` once it is exhausted.

    The request is sent on the first `next()`. Closing the stream before its end
    (`close()`, leaving a `with` block, or dropping it after `break`) cancels it.
    """

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Chunk:
        self._start()
        try:
            return self._record(next(self._responses))
        except StopIteration:
            self._check_finished()
            raise

    def close(self) -> None:
        self._responses.close()

    def __enter__(self) -> "TokenStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncTokenStream(_RecordedStream):
    """`async for` counterpart of TokenStream; `aclose()` or leaving `async with` cancels."""

    def __aiter__(self) -> "AsyncTokenStream":
        return self

    async def __anext__(self) -> Chunk:
        self._start()
        try:
            return self._record(await self._responses.__anext__())
        except StopAsyncIteration:
            self._check_finished()
            raise

    async def aclose(self) -> None:
        await self._responses.aclose()

    async def __aenter__(self) -> "AsyncTokenStream":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()


class _Client:
    """What both clients share: the endpoint, the model, the transport for the protocol."""

    _TRANSPORTS: dict[str, type] = {}  # protocol -> transport class

    def __init__(self, url: str, protocol: str | None = None, model: str = DEFAULT_MODEL,
                 timeout_s: float = DEFAULT_TIMEOUT_S, connect_retries: int = DEFAULT_CONNECT_RETRIES):
        """`protocol`: "grpc" or "http"; None takes it from the URL's scheme (http://...), else gRPC."""
        _check_options(timeout_s, connect_retries)
        self.endpoint = Endpoint.parse(url, protocol)
        self.model, self.connect_retries = model, connect_retries
        self._transport = self._TRANSPORTS[self.endpoint.protocol](self.endpoint, model, timeout_s)
        self._ready = False


class LLMClient(_Client):
    """Blocking client; one request at a time per instance."""

    _TRANSPORTS = {"grpc": GrpcTransport, "http": HttpTransport}

    def wait_ready(self) -> None:
        """Return once the server and the model are ready; ServerUnavailableError after the retries."""
        if not self._ready:
            wait_ready(self.endpoint.url, self._transport.probe, self.connect_retries)
            self._ready = True

    def stream(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, Any]] | None = None,
               tools: Sequence[Mapping[str, Any]] | None = None,
               chat_template_kwargs: Mapping[str, Any] | None = None, **sampling: Any) -> TokenStream:
        request = _request(prompt, messages, True, sampling, tools, chat_template_kwargs)
        self.wait_ready()
        return TokenStream(self.endpoint, self._transport.responses(request))

    def generate(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, Any]] | None = None,
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 chat_template_kwargs: Mapping[str, Any] | None = None, **sampling: Any) -> Completion:
        """One non-streamed request: its TTFT is the arrival of the single response."""
        request = _request(prompt, messages, False, sampling, tools, chat_template_kwargs)
        self.wait_ready()
        stream = TokenStream(self.endpoint, self._transport.responses(request))
        for _ in stream:
            pass
        return stream.completion

    def tokenize(self, prompt: str | list[int] | None = None, *, messages: Sequence[Mapping[str, Any]] | None = None,
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 chat_template_kwargs: Mapping[str, Any] | None = None) -> Tokens:
        """The token ids a generation of this prompt (or chat, rendered by the model's template) starts from."""
        return _tokens(self._task(_request(prompt, messages, False, {}, tools, chat_template_kwargs, "tokenize")))

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of token ids, special tokens included."""
        return self._task(_request(list(token_ids), None, False, {}, task="detokenize")).text

    def _task(self, request: GenerateRequest) -> Chunk:
        self.wait_ready()
        return _task_answer(self.endpoint, request, list(self._transport.responses(request)))

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "LLMClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncLLMClient(_Client):
    """asyncio client; any number of concurrent requests."""

    _TRANSPORTS = {"grpc": AsyncGrpcTransport, "http": AsyncHttpTransport}
    _ready_lock: asyncio.Lock | None = None

    async def wait_ready(self) -> None:
        if self._ready:
            return
        if self._ready_lock is None:
            self._ready_lock = asyncio.Lock()
        async with self._ready_lock:  # concurrent first requests share one probe loop
            if not self._ready:
                await async_wait_ready(self.endpoint.url, self._transport.probe, self.connect_retries)
                self._ready = True

    async def probe(self) -> Probe:
        """One readiness look at the server and the model, without retries (a health endpoint's answer)."""
        return await self._transport.probe()

    async def server_metadata(self) -> dict[str, Any]:
        """Triton's server metadata: name, version, extensions."""
        await self.wait_ready()
        return await self._transport.server_metadata()

    async def lora_modules(self) -> dict[str, str]:
        """The model's LoRA adapters, name -> path, as its config's lora_modules parameter lists them ({}: none);
        a request names one as `lora_name`."""
        await self.wait_ready()
        return lora_modules_in(await self._transport.model_config())

    def stream(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, Any]] | None = None,
               tools: Sequence[Mapping[str, Any]] | None = None,
               chat_template_kwargs: Mapping[str, Any] | None = None, **sampling: Any) -> AsyncTokenStream:
        """`tools`: OpenAI's tool definitions, rendered by the model's chat template (with `messages` only);
        `chat_template_kwargs`: more template variables, and HF's add_generation_prompt / continue_final_message."""
        request = _request(prompt, messages, True, sampling, tools, chat_template_kwargs)
        return AsyncTokenStream(self.endpoint, self._ready_then(request))

    async def generate(self, prompt: str | None = None, *, messages: Sequence[Mapping[str, Any]] | None = None,
                       tools: Sequence[Mapping[str, Any]] | None = None,
                       chat_template_kwargs: Mapping[str, Any] | None = None, **sampling: Any) -> Completion:
        request = _request(prompt, messages, False, sampling, tools, chat_template_kwargs)
        await self.wait_ready()
        stream = AsyncTokenStream(self.endpoint, self._transport.responses(request))
        async with stream:
            async for _ in stream:
                pass
        return stream.completion

    async def tokenize(self, prompt: str | list[int] | None = None, *,
                       messages: Sequence[Mapping[str, Any]] | None = None,
                       tools: Sequence[Mapping[str, Any]] | None = None,
                       chat_template_kwargs: Mapping[str, Any] | None = None) -> Tokens:
        """The token ids a generation of this prompt (or chat, rendered by the model's template) starts from."""
        request = _request(prompt, messages, False, {}, tools, chat_template_kwargs, "tokenize")
        return _tokens(await self._task(request))

    async def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of token ids, special tokens included."""
        return (await self._task(_request(list(token_ids), None, False, {}, task="detokenize"))).text

    async def _task(self, request: GenerateRequest) -> Chunk:
        await self.wait_ready()
        return _task_answer(self.endpoint, request, [chunk async for chunk in self._transport.responses(request)])

    async def _ready_then(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        await self.wait_ready()
        responses = self._transport.responses(request)
        try:
            async for chunk in responses:
                yield chunk
        finally:
            await responses.aclose()

    async def aclose(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> "AsyncLLMClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()
