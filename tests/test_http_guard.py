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
        if self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"first")
            self.wfile.flush()
            time.sleep(0.5)
            self.wfile.write(b"later")
            return
        answer = json.dumps({"headers": dict(self.headers), "body_length": len(body),
                             "body_start": body[:20].decode(errors="replace")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

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
