"""gRPC transport (tritonclient.grpc): the bidirectional stream API, sync and asyncio.

The `llm` model is decoupled, so even a non-streamed request goes over the
stream API (it then gets one response). Every request asks for Triton's empty
final response, so the end of a request is the FINAL flag, whatever the model
put in its last response. Closing a response iterator before that flag cancels
the request on the server (`stop_stream(cancel_requests=True)` / `call.cancel()`),
which the model sees as `is_cancelled()` and frees the sequence.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, AsyncIterator, Iterator

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from kvtriton.client.endpoint import Endpoint
from kvtriton.client.errors import RequestTimeoutError, ServerError, ServerUnavailableError, server_error
from kvtriton.client.probe import PROBE_TIMEOUT_S, READY, Probe
from kvtriton.client.types import Chunk, GenerateRequest

_FINAL = "triton_final_response"


# The llm model's integer inputs are INT32 but for the seeds, UINT64 (its contract: backend/triton/request.py,
# which the client does not import).
_UINT64_INPUTS = ("seed", "random_seed")


def input_tensors(**values: Any) -> list[grpcclient.InferInput]:
    """The llm model's input tensors for input name -> value: a str, bytes, bool, int or float, or a list of them
    (one tensor of the list's length). Each goes as the model's type for it: strings as UTF-8 BYTES, bools as
    BOOL, ints as INT32 (seeds UINT64), floats as FP32."""
    inputs = []
    for name, value in values.items():
        items = value if isinstance(value, list) else [value]
        if any(isinstance(v, (str, bytes)) for v in items):  # not through numpy's str types: they drop trailing NULs
            # surrogatepass: a lone surrogate (JSON's "\ud800" decodes to one) goes as the bytes it stands for,
            # and the server refuses them as not UTF-8, naming the input, where a strict encode would raise here.
            array = np.array([v.encode("utf-8", errors="surrogatepass") if isinstance(v, str) else v for v in items],
                             dtype=np.object_)
        else:
            array = np.array(items)
            if array.dtype == np.int64:
                array = array.astype(np.uint64 if name in _UINT64_INPUTS else np.int32)
            elif array.dtype == np.float64:
                array = array.astype(np.float32)
        tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer_inputs(request: GenerateRequest) -> list[grpcclient.InferInput]:
    return input_tensors(**request.inputs())


def _chunk(result) -> tuple[Chunk | None, bool]:
    """(chunk or None for an empty final response, is_final)."""
    response = result.get_response()
    final = _FINAL in response.parameters and response.parameters[_FINAL].bool_param
    if not response.outputs:
        return None, final

    def text(name: str) -> str:
        array = result.as_numpy(name)
        return "" if array is None else b"".join(array.reshape(-1)).decode("utf-8")

    def count(name: str) -> int:
        array = result.as_numpy(name)
        return 0 if array is None else int(array.reshape(-1)[0])

    ids = result.as_numpy("token_ids")
    chunk = Chunk.from_outputs(text("text_output"), count("num_input_tokens"), count("num_output_tokens"),
                               text("finish_reason"), text("logprobs"), text("prompt_logprobs"),
                               None if ids is None else ids.reshape(-1).tolist(), count("max_model_len"),
                               count("num_cached_tokens"))
    return chunk, final


def _error(endpoint: Endpoint, error: InferenceServerException) -> Exception:
    status = error.status() or ""
    if "UNAVAILABLE" in status:
        return ServerUnavailableError(endpoint.url, f"connection lost ({error.message()})")
    if status and "UNKNOWN" not in status:
        return ServerError(f"{status}: {error.message()}")
    return server_error(error.message())  # an error response from the model or Triton's checks


def _probe_client(client, model: str) -> Probe:
    try:
        if not client.is_server_ready(client_timeout=PROBE_TIMEOUT_S):
            return Probe(False, True, "server is up but not ready (models still loading?)")
        if client.is_model_ready(model, client_timeout=PROBE_TIMEOUT_S):
            return READY
        index = client.get_model_repository_index(as_json=True, client_timeout=PROBE_TIMEOUT_S)
    except InferenceServerException as e:
        return Probe(False, True, f"no gRPC server answers ({e.message()})")
    return _model_missing(model, index)


def _model_missing(model: str, index: dict) -> Probe:
    ready = [m["name"] for m in index.get("models", []) if m.get("state") == "READY"]
    return Probe(False, False, f"the server has no ready model {model!r} (ready: {', '.join(ready) or 'none'}); "
                               "pass the right model name")


class GrpcTransport:
    """Blocking; one request at a time per instance (tritonclient allows one stream per client).

    The stream stays open from one request to the next, as perf_analyzer keeps one per worker: opening one
    (a round trip and a response thread) took 1-6 ms a request on a 2-core VM, and through tritonserver on an
    H200 one 128-token stream at a time ran at 0.93-0.94 of the engine in-process over gRPC against 0.98 over
    SSE. A request that ends any other way than its final response (abandoned, timed out, an error) closes
    the stream, cancelling on the server what it still runs, so no later request can read its responses."""

    def __init__(self, endpoint: Endpoint, model: str, timeout_s: float):
        self.endpoint, self.model, self.timeout_s = endpoint, model, timeout_s
        self._client = grpcclient.InferenceServerClient(endpoint.address)
        self._busy = threading.Lock()
        self._received: queue.SimpleQueue | None = None  # the open stream's (result, error) pairs; None: closed

    def probe(self) -> Probe:
        return _probe_client(self._client, self.model)

    def responses(self, request: GenerateRequest) -> Iterator[Chunk]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this LLMClient is already running a request; use one client per thread, "
                               "or AsyncLLMClient for concurrent requests")
        done = False
        try:
            received = self._open_stream()
            self._client.async_stream_infer(self.model, infer_inputs(request), request_id=request.request_id,
                                            enable_empty_final_response=True)
            while not done:
                try:
                    result, error = received.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise RequestTimeoutError(
                        f"no response from {self.endpoint.url} for {self.timeout_s:g} s; the request was cancelled"
                    ) from None
                if error is not None:
                    raise _error(self.endpoint, error)  # an error response ends the request
                chunk, done = _chunk(result)
                if chunk is not None:
                    yield chunk
        finally:
            if not done:  # the caller stopped early, timed out, or the request failed: cancel on the server
                self._close_stream(cancel=True)
            self._busy.release()

    def _open_stream(self) -> queue.SimpleQueue:
        if self._received is None:
            received: queue.SimpleQueue = queue.SimpleQueue()
            self._client.start_stream(callback=lambda result, error: received.put((result, error)))
            self._received = received
        return self._received

    def _close_stream(self, cancel: bool) -> None:
        if self._received is not None:
            self._received = None
            self._client.stop_stream(cancel_requests=cancel)

    def close(self) -> None:
        self._close_stream(cancel=False)  # between requests: nothing runs on it
        self._client.close()


class AsyncGrpcTransport:
    """asyncio; any number of concurrent requests, one gRPC stream each over a shared channel."""

    def __init__(self, endpoint: Endpoint, model: str, timeout_s: float):
        self.endpoint, self.model, self.timeout_s = endpoint, model, timeout_s
        self._client: grpcclient_aio.InferenceServerClient | None = None

    def _get_client(self) -> grpcclient_aio.InferenceServerClient:
        # Created on first use, inside the running loop that will own the channel.
        if self._client is None:
            self._client = grpcclient_aio.InferenceServerClient(self.endpoint.address)
        return self._client

    async def probe(self) -> Probe:
        client = self._get_client()
        try:
            if not await client.is_server_ready(client_timeout=PROBE_TIMEOUT_S):
                return Probe(False, True, "server is up but not ready (models still loading?)")
            if await client.is_model_ready(self.model, client_timeout=PROBE_TIMEOUT_S):
                return READY
            index = await client.get_model_repository_index(as_json=True, client_timeout=PROBE_TIMEOUT_S)
        except InferenceServerException as e:
            return Probe(False, True, f"no gRPC server answers ({e.message()})")
        return _model_missing(self.model, index)

    async def server_metadata(self) -> dict:
        return await self._get_client().get_server_metadata(as_json=True, client_timeout=PROBE_TIMEOUT_S)

    async def model_config(self) -> dict:
        """The model's config as Triton shows it (JSON); ServerUnavailableError or ServerError when it cannot."""
        try:
            answer = await self._get_client().get_model_config(self.model, as_json=True,
                                                               client_timeout=PROBE_TIMEOUT_S)
        except InferenceServerException as e:
            raise _error(self.endpoint, e) from None
        return answer["config"]  # gRPC's ModelConfigResponse wraps it

    async def responses(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        # Built here, not in the request iterator: grpc.aio reads that on a task of its own, where an exception
        # is lost and the stream waits for a request that never comes.
        message = {"model_name": self.model, "inputs": infer_inputs(request), "request_id": request.request_id,
                   "parameters": {"triton_enable_empty_final_response": True}}

        async def one_request():
            yield message

        call = self._get_client().stream_infer(one_request())
        loop = asyncio.get_running_loop()
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            call.cancel()

        done = False
        # One timer per request, re-armed per response: an inactivity timeout without a task per read.
        timer = loop.call_later(self.timeout_s, expire)
        try:
            while not done:
                try:
                    result, error = await call.__anext__()
                except StopAsyncIteration:
                    raise ServerError("the server closed the stream before the request's final response") from None
                except asyncio.CancelledError:
                    if timed_out:
                        raise RequestTimeoutError(
                            f"no response from {self.endpoint.url} for {self.timeout_s:g} s; the request was cancelled"
                        ) from None
                    raise
                except Exception as e:  # grpc.aio.AioRpcError: the call itself failed
                    raise _rpc_error(self.endpoint, e) from None
                timer.cancel()
                timer = loop.call_later(self.timeout_s, expire)
                if error is not None:
                    done = True
                    raise _error(self.endpoint, error)
                chunk, done = _chunk(result)
                if chunk is not None:
                    yield chunk
        finally:
            timer.cancel()
            if not done:
                call.cancel()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _rpc_error(endpoint: Endpoint, e: Exception) -> Exception:
    code = getattr(e, "code", None)
    name = code().name if callable(code) else type(e).__name__
    details = e.details() if hasattr(e, "details") else str(e)
    if name == "UNAVAILABLE":
        return ServerUnavailableError(endpoint.url, f"connection failed ({details})")
    return ServerError(f"{name}: {details}")
