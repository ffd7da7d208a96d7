"""HttpGuard: the public HTTP port, a filtering relay to tritonserver's HTTP endpoint on loopback.

Why: Triton 2.51's HTTP server (libevhtp) parses the body of an
`application/x-www-form-urlencoded` request (curl's default content type) as URL query arguments, into
two variable-length arrays on the stack, each as long as the body (evhtp_parse_query_wflags). A body
longer than half a thread's stack (8 MB by default, so 4 MB) overflows it: the whole server dies with
SIGSEGV, before any model or authentication sees the request. Triton 2.51 has no option that bounds
HTTP bodies (--http-max-input-size came later) and cannot be told not to parse them. So the guard:

- replaces that content type by application/json: Triton reads every inference body as JSON (or
  binary tensors, announced by their own header) whatever the content type says, so nothing a client
  can send changes meaning, and evhtp never parses a body as a query;
- refuses a body over `max_body_bytes` (413) and a request head over MAX_HEAD_BYTES (431) before they
  reach Triton, request framing that could be read two ways (400), and HEAD (405, as Triton answers it);
- answers 503 while tritonserver is down (kvtriton serve restarts it);
- answers 400, not 500, where Triton could not convert the request's JSON (http_responses.py: Triton
  reports those as internal errors, upstream issue #8762); every other response passes as Triton wrote it.

Responses are relayed as they come, a read at a time (http_responses.py reads only their framing): each
client connection gets its own upstream connection, so responses come back in order, server-sent events
stay incremental, and a client that disconnects closes its upstream connection, which Triton sees as the
client going away (cancellation).

One asyncio loop on one thread serves every connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading

from kvtriton.backend.entrypoints.http_responses import ResponseFraming

log = logging.getLogger("kvtriton.serve")

MAX_HEAD_BYTES = 64 * 1024  # request line + headers; Triton's clients send well under 1 KB
# After refusing a request, what the client still sends is read and dropped for up to this long, so that
# closing does not reset the connection before the client has read the refusal.
LINGER_S = 2.0
_PIECE = 64 * 1024
_FORM = b"application/x-www-form-urlencoded"
_REASONS = {400: "Bad Request", 405: "Method Not Allowed", 413: "Content Too Large",
            431: "Request Header Fields Too Large", 501: "Not Implemented", 503: "Service Unavailable"}


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class HttpGuard:
    """Listens on (host, port) and relays to (upstream_host, upstream_port); start() binds, stop() closes."""

    def __init__(self, host: str, port: int, upstream_port: int, max_body_bytes: int,
                 upstream_host: str = "127.0.0.1"):
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
        self.host, self.port = host, port
        self.upstream_host, self.upstream_port = upstream_host, upstream_port
        self.max_body_bytes = max_body_bytes
        self.num_refused = 0  # requests answered by the guard itself (413, 431, 400, 503)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve on a thread of its own; raises OSError if the port cannot be bound."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._serve_client, self.host, self.port, limit=MAX_HEAD_BYTES, reuse_address=True))
            except BaseException as exc:  # noqa: BLE001 - reported to start()'s caller
                failure.append(exc)
                started.set()
                loop.close()
                return
            started.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="kvtriton-http-guard", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return

        async def close() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=2) if tasks else None
            loop.stop()

        asyncio.run_coroutine_threadsafe(close(), loop)
        thread.join(timeout=5)

    # ---- one client connection ---------------------------------------------------------------
    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            await self._refuse(reader, writer, 503, "the inference server is not up (restarting?); retry shortly")
            return
        responses = asyncio.create_task(self._relay_responses(up_reader, writer))
        try:
            await self._forward_requests(reader, up_writer)
            if up_writer.can_write_eof():
                up_writer.write_eof()  # the client closed its side: Triton sees it go, as without the guard
            await responses
        except _Refused as refused:
            responses.cancel()
            await self._refuse(reader, writer, refused.status, refused.message)
        except (ConnectionError, asyncio.IncompleteReadError):
            responses.cancel()
        except asyncio.CancelledError:
            responses.cancel()
            raise
        finally:
            up_writer.close()
            writer.close()

    async def _forward_requests(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> None:
        """Relay requests until the client closes its side; raise _Refused for one that must not pass."""
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    raise _Refused(400, "incomplete request head") from None
                return
            except asyncio.LimitOverrunError:
                raise _Refused(431, f"request line and headers exceed {MAX_HEAD_BYTES} bytes") from None
            head, length, chunked = self._inspect(head)
            upstream.write(head)
            if chunked:
                await self._relay_chunked(reader, upstream)
            else:
                await self._relay_exactly(reader, upstream, length)
            await upstream.drain()

    def _inspect(self, head: bytes) -> tuple[bytes, int, bool]:
        """(the head to send, Content-Length, chunked?): the form content type replaced; framing checked."""
        lines = head[:-4].split(b"\r\n")
        if lines[0].startswith(b"HEAD "):  # Triton answers HEAD with 405 and a body, which breaks the framing
            raise _Refused(405, "HEAD is not served; use GET")
        lengths, encodings, out = set(), [], [lines[0]]
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise _Refused(400, "malformed header line")
            key, value = name.strip().lower(), value.strip()
            if key == b"content-length":
                lengths.add(value)
            elif key == b"transfer-encoding":
                encodings.append(value.lower())
            elif key == b"content-type" and value.lower().startswith(_FORM):
                line = b"Content-Type: application/json"
            out.append(line)
        if encodings and lengths:
            raise _Refused(400, "a request may not have both Content-Length and Transfer-Encoding")
        if encodings:
            if encodings != [b"chunked"]:
                raise _Refused(501, "only Transfer-Encoding: chunked is supported")
            return b"\r\n".join(out) + b"\r\n\r\n", 0, True
        if len(lengths) > 1:
            raise _Refused(400, "conflicting Content-Length headers")
        raw = lengths.pop() if lengths else b"0"
        if not raw.isdigit():
            raise _Refused(400, "Content-Length must be a number")
        length = int(raw)
        if length > self.max_body_bytes:
            raise _Refused(413, f"request body is {length} bytes; at most {self.max_body_bytes} are allowed")
        return b"\r\n".join(out) + b"\r\n\r\n", length, False

    async def _relay_exactly(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter, n: int) -> None:
        while n:
            data = await reader.read(min(n, _PIECE))
            if not data:
                raise asyncio.IncompleteReadError(b"", n)
            upstream.write(data)
            await upstream.drain()
            n -= len(data)

    async def _relay_chunked(self, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter) -> None:
        total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _Refused(400, "malformed chunk size") from None
            total += size
            if total > self.max_body_bytes:
                raise _Refused(413, f"request body exceeds {self.max_body_bytes} bytes")
            upstream.write(line)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    upstream.write(trailer)
                upstream.write(b"\r\n")
                return
            await self._relay_exactly(reader, upstream, size)
            if await reader.readexactly(2) != b"\r\n":
                raise _Refused(400, "malformed chunk")
            upstream.write(b"\r\n")

    @staticmethod
    async def _relay_responses(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Upstream responses to the client, a read at a time as they come (ResponseFraming's changes made);
        closes the client once Triton has closed (not when cancelled: the guard then still answers the client
        itself)."""
        framing = ResponseFraming()
        try:
            while data := await src.read(_PIECE):
                if out := framing.feed(data):
                    dst.write(out)
                    await dst.drain()
        except ConnectionError:
            pass
        dst.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
                      message: str) -> None:
        """Triton's error shape ({"error": ...}), then the connection is closed: its framing is not trusted."""
        self.num_refused += 1
        body = json.dumps({"error": message}).encode()
        writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        try:
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(_discard(reader), LINGER_S)
        except (ConnectionError, asyncio.TimeoutError):
            pass
        writer.close()


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(_PIECE):
        pass
