"""ResponseFraming: Triton's HTTP responses on one connection, framed as they stream through the guard.

The guard (http_guard.py) relays each upstream read at once, so server-sent events stay incremental and a
burst of events costs one write. To change one kind of response it must still know where each response
starts: this reads every response's head for its framing (Content-Length, chunked, or none: until Triton
closes) and walks chunked bodies chunk by chunk, without copying or parsing what they carry. Sans I/O:
`feed` takes bytes as they arrive and returns the bytes to send on.

What it changes: Triton 2.51 answers a request whose JSON it cannot convert (a malformed body, an input or
`parameters` of the wrong JSON type) with 500, as an internal error (upstream issue #8762), which
monitoring counts as a server fault. Such a 500, whose message is one of the parser's (`CLIENT_FAULTS`),
is sent on as 400 with its body unchanged. Every other response passes as Triton wrote it.
"""

from __future__ import annotations

import json

# How Triton 2.51's HTTP frontend words a request it cannot convert: RapidJSON's parse failure, and
# TritonJson's type checks, alone or wrapped ("Unable to parse 'data': ...", "Expected JSON object for
# keyword: 'parameters': ..."). Seen: `{`, `[]`, `"max_tokens": "x"`, `"text_input": 5`, `"parameters": null`,
# a lone surrogate escape.
CLIENT_FAULTS = (b"failed to parse the request JSON buffer", b"Unable to parse ", b"attempt to ",
                 b"Expected JSON object for keyword")
FAULT_BODY_MAX = 4096  # a parser's message is short; a longer 500 passes through unread
MAX_HEAD_BYTES = 64 * 1024  # Triton's heads are ~100 bytes; past this, the rest passes unframed

_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _TRAILER, _FAULT, _UNTIL_CLOSE = range(7)


class ResponseFraming:
    """feed(bytes) -> bytes to send on. Every response has the body its head announces: Triton serves no HEAD
    requests (the guard refuses them), the one method whose answer announces a body it does not have."""

    def __init__(self):
        self.state, self.remaining = _HEAD, 0
        self.pending = bytearray()  # an unfinished head, chunk-size line or trailer; or a 500's body so far
        self.head = b""  # the head of the 500 being read

    def feed(self, data: bytes) -> bytes:
        out, view, at = bytearray(), memoryview(data), 0
        while at < len(data):
            if self.state in (_BODY, _CHUNK_DATA):  # the bulk of the bytes: passed on, not looked at
                take = min(self.remaining, len(data) - at)
                out += view[at:at + take]
                at += take
                self.remaining -= take
                if not self.remaining:
                    self.state = _HEAD if self.state == _BODY else _CHUNK_SIZE
            elif self.state == _UNTIL_CLOSE:
                out += view[at:]
                break
            elif self.state == _FAULT:
                take = min(self.remaining, len(data) - at)
                self.pending += view[at:at + take]
                at += take
                self.remaining -= take
                if not self.remaining:
                    out += _as_client_fault(self.head, bytes(self.pending)) + self.pending
                    self.pending.clear()
                    self.state = _HEAD
            else:  # a line-delimited part (a head, a chunk-size line, a trailer): up to its end
                end = b"\r\n\r\n" if self.state == _HEAD else b"\r\n"
                if not self.pending:  # the usual case: the part lies whole in this read
                    found = data.find(end, at)
                    if found >= 0:
                        part, at = data[at:found + len(end)], found + len(end)
                        out += self._line_part(part)
                        continue
                # split across reads: gathered (once a read at most, so the copies stay linear)
                held = len(self.pending)
                self.pending += view[at:]
                found = self.pending.find(end, max(0, held - len(end) + 1))
                if found < 0:
                    if len(self.pending) > MAX_HEAD_BYTES:  # not HTTP framing as expected: stop framing
                        out += self.pending
                        self.pending.clear()
                        self.state = _UNTIL_CLOSE
                    break
                part = bytes(self.pending[:found + len(end)])
                at += len(part) - held
                self.pending.clear()
                out += self._line_part(part)
        return bytes(out)

    def _line_part(self, part: bytes) -> bytes:
        """Take a whole head, chunk-size line or trailer line; return what to send of it now."""
        if self.state == _HEAD:
            return self._head(part)
        if self.state == _TRAILER:
            if part == b"\r\n":
                self.state = _HEAD
            return part
        try:
            size = int(part.split(b";", 1)[0].strip(), 16)
        except ValueError:  # not chunked framing after all
            self.state = _UNTIL_CLOSE
            return part
        self.state, self.remaining = (_CHUNK_DATA, size + 2) if size else (_TRAILER, 0)  # + the chunk's CRLF
        return part

    def _head(self, head: bytes) -> bytes:
        status, length, chunked = _framing(head)
        if 100 <= status < 200:  # interim (100 Continue): the final response follows
            return head
        if status in (204, 304) or length == 0:
            return head
        if status == 500 and length is not None and length <= FAULT_BODY_MAX:
            self.state, self.remaining, self.head = _FAULT, length, head
            return b""
        if chunked:
            self.state = _CHUNK_SIZE
        elif length is not None:
            self.state, self.remaining = _BODY, length
        else:
            self.state = _UNTIL_CLOSE
        return head


def _framing(head: bytes) -> tuple[int, int | None, bool]:
    """(status, Content-Length or None, chunked?) of a response head."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    length, chunked = None, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key, value = name.strip().lower(), value.strip()
        if key == b"content-length" and value.isdigit():
            length = int(value)
        elif key == b"transfer-encoding" and value.lower() == b"chunked":
            chunked = True
    return status, (None if chunked else length), chunked


def _as_client_fault(head: bytes, body: bytes) -> bytes:
    """A 500's head, as 400 where its body is Triton's {"error": ...} for JSON it could not convert."""
    try:
        message = json.loads(body).get("error", "").encode()
    except (ValueError, AttributeError):
        return head
    if not message.startswith(CLIENT_FAULTS):
        return head
    return b"HTTP/1.1 400 Bad Request" + head[head.index(b"\r\n"):]
