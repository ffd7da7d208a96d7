"""The FastAPI app: OpenAI's routes over one AsyncLLMClient (gRPC streaming to the `llm` model).

A client that disconnects cancels its Triton requests: a streamed response's generator is cancelled by
Starlette (its merged_chunks then cancels the gRPC calls); a non-streamed one races the work against
the disconnect (`_cancel_on_disconnect`, as vLLM's `with_cancellation`). Every error is OpenAI's shape.
With an API key (`kvtriton openai --api-key-file`, $KVTRITON_API_KEY), every route but /health (load
balancers' probes) wants header `Authorization: Bearer <key>`, which OpenAI's SDKs send, as vLLM's --api-key
does; else a 401.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
from contextlib import asynccontextmanager
from importlib.metadata import version as package_version
from typing import Any, AsyncIterator, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvtriton.client.api import AsyncLLMClient
from kvtriton.client.openai import protocol as p
from kvtriton.client.openai import responses, serving, tokenization
from kvtriton.client.openai.chat_output import ChatOptions
from kvtriton.client.openai.errors import OpenAIError
from kvtriton.client.openai.responses_protocol import ResponsesRequest
from kvtriton.client.openai.served_models import ServedModels

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client went away; nobody reads it


def create_app(client: AsyncLLMClient, served_model_name: str, tool_call_parser: str | None = None,
               reasoning_parser: str | None = None, api_key: str | None = None) -> FastAPI:
    """`served_model_name`: the id clients pass as `model` for the base model (default: the Triton model's name;
    the names of the model's LoRA adapters select those, served_models.py);
    `tool_call_parser`: how tool_choice "auto" finds calls in the output (None: "auto" is refused);
    `reasoning_parser`: how a thinking model's reasoning is told from its answer (None: all is content);
    `api_key`: the bearer token every route but /health wants (None: open).
    ValueError for a parser name that is not known."""
    chat_options = ChatOptions(tool_call_parser, reasoning_parser)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # What start-up left alive (FastAPI's routes, pydantic's models, tritonclient) stays alive: frozen, as vLLM's
        # API server freezes it, a full garbage collection scans only what came after. Unfrozen, one took 31 ms
        # mid-stream on the 2-core VM, a pause of every stream this process relays.
        gc.collect()
        gc.freeze()
        yield
        await client.aclose()

    app = FastAPI(title="kvtriton OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan)

    if api_key is not None:
        expected = f"Bearer {api_key}".encode()

        @app.middleware("http")
        async def require_api_key(request: Request, call_next):
            given = request.headers.get("authorization", "").encode()
            if request.url.path != "/health" and not hmac.compare_digest(given, expected):  # constant time
                error = OpenAIError("Incorrect or missing API key: send header Authorization: Bearer <key>", 401,
                                    code="invalid_api_key")
                return JSONResponse(error.body(), status_code=401)
            return await call_next(request)

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, error: OpenAIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        # pydantic's first complaint, with the field's path ("messages.0.content") as OpenAI's `param`.
        first = error.errors()[0]
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return JSONResponse(OpenAIError(message, param=param).body(), status_code=400)

    served = ServedModels(client, served_model_name)

    @app.get("/v1/models")
    async def models() -> p.ModelList:
        return p.ModelList(data=await served.cards())

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> p.ModelCard:
        return await served.card(model)

    @app.get("/version")
    async def version() -> dict[str, str]:
        """vLLM's: the server's version (kvtriton's package)."""
        return {"version": package_version("kvtriton")}

    @app.get("/health")
    async def health() -> Response:
        """200 once the Triton model answers readiness, else 503 with the reason (for load balancers, probes)."""
        probe = await client.probe()
        if not probe.ready:
            raise OpenAIError(probe.reason, status=503)
        return Response(status_code=200)

    async def answer(request: Request, body, whole, events, **options) -> Any:
        """Check the request, then the whole response or its SSE stream; a disconnect cancels either. The answer
        names the model as the request did (an adapter's name for an adapter, as vLLM's do)."""
        body.check()
        lora_name = await served.lora_name(body.model)
        work = (_event_stream(events(client, body, body.model, lora_name=lora_name, **options)) if body.stream
                else whole(client, body, body.model, lora_name=lora_name, **options))
        return await _cancel_on_disconnect(request, work)

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request) -> Any:
        return await answer(request, body, serving.complete, serving.complete_events)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Any:
        return await answer(request, body, serving.chat, serving.chat_events, options=chat_options)

    @app.post("/v1/responses")
    async def create_response(body: ResponsesRequest, request: Request) -> Any:
        return await answer(request, body, responses.respond, responses.respond_events, options=chat_options)

    # vLLM's (not OpenAI's): the model's token ids of a prompt or a chat, and their text (tokenization.py)
    @app.post("/tokenize")
    async def tokenize(body: tokenization.TokenizeRequest) -> tokenization.TokenizeResponse:
        if body.model is not None:
            await served.lora_name(body.model)  # an adapter's tokenizer is the base's
        return await tokenization.tokenize(client, body, served_model_name)

    @app.post("/detokenize")
    async def detokenize(body: tokenization.DetokenizeRequest) -> tokenization.DetokenizeResponse:
        if body.model is not None:
            await served.lora_name(body.model)
        return await tokenization.detokenize(client, body)

    return app


async def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """The SSE response, started once the first event is ready: an error before any output (bad input, no
    server) raises here and gets its own status; an error after it comes as an error event, then [DONE]."""
    first = await anext(events)

    async def body() -> AsyncIterator[str]:
        yield first
        try:
            async for event in events:
                yield event
        except OpenAIError as e:
            yield serving.sse(e.body())
            yield serving.SSE_DONE
        finally:
            await events.aclose()  # on a disconnect Starlette cancels this generator: cancel the Triton requests

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _cancel_on_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result, or, when the client disconnects first, `work` cancelled (and its Triton requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return task.result()
