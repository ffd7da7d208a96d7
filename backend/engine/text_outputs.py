"""TextOutputs: in the process that holds an engine process (EngineProcess), each request's sink and text.

The engine process sends each step's tokens without their text (token_output_processor.py has the rows'
format); here each request's RequestText turns them into the text deltas its sink receives, as vLLM V1's
frontend process detokenizes what its EngineCore sends. A request with stop strings is the exception: the
engine process made its text, which arrives with the outputs.

Threads: `add` runs on the callers' threads, `deliver` and `fail_all` on the one thread that reads the engine
process. Invariant: a request is here from `add` until the output that finishes it is delivered (or the
engine process is lost), so its sink gets exactly one finished output.
"""

from __future__ import annotations

import logging
import threading

from kvtriton.backend.engine.outputs import OutputSink, RequestOutput
from kvtriton.backend.engine.request_state import RequestText
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.sequence import stop_token_ids
from kvtriton.backend.engine.token_output_processor import engine_makes_text
from kvtriton.backend.engine.tokenizer import Tokenizer

log = logging.getLogger("kvtriton")


class _Request:
    __slots__ = ("sink", "text", "last", "num_output_tokens")

    def __init__(self, sink: OutputSink, text: RequestText | None):
        self.sink, self.text = sink, text  # text None: the engine process makes it (stop strings)
        self.last: RequestOutput | None = None  # the last output that came whole: a plain token's other fields
        self.num_output_tokens = 0

    def plain_token(self, request_id: str, token_id: int, now: float) -> RequestOutput:
        """A decode token that neither starts nor ends the request, has no logprobs, and comes with no text."""
        last = self.last
        self.num_output_tokens += 1
        # Positional, in RequestOutput's field order (request_state.py's _output says why).
        return RequestOutput(
            request_id, [token_id], self.text.feed(token_id, None)[0], False, None,
            last.num_prompt_tokens, self.num_output_tokens, last.num_cached_tokens,
            None, None,  # logprobs, error
            last.num_spec_proposed_tokens, last.num_spec_accepted_tokens,
            last.arrival_time, last.first_token_time, now,
        )

    def whole(self, out: RequestOutput) -> RequestOutput:
        """An output that came with every field but its text (unless the engine process made it)."""
        if self.text is not None and out.token_ids:
            # The scheduler's finish reason belongs to the last token (a verify step's run ends where it finished).
            end = len(out.token_ids) - 1
            out.text = "".join([self.text.feed(t, out.finish_reason if i == end else None)[0]
                                for i, t in enumerate(out.token_ids)])
        self.last, self.num_output_tokens = out, out.num_output_tokens
        return out


class TextOutputs:
    def __init__(self, tokenizer: Tokenizer, eos_token_ids: frozenset[int]):
        self.tokenizer, self.eos_token_ids = tokenizer, eos_token_ids
        self._requests: dict[str, _Request] = {}
        self._lock = threading.Lock()  # add (callers' threads) against deliver's pops

    def __len__(self) -> int:
        return len(self._requests)

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams, sink: OutputSink) -> None:
        text = None if engine_makes_text(params) else RequestText(self.tokenizer, prompt_ids, params,
                                                                  stop_token_ids(params, self.eos_token_ids))
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._requests[request_id] = _Request(sink, text)

    def deliver(self, rows: list, metrics=None) -> list[str]:
        """One step's rows from the engine process into the sinks. Returns the ids of requests whose text failed
        here: each has got its error, and the engine process must abort it."""
        requests, failed, now = self._requests, [], 0.0
        for row in rows:
            if row.__class__ is float:  # the time of the tokens that follow
                now = row
                continue
            request_id = row[0]
            request = requests.get(request_id)
            if request is None:  # failed here, or a late row of a finished request
                continue
            try:
                out = request.plain_token(request_id, row[1], now) if len(row) == 2 else request.whole(
                    RequestOutput(*row))
            except Exception:  # one request's failure (detokenizing, say) ends that request only
                log.exception("request %s failed", request_id)
                failed.append(request_id)
                out = RequestOutput(request_id, [], "", finished=True, finish_reason="error",
                                    error=f"internal error (request {request_id})")
            if out.finished:
                with self._lock:
                    requests.pop(request_id, None)
            _put(request.sink, out, metrics)
        return failed

    def fail_all(self, error: str, metrics=None) -> None:
        """The engine process is gone: every request here ends with `error`."""
        with self._lock:
            requests, self._requests = self._requests, {}
        for request_id, request in requests.items():
            _put(request.sink, RequestOutput(request_id, [], "", finished=True, finish_reason="error",
                                             error=f"internal error (request {request_id}): {error}"), metrics)


def _put(sink: OutputSink, out: RequestOutput, metrics) -> None:
    try:
        sink.put(out)
    except Exception:  # a broken client connection must not stop the others' outputs
        log.exception("could not deliver output of request %s", out.request_id)
    if metrics is not None:
        metrics.observe_output(out)
