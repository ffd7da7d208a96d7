"""OutputProcessor: the engine's requests in flight, each one's RequestState, its outputs and its end
(vLLM v1's OutputProcessor).

Only the engine thread calls it (llm_engine.py's threading contract): the inbox hands it new requests and
aborts, the steps hand it the tokens the scheduler has taken. Invariant: a request's RequestState is in
`states` while its stream is open, and leaves it once, with the finished output that closes the stream
(or, once the engine has failed, with its error).
"""

from __future__ import annotations

import logging
import time

from kvtriton.backend.engine.outputs import OutputSink, RequestOutput, TokenLogprob, merge_outputs
from kvtriton.backend.engine.request_state import RequestState
from kvtriton.backend.engine.scheduler import Scheduler, SchedulerOutput
from kvtriton.backend.engine.sequence import Sequence, SequenceStatus
from kvtriton.backend.engine.tokenizer import Tokenizer

log = logging.getLogger("kvtriton")


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer, metrics=None):
        self.scheduler, self.tokenizer = scheduler, tokenizer
        self.metrics = metrics  # optional: observe_output(RequestOutput)
        self.states: dict[str, RequestState] = {}

    # ---- requests in and out -------------------------------------------------------------------
    def add(self, seq: Sequence, sink: OutputSink) -> None:
        """A request from the inbox, into the scheduler; refused when its id is already in flight."""
        if seq.request_id in self.states:
            sink.put(RequestOutput(seq.request_id, [], "", finished=True, finish_reason="error",
                                   error=f"request id {seq.request_id!r} is already in flight"))
            return
        self.states[seq.request_id] = self._new_state(seq, sink)
        self.scheduler.add(seq)

    def _new_state(self, seq: Sequence, sink: OutputSink) -> RequestState:
        return RequestState(seq, sink, self.tokenizer)

    def abort(self, request_id: str) -> None:
        if request_id in self.states:
            self.finish(request_id, "abort")

    def finish(self, request_id: str, reason: str, error: str | None = None) -> None:
        state = self.states.pop(request_id)
        self.scheduler.finish(state.seq)
        self._emit(state, state.final(reason, error))

    def finish_all(self, reason: str, error: str | None = None) -> None:
        for request_id in list(self.states):
            self.finish(request_id, reason, error)

    def fail_step(self, sched: SchedulerOutput) -> None:
        """A failed step's requests end with an error that names the request (the detail goes to the log)."""
        for seq, _ in sched.scheduled:
            if seq.request_id in self.states and self.states[seq.request_id].seq is seq:
                self.finish(seq.request_id, "error", f"internal error (request {seq.request_id})")

    def fail_all(self) -> None:
        """The engine failed: every request gets its error straight into its sink, for the scheduler's state is
        not trusted any more."""
        for request_id, state in list(self.states.items()):
            fail_request(request_id, state.sink)
        self.states.clear()

    def expire(self, now: float, queue_limit: float, request_limit: float) -> None:
        """End requests past queue_limit (not started yet) or request_limit seconds, with an error (0: none)."""
        if queue_limit:
            for seq in [s for s in self.scheduler.waiting
                        if s.num_output_tokens == 0 and now - s.arrival_time > queue_limit]:
                if seq.request_id in self.states:
                    self.finish(seq.request_id, "error", f"server busy: the request waited {queue_limit:g} s "
                                "without starting (max_queue_time_s); retry later")
        if request_limit:
            for request_id in [r for r, state in self.states.items()
                               if now - state.seq.arrival_time > request_limit]:
                self.finish(request_id, "error", f"the request ran longer than {request_limit:g} s "
                            "(max_request_time_s) and was stopped")

    # ---- a step's tokens -----------------------------------------------------------------------
    def advance_grammars(self, seqs: list[Sequence], token_ids: list[int], logprobs: list[TokenLogprob | None]
                         ) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """Guided sequences' grammars take the step's tokens. A complete grammar ends its request ("stop", after
        the token's text). A rejected token ends its request with an error and is dropped: the mask lets only
        the grammar's tokens through, so that takes a row whose logits were all -inf or NaN."""
        rejected: list[int] = []
        for i, (seq, token_id) in enumerate(zip(seqs, token_ids)):
            if seq.grammar is None or seq.finish_reason is not None:  # unguided, or ended by a stop token / length
                continue
            if not seq.grammar.accept(token_id):
                rejected.append(i)
            elif seq.grammar.is_terminated:
                seq.finish_reason = "stop"
                self.scheduler.finish(seq)
        if not rejected:
            return seqs, token_ids, logprobs
        for i in rejected:
            seq = seqs[i]
            both = " with allowed_token_ids (they may allow no token in common)" if seq.params.allowed_token_ids else ""
            self.finish(seq.request_id, "error", f"request {seq.request_id}: token {token_ids[i]} does not fit "
                        f"the guided_* constraint{both} ({seq.grammar.error})")
        dropped = set(rejected)
        keep = [i for i in range(len(seqs)) if i not in dropped]
        return [seqs[i] for i in keep], [token_ids[i] for i in keep], [logprobs[i] for i in keep]

    def emit_tokens(self, seqs: list[Sequence], token_ids: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """Output processing for a step's tokens: text (each request's DecodeStream), stop strings, sinks."""
        now, states = time.monotonic(), self.states  # the step's tokens all arrived at once
        for seq, token_id, lp in zip(seqs, token_ids, logprobs):
            state = states[seq.request_id]
            output = self._process_token(state, token_id, lp, now)
            if output is not None:
                self._emit(state, output)

    def emit_run(self, seq: Sequence, token_ids: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """A verify step's accepted run of one sequence: each token reaches the scheduler and the text one
        position at a time, as plain decode steps would bring them (a stop token, max_tokens or a stop string
        inside the run ends it there); then the run goes out as one output, one streamed response rather than
        one per token."""
        state, outputs = self.states.get(seq.request_id), []
        for token_id, lp in zip(token_ids, logprobs):
            if seq.status is SequenceStatus.FINISHED:
                break
            self.scheduler.append_token(seq, token_id)
            output = self._process_token(state, token_id, lp, unsent=outputs)
            if output is None:
                return
            outputs.append(output)
        if outputs:
            self._emit(state, outputs[0] if len(outputs) == 1 else merge_outputs(outputs))

    def _process_token(self, state: RequestState, token_id: int, logprob: TokenLogprob | None,
                       now: float | None = None, unsent: list[RequestOutput] = ()) -> RequestOutput | None:
        """The request's output for a token the scheduler has appended; a finished one ends the request here.
        None when processing failed: the request has ended with an error (after its `unsent` outputs)."""
        seq = state.seq
        try:
            output = state.process_token(token_id, logprob, now)
        except Exception:  # one request's failure (detokenizing, say) ends that request only
            log.exception("request %s failed", seq.request_id)
            if unsent:
                self._emit(state, merge_outputs(unsent))
            self.finish(seq.request_id, "error", f"internal error (request {seq.request_id})")
            return None
        if output.finished:
            if seq.finish_reason is None:  # a stop string: the scheduler has not ended it
                self.scheduler.finish(seq)
            del self.states[seq.request_id]
        return output

    def _emit(self, state: RequestState, output: RequestOutput) -> None:
        try:
            state.sink.put(output)
        except Exception:  # a broken client connection must not stop the loop
            log.exception("could not deliver output of request %s", state.seq.request_id)
        if self.metrics is not None:
            self.metrics.observe_output(output)


def fail_request(request_id: str, sink: OutputSink) -> None:
    """The error of a request that a failed engine held or was handed: straight into its sink."""
    error = f"internal error (request {request_id}): the engine failed; the server restarts the model, retry"
    try:
        sink.put(RequestOutput(request_id, [], "", finished=True, finish_reason="error", error=error))
    except Exception:
        log.exception("could not deliver the error of request %s", request_id)
