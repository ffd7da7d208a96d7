"""ResponseFraming, fed byte streams as Triton writes them, split at every point: what passes, what changes."""

from __future__ import annotations

import json

import pytest

from kvtriton.backend.entrypoints.http_responses import ResponseFraming


def response(status: str, body: bytes, *headers: str) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n" + "".join(h + "\r\n" for h in headers)
            + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def fault(message: str) -> bytes:
    return response("500 Internal Server Error", json.dumps({"error": message}).encode())


def events(*payloads: bytes) -> bytes:
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads)
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunks + b"0\r\n\r\n")


PARSE_FAULT = "Unable to parse 'data': attempt to access JSON non-signed-integer as signed-integer"
# A connection's worth: a stream whose events hold what looks like framing, a parser's 500, an interim 100, a
# server fault's 500, a plain answer.
STREAM = [events(b'data: {"text_output": "0\\r\\n"}\n\n', b"data: " + b"x" * 70_000 + b"\n\n"),
          fault(PARSE_FAULT),
          b"HTTP/1.1 100 Continue\r\n\r\n" + response("200 OK", b'{"a": 1}'),
          fault("failed to reserve 64 bytes in output tensor buffer"),
          response("200 OK", b"{}")]
EXPECTED = b"".join(STREAM).replace(b"HTTP/1.1 500 Internal Server Error", b"HTTP/1.1 400 Bad Request", 1)


def relayed(pieces: list[bytes]) -> bytes:
    framing = ResponseFraming()
    return b"".join(framing.feed(p) for p in pieces)


def test_a_connection_fed_whole_passes_as_written_but_the_parse_fault():
    assert relayed([b"".join(STREAM)]) == EXPECTED


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, 1000])
def test_pieces_of_any_size_give_the_same_bytes(piece):
    """Heads, chunk-size lines and the 500's body split across reads, at every offset."""
    whole = b"".join(STREAM)
    assert relayed([whole[i:i + piece] for i in range(0, len(whole), piece)]) == EXPECTED


def test_an_event_is_sent_on_as_soon_as_it_arrives():
    framing = ResponseFraming()
    stream = events(b"data: one\n\n", b"data: two\n\n")
    first_event_end = stream.index(b"data: one\n\n") + len(b"data: one\n\n\r\n")
    assert framing.feed(stream[:first_event_end]) == stream[:first_event_end]


@pytest.mark.parametrize("message", ["failed to parse the request JSON buffer: Missing a name for object member. at 1",
                                     "attempt to get members for non-object",
                                     "Expected JSON object for keyword: 'parameters': attempt to access JSON "
                                     "non-object as object",
                                     PARSE_FAULT])
def test_each_parser_message_becomes_400(message):
    out = ResponseFraming().feed(fault(message))
    assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n") and json.loads(out.split(b"\r\n\r\n", 1)[1]) == {
        "error": message}


def test_what_is_not_http_framing_passes_unframed():
    framing = ResponseFraming()
    garbage = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nwhatever follows"
    assert framing.feed(garbage) == garbage and framing.feed(b"more") == b"more"
