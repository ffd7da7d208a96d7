"""RequestState: turns one sequence's sampled tokens into RequestOutputs (text, stop rules).

Stop rules, in order, for each new token:
  1. EOS (unless ignore_eos) or a stop_token_id -> finish "stop"; its text is not emitted;
  2. its text goes through the stop-string matcher: a stop string, even one
     spread over several tokens, ends the request and is never emitted;
  3. max_tokens or the model's context length -> finish "length".
"""

from __future__ import annotations

import time

from kvtriton.backend.engine.detokenizer import IncrementalDetokenizer
from kvtriton.backend.engine.outputs import OutputSink, RequestOutput, TokenLogprob
from kvtriton.backend.engine.sequence import Sequence
from kvtriton.backend.engine.stop_strings import StopStringMatcher
from kvtriton.backend.engine.tokenizer import Tokenizer


class RequestState:
    def __init__(self, seq: Sequence, sink: OutputSink, tokenizer: Tokenizer, eos_token_ids: frozenset[int],
                 max_model_len: int):
        self.seq, self.sink = seq, sink
        p = seq.params
        self.stop_token_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else eos_token_ids)
        self.detokenizer = IncrementalDetokenizer(tokenizer, seq.prompt_token_ids, p.skip_special_tokens)
        self.stop_matcher = StopStringMatcher(list(p.stop))
        self.max_model_len = max_model_len

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> RequestOutput:
        """Record one sampled token; returns the output to send (possibly with empty text)."""
        seq, p = self.seq, self.seq.params
        now = time.monotonic()
        seq.token_ids.append(token_id)
        if seq.first_token_time is None:
            seq.first_token_time = now
        text, reason = "", None
        if token_id in self.stop_token_ids:
            reason = "stop"
        else:
            text, stopped = self.stop_matcher.feed(self.detokenizer.step([token_id]))
            reason = "stop" if stopped else None
        if reason is None and (seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
            text += self.stop_matcher.feed(self.detokenizer.flush())[0] + self.stop_matcher.flush()
        out = self._output([token_id], text, now)
        out.logprobs = [logprob] if logprob else None
        if reason:
            out.finished, out.finish_reason = True, reason
            seq.finish_reason = reason
        return out

    def final(self, reason: str, error: str | None = None) -> RequestOutput:
        """The last output of a request ended from outside the token stream (abort, error)."""
        out = self._output([], "", time.monotonic())
        out.finished, out.finish_reason, out.error = True, reason, error
        self.seq.finish_reason = reason
        return out

    def _output(self, token_ids: list[int], text: str, now: float) -> RequestOutput:
        seq = self.seq
        return RequestOutput(
            request_id=seq.request_id, token_ids=token_ids, text=text,
            num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens, arrival_time=seq.arrival_time,
            first_token_time=seq.first_token_time, time=now,
        )
