"""HTTP transport: Triton's generate extension, sync (http.client) and asyncio (aiohttp).

`POST /v2/models/<m>/generate` returns one JSON object; `.../generate_stream`
returns server-sent events, one `data: {...}` per response. An error is a
`{"error": "..."}` object, as the body or as an event. Closing the connection
before the last event cancels the request on the server.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
from typing import Any, AsyncIterator, Iterator

import aiohttp

from kvtriton.client.endpoint import Endpoint
from kvtriton.client.errors import RequestTimeoutError, ServerError, ServerUnavailableError, server_error
from kvtriton.client.probe import PROBE_TIMEOUT_S, READY, Probe
from kvtriton.client.types import Chunk, GenerateRequest

_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def _path(model: str, stream: bool) -> str:
    return f"/v2/models/{model}/{'generate_stream' if stream else 'generate'}"


def _chunk(endpoint: Endpoint, event: Any) -> Chunk:
    if not isinstance(event, dict):
        raise ServerError(f"{endpoint.url} sent {event!r}, not a JSON object")
    if "error" in event:
        raise server_error(str(event["error"]))
    ids = event.get("token_ids")
    if ids is not None and not isinstance(ids, list):  # the generate extension gives a one-element tensor as a scalar
        ids = [ids]
    try:
        return Chunk.from_outputs(event.get("text_output", ""), event["num_input_tokens"], event["num_output_tokens"],
                                  event["finish_reason"], event.get("logprobs", ""),
                                  event.get("prompt_logprobs", ""), ids, event.get("max_model_len", 0),
                                  event.get("num_cached_tokens", 0))
    except KeyError as e:
        raise ServerError(f"{endpoint.url} sent a response without {e.args[0]}: is this kvtriton's llm model?"
                          ) from None


def _sse_data(line: bytes) -> Any | None:
    """The JSON of a `data:` line; None for blank lines, comments and other fields."""
    if not line.startswith(b"data:"):
        return None
    return json.loads(line[5:])


def _error_body(endpoint: Endpoint, status: int, body: bytes) -> Exception:
    text = body.decode("utf-8", "replace").strip()
    for candidate in (text, text.removeprefix("data:").strip()):
        try:
            message = json.loads(candidate)["error"]
            break
        except (ValueError, KeyError, TypeError):
            continue
    else:
        message = f"HTTP {status}: {text[:500]}"
    if status == 404 and "unknown model" not in message.lower():
        return ServerError(f"{message} (is {endpoint.url} a Triton server with the generate extension?)")
    return server_error(message)


def _model_missing(model: str, index: list) -> Probe:
    ready = [m["name"] for m in index if m.get("state") == "READY"]
    return Probe(False, False, f"the server has no ready model {model!r} (ready: {', '.join(ready) or 'none'}); "
                               "pass the right model name")


class HttpTransport:
    """Blocking; one connection per request, so closing it is the cancellation."""

    def __init__(self, endpoint: Endpoint, model: str, timeout_s: float):
        self.endpoint, self.model, self.timeout_s = endpoint, model, timeout_s

    def _connect(self, timeout_s: float) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.endpoint.host, self.endpoint.port, timeout=timeout_s)

    def _get(self, path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, bytes]:
        conn = self._connect(PROBE_TIMEOUT_S)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def probe(self) -> Probe:
        try:
            status, _ = self._get("/v2/health/ready")
            if status != 200:
                return Probe(False, True, f"server is up but not ready (HTTP {status}; models still loading?)")
            status, _ = self._get(f"/v2/models/{self.model}/ready")
            if status == 200:
                return READY
            _, index = self._get("/v2/repository/index", "POST", b"{}")
        except (OSError, http.client.HTTPException) as e:
            return Probe(False, True, f"no HTTP server answers ({e})")
        return _model_missing(self.model, json.loads(index))

    def responses(self, request: GenerateRequest) -> Iterator[Chunk]:
        conn = self._connect(self.timeout_s)
        try:
            try:
                conn.request("POST", _path(self.model, request.stream), body=json.dumps(request.inputs()).encode(),
                             headers=_HEADERS)
                response = conn.getresponse()
                if response.status != 200:
                    raise _error_body(self.endpoint, response.status, response.read())
                if not request.stream:
                    yield _chunk(self.endpoint, json.loads(response.read()))
                    return
                while line := response.readline():
                    event = _sse_data(line)
                    if event is not None:
                        yield _chunk(self.endpoint, event)
            except socket.timeout:
                raise RequestTimeoutError(
                    f"no response from {self.endpoint.url} for {self.timeout_s:g} s; the request was cancelled"
                ) from None
            except (ConnectionError, http.client.HTTPException) as e:
                raise ServerUnavailableError(self.endpoint.url, f"connection failed ({e})") from None
        finally:
            conn.close()  # before the last event: the server sees the disconnect and cancels

    def close(self) -> None:
        pass


class AsyncHttpTransport:
    """asyncio over one aiohttp session (pooled keep-alive connections, no connection cap)."""

    def __init__(self, endpoint: Endpoint, model: str, timeout_s: float):
        self.endpoint, self.model, self.timeout_s = endpoint, model, timeout_s
        self.base = f"http://{endpoint.address}"
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # sock_read: the longest silence between two responses, as for gRPC.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=PROBE_TIMEOUT_S, sock_read=self.timeout_s))
        return self._session

    async def probe(self) -> Probe:
        session = self._get_session()
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        try:
            async with session.get(f"{self.base}/v2/health/ready", timeout=timeout) as r:
                if r.status != 200:
                    return Probe(False, True, f"server is up but not ready (HTTP {r.status}; models still loading?)")
            async with session.get(f"{self.base}/v2/models/{self.model}/ready", timeout=timeout) as r:
                if r.status == 200:
                    return READY
            async with session.post(f"{self.base}/v2/repository/index", data=b"{}", timeout=timeout) as r:
                index = json.loads(await r.read())
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return Probe(False, True, f"no HTTP server answers ({e or type(e).__name__})")
        return _model_missing(self.model, index)

    async def server_metadata(self) -> dict:
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        async with self._get_session().get(f"{self.base}/v2", timeout=timeout) as r:
            return json.loads(await r.read())

    async def model_config(self) -> dict:
        """The model's config as Triton shows it (JSON); ServerUnavailableError or ServerError when it cannot."""
        timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
        try:
            async with self._get_session().get(f"{self.base}/v2/models/{self.model}/config", timeout=timeout) as r:
                status, body = r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise ServerUnavailableError(self.endpoint.url, f"connection failed ({e or type(e).__name__})") from None
        if status != 200:
            raise _error_body(self.endpoint, status, body)
        return json.loads(body)

    async def responses(self, request: GenerateRequest) -> AsyncIterator[Chunk]:
        session = self._get_session()
        response = None
        complete = False
        try:
            try:
                response = await session.post(f"{self.base}{_path(self.model, request.stream)}",
                                              data=json.dumps(request.inputs()).encode(), headers=_HEADERS)
                if response.status != 200:
                    raise _error_body(self.endpoint, response.status, await response.read())
                if not request.stream:
                    chunk = _chunk(self.endpoint, json.loads(await response.read()))
                    complete = True
                    yield chunk
                    return
                async for line in response.content:
                    event = _sse_data(line)
                    if event is not None:
                        yield _chunk(self.endpoint, event)
                complete = True
            except asyncio.TimeoutError:  # aiohttp's ServerTimeoutError is one
                raise RequestTimeoutError(
                    f"no response from {self.endpoint.url} for {self.timeout_s:g} s; the request was cancelled"
                ) from None
            except aiohttp.ClientConnectionError as e:
                raise ServerUnavailableError(self.endpoint.url, f"connection failed ({e})") from None
        finally:
            if response is not None:
                # Read to the end: the connection returns to the pool. Otherwise closing it
                # is what tells the server to cancel the request.
                response.release() if complete else response.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
