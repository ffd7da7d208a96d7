"""TritonResponseSink: delivers one request's RequestOutputs through Triton's decoupled response sender.

Each response is an IPC round trip to the server made while holding the GIL
(~0.15 ms), so sends, not tokens, set the cost:
- a ResponseOutbox thread builds and sends the responses; whoever delivers
  outputs (the engine thread, or EngineProcess's receiver) only enqueues. One
  FIFO thread keeps each request's responses in order. Between sends the same
  thread polls cancellation (CancellationWatcher), so a sender is never asked
  and sent to at once;
- adaptive coalescing: while a request's previous response still waits in the
  outbox, new tokens join it rather than queueing another send. An idle server
  sends every token at once; a loaded one sends each request one response per
  outbox round;
- `stream_interval` (default 1) sets a minimum of tokens per response.
Logprobs (when asked) go out as JSON, one entry per token: {"token_id", "logprob", "top": [[id, logprob],
best first]}, plus "token" and "top_tokens" (each id's text) when the sink has `token_text`: clients without
the tokenizer (the OpenAI frontend) need the text. The ids are decoded on the outbox thread, not the engine's.
Non-streaming requests get exactly one response, with the whole text.
`put` is called from one thread at a time (the one delivering outputs).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kvtriton.backend.engine.outputs import RequestOutput

log = logging.getLogger("kvtriton")
_NOTHING = object()


class ResponseOutbox:
    """A thread that sends what the engine thread enqueues, and runs `between_sends(sent)` after each send
    (sent True) and at least every `idle_wakeup_s` when there is nothing to send (sent False); close() drains
    it and stops the thread."""

    def __init__(self, between_sends: Callable[[bool], None] = lambda sent: None, idle_wakeup_s: float = 0.1):
        self._between_sends = between_sends
        self._idle_wakeup_s = idle_wakeup_s
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kvtriton-responses", daemon=True)
        self._thread.start()

    def put(self, send, *args) -> None:
        self._queue.put((send, args))

    def is_empty(self) -> bool:
        """Nothing left to send; asked from `between_sends`, it also means no send is in progress."""
        return self._queue.empty()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._idle_wakeup_s)
            except queue.Empty:  # nothing to send: between_sends still runs on time
                item = _NOTHING
            if item is None:
                return
            if item is not _NOTHING:
                send, args = item
                try:
                    send(*args)
                except Exception:  # a client that went away must not stop the others' responses
                    log.exception("could not send a response")
            try:
                self._between_sends(item is not _NOTHING)
            except Exception:
                log.exception("response thread: between-sends work failed")


@dataclass
class _Response:
    text: list[str]
    num_input: int
    num_tokens: int
    finish_reason: str
    logprobs: list[dict]
    final: bool
    prompt_logprobs: list[dict] | None = None  # the first response of a request that asked for them
    num_cached: int = 0  # prompt tokens the prefix cache served (sent on the final response)


class TritonResponseSink:
    def __init__(self, pb_utils, sender, outbox: ResponseOutbox, stream: bool, prefix: str, stream_interval: int,
                 want_logprobs: bool, on_finished: Callable[[str], None] = lambda request_id: None,
                 token_text: Callable[[int], str] | None = None):
        self.pb_utils, self.sender, self.outbox = pb_utils, sender, outbox
        self.on_finished = on_finished  # called with the request id before its final response is enqueued
        self.stream, self.prefix = stream, prefix  # prefix: the prompt, when it is echoed (non-streaming)
        self.stream_interval = stream_interval
        self.want_logprobs = want_logprobs
        self.token_text = token_text  # token id -> its text, for the logprobs' "token" / "top_tokens"
        self._text: list[str] = []
        self._num_tokens = 0
        self._logprobs: list[dict] = []
        self._prompt_logprobs: list[dict] | None = None
        # The response enqueued but not yet taken by the outbox thread. While there is one, new tokens join
        # it instead of queueing another send: under load each request gets one send per outbox round
        # (the sends, not the tokens, set the cost), and no token waits for more than the sends ahead of it.
        self._queued: _Response | None = None
        self._lock = threading.Lock()  # _queued: put() runs on the engine's output thread, sends on the outbox's

    def put(self, out: RequestOutput) -> None:
        if out.finished:
            self.on_finished(out.request_id)
        if out.error is not None:
            self.outbox.put(self._send_error, out.error)
            return
        self._text.append(out.text)
        self._num_tokens += len(out.token_ids)
        if out.logprobs:
            self._logprobs += [_entry(lp) for lp in out.logprobs]
        if out.prompt_logprobs is not None:
            self._prompt_logprobs = [_entry(lp) for lp in out.prompt_logprobs]
        if not out.finished and (not self.stream or self._num_tokens < self.stream_interval):
            return
        text, num_tokens, logprobs = self._text, self._num_tokens, self._logprobs
        prompt_logprobs = self._prompt_logprobs
        self._text, self._num_tokens, self._logprobs, self._prompt_logprobs = [], 0, [], None
        with self._lock:
            queued = self._queued
            if queued is not None:  # the previous response is still waiting: this one rides with it
                queued.text += text
                queued.num_tokens += num_tokens
                queued.logprobs += logprobs
                queued.prompt_logprobs = queued.prompt_logprobs or prompt_logprobs
                queued.finish_reason, queued.final = out.finish_reason or "", out.finished
                queued.num_cached = out.num_cached_tokens
                return
            self._queued = _Response(text, out.num_prompt_tokens, num_tokens, out.finish_reason or "", logprobs,
                                     out.finished, prompt_logprobs, out.num_cached_tokens)
        self.outbox.put(self._send_queued)

    def _send_queued(self) -> None:
        """On the outbox thread: the queued response, with whatever joined it meanwhile."""
        with self._lock:
            r, self._queued = self._queued, None
        text = "".join(r.text)
        if not self.stream:
            text = self.prefix + text
        prompt_logprobs = "" if r.prompt_logprobs is None else json.dumps(self._with_token_text(r.prompt_logprobs))
        self._send(text, r.num_input, r.num_tokens, r.finish_reason,
                   json.dumps(self._with_token_text(r.logprobs)) if self.want_logprobs else "", r.final,
                   prompt_logprobs, r.num_cached)

    def _with_token_text(self, logprobs: list[dict]) -> list[dict]:
        if self.token_text is None:
            return logprobs
        return [{**e, "token": self.token_text(e["token_id"]), "top_tokens": [self.token_text(i) for i, _ in e["top"]]}
                for e in logprobs]

    def _send(self, text: str, num_input: int, num_output: int, finish_reason: str, logprobs: str,
              final: bool, prompt_logprobs: str = "", num_cached: int = 0) -> None:
        """On the outbox thread."""
        pb = self.pb_utils
        tensors = [
            pb.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb.Tensor("num_input_tokens", np.array([num_input], dtype=np.uint32)),
            pb.Tensor("num_output_tokens", np.array([num_output], dtype=np.uint32)),
            pb.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)),
            pb.Tensor("logprobs", np.array([logprobs.encode()], dtype=np.object_)),
        ]
        if prompt_logprobs:  # the first response only, of the requests that ask: the others carry nothing more
            tensors.append(pb.Tensor("prompt_logprobs", np.array([prompt_logprobs.encode()], dtype=np.object_)))
        if final:  # with the usage's last figures (OpenAI's prompt_tokens_details.cached_tokens)
            tensors.append(pb.Tensor("num_cached_tokens", np.array([num_cached], dtype=np.uint32)))
        self.sender.send(pb.InferenceResponse(output_tensors=tensors),
                         flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0)

    def _send_error(self, message: str) -> None:
        pb = self.pb_utils
        self.sender.send(pb.InferenceResponse(error=pb.TritonError(message)),
                         flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _entry(lp) -> dict:
    """One TokenLogprob as the logprobs outputs' JSON carries it ("rank": a prompt token's, after its first)."""
    entry = {"token_id": lp.token_id, "logprob": lp.logprob, "top": lp.top}
    if lp.rank is not None:
        entry["rank"] = lp.rank
    return entry
