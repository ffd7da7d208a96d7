"""HttpGuard against a stand-in upstream (no tritonserver): what it changes in requests, what it refuses, and
that responses pass through as they come."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvtriton.backend.entrypoints.http_guard import MAX_HEAD_BYTES, HttpGuard
from kvtriton.backend.entrypoints.tritonserver import free_ports


class Upstream(BaseHTTPRequestHandler):
    """Answers every POST with what it received: the headers and the body (chunked bodies decoded).
    POST /slow answers in two pieces, 0.5 s apart. Records the connections that closed."""

    protocol_version = "HTTP/1.1"
    closed: list[float] = []

    def do_POST(self):
        if self.headers.get("Transfer-Encoding") == "chunked":
            body = b""
            while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):
                pass
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/fault/"):  # Triton's way with an error: 500 and {"error": message}
            self._answer(500, json.dumps({"error": self.path[len("/fault/"):].replace("_", " ")}).encode())
            return
        if self.path == "/events":  # server-sent events as Triton streams them: a chunk each, 0.3 s apart
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for event in (b"data: one\n\n", b"data: two\n\n"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                self.wfile.flush()
                time.sleep(0.3)
            self.wfile.write(b"0\r\n\r\n")
            return
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"first")
            self.wfile.flush()
            time.sleep(0.5)
            self.wfile.write(b"later")
            return
        self._answer(200, json.dumps({"headers": dict(self.headers), "body_length": len(body),
                                      "body_start": body[:20].decode(errors="replace")}).encode())

    def _answer(self, status: int, body: bytes):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def finish(self):
        super().finish()
        Upstream.closed.append(time.monotonic())

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def guard():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = free_ports(1)[0]
    g = HttpGuard("127.0.0.1", port, upstream.server_address[1], max_body_bytes=1_000_000)
    g.start()
    yield g
    g.stop()
    upstream.shutdown()


def request(guard, method="POST", path="/v2/models/m/generate", body=b"", headers=None, conn=None):
    conn = conn or http.client.HTTPConnection("127.0.0.1", guard.port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    raw = response.read()
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = raw
    return response.status, payload


def test_a_form_content_type_reaches_triton_as_json_with_the_body_intact(guard):
    body = b'{"text_input": "' + b"x" * 500_000 + b'"}'
    status, seen = request(guard, body=body, headers={"Content-Type": "application/x-www-form-urlencoded",
                                                      "X-Other": "kept"})
    assert status == 200
    assert seen["headers"]["Content-Type"] == "application/json" and seen["headers"]["X-Other"] == "kept"
    assert seen["body_length"] == len(body) and seen["body_start"] == '{"text_input": "xxxx'
    status, seen = request(guard, body=b"{}", headers={"Content-Type": "application/json"})
    assert seen["headers"]["Content-Type"] == "application/json"


def test_requests_on_one_connection_are_all_relayed(guard):
    conn = http.client.HTTPConnection("127.0.0.1", guard.port, timeout=10)
    lengths = [request(guard, body=b"a" * n, conn=conn)[1]["body_length"] for n in (1, 1000, 0, 70_000)]
    assert lengths == [1, 1000, 0, 70_000]
    conn.close()


def test_a_chunked_body_is_relayed_and_counted_against_the_limit(guard):
    def chunks(n, size):
        for _ in range(n):
            yield b"c" * size
    conn = http.client.HTTPConnection("127.0.0.1", guard.port, timeout=10)
    conn.request("POST", "/x", body=chunks(3, 1000), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked", "Content-Type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    seen = json.loads(response.read())
    assert response.status == 200 and seen["body_length"] == 3000
    assert seen["headers"]["Content-Type"] == "application/json"
    conn.request("POST", "/x", body=chunks(20, 100_000), encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
    response = conn.getresponse()
    assert response.status == 413 and "exceeds 1000000 bytes" in json.loads(response.read())["error"]


@pytest.mark.parametrize("headers, status, message", [
    ({"Content-Length": "2000000"}, 413, "request body is 2000000 bytes; at most 1000000"),
    ({"Content-Length": "5", "Transfer-Encoding": "chunked"}, 400, "both Content-Length and Transfer-Encoding"),
    ({"Transfer-Encoding": "gzip"}, 501, "only Transfer-Encoding: chunked"),
    ({"Content-Length": "-1"}, 400, "Content-Length must be a number"),
    ({"X-Big": "y" * MAX_HEAD_BYTES}, 431, "request line and headers exceed"),
])
def test_framing_that_must_not_pass_is_refused_before_triton(guard, headers, status, message):
    refused_before = guard.num_refused
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", guard.port), timeout=10) as s:
        s.sendall(f"POST /v2/models/m/generate HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode())
        if status == 413:
            s.sendall(b"z" * 1_500_000)  # the client goes on sending; it still reads the refusal
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head_line, _, body = answer.partition(b"\r\n")
    assert head_line.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert message in json.loads(body.split(b"\r\n\r\n", 1)[1])["error"]
    assert guard.num_refused == refused_before + 1


def test_responses_stream_through_as_they_come(guard):
    with socket.create_connection(("127.0.0.1", guard.port), timeout=10) as s:
        s.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        started = time.monotonic()
        first = b""
        while b"first" not in first:
            first += s.recv(65536)
        assert time.monotonic() - started < 0.4  # before the upstream wrote the rest
        rest = s.recv(65536)
        assert rest == b"later"


def test_a_client_that_goes_away_closes_its_upstream_connection(guard):
    closed_before = len(Upstream.closed)
    with socket.create_connection(("127.0.0.1", guard.port), timeout=10) as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        s.recv(65536)
    deadline = time.monotonic() + 5
    while len(Upstream.closed) == closed_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(Upstream.closed) > closed_before


def test_with_triton_down_the_guard_answers_503():
    port, nothing_there = free_ports(2)
    g = HttpGuard("127.0.0.1", port, nothing_there, max_body_bytes=1000)
    g.start()
    try:
        status, body = request(g, body=b"{}")
        assert status == 503 and "not up" in body["error"]
        with pytest.raises(OSError):  # the port is taken: a second guard cannot bind it
            HttpGuard("127.0.0.1", port, nothing_there, max_body_bytes=1000).start()
    finally:
        g.stop()


@pytest.mark.parametrize("message, status", [
    ("failed to parse the request JSON buffer: Missing a name for object member. at 1", 400),  # `{`
    ("attempt to get members for non-object", 400),  # `[]`
    ("Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer", 400),  # "max_tokens": "x"
    ("Expected JSON object for keyword: 'parameters': attempt to access JSON non-object as object", 400),
    ("failed to reserve 64 bytes in output tensor buffer", 500),  # a fault of the server's: as Triton said it
])
def test_a_500_for_json_triton_could_not_convert_reaches_the_client_as_400(guard, message, status):
    """Triton 2.51 answers a body it cannot convert with 500 (upstream issue #8762); the guard says 400, the body
    as Triton wrote it; any other 500 passes as it is."""
    got, body = request(guard, path="/fault/" + message.replace(" ", "_"), body=b"{}")
    assert (got, body) == (status, {"error": message})


def test_each_response_is_framed_on_a_connection_of_many(guard):
    """A streamed chunked response, a 500 made 400, then a plain one, on one connection: each arrives whole and
    in order, the events as they come."""
    conn = http.client.HTTPConnection("127.0.0.1", guard.port, timeout=10)
    conn.request("POST", "/events", body=b"{}")
    events = conn.getresponse()
    started = time.monotonic()
    assert events.readline() == b"data: one\n" and time.monotonic() - started < 0.25  # before the second exists
    assert events.read() == b"\ndata: two\n\n"
    assert request(guard, path="/fault/attempt_to_get_members_for_non-object", body=b"[]", conn=conn)[0] == 400
    assert request(guard, body=b"abc", conn=conn)[1]["body_length"] == 3
    conn.close()


def test_a_client_expecting_100_continue_gets_it_then_the_answer(guard):
    """curl sends `Expect: 100-continue` before a body over 1 MB: the interim response passes, then the final one."""
    with socket.create_connection(("127.0.0.1", guard.port), timeout=10) as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n")
        s.sendall(b"abc")
        answer = b""
        while not answer.endswith(b"}"):
            answer += s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ") and b'"body_length": 3' in answer


def test_head_is_refused_as_triton_refuses_it(guard):
    """Triton answers HEAD with 405 and a body its head says nothing of; the guard answers it the same way
    itself, so every response it relays has the body its head announces."""
    conn = http.client.HTTPConnection("127.0.0.1", guard.port, timeout=10)
    conn.request("HEAD", "/v2/health/ready")
    assert conn.getresponse().status == 405
