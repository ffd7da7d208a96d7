"""RequestState: turns one sequence's sampled tokens into RequestOutputs; RequestText: their text (detokenizer,
stop strings), which an engine process's parent makes instead for most of its requests (text_outputs.py).

The scheduler has already applied the token-level stop rules when a token
arrives here (`seq.finish_reason`): a stop token or EOS ends the request with
"stop" and its text is never emitted; max_tokens or the model's context ends
it with "length", and a completed grammar (structured output) with "stop",
both after the token's text. What needs text happens here: the
incremental detokenizer, and the stop-string matcher, which ends a request
even when the stop string spans several tokens, never emitting it (unless
the request set include_stop_str_in_output).
"""

from __future__ import annotations

import time

from kvtriton.backend.engine.detokenizer import detokenizer_for
from kvtriton.backend.engine.outputs import OutputSink, RequestOutput, TokenLogprob
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.sequence import Sequence
from kvtriton.backend.engine.stop_strings import StopStringMatcher
from kvtriton.backend.engine.tokenizer import Tokenizer


class RequestText:
    """One request's text as its tokens arrive: the incremental detokenizer, then the stop-string matcher. Used
    where the text is made: by RequestState, or for an engine process's requests by its parent (text_outputs.py)."""

    __slots__ = ("detokenizer", "stop_matcher", "stop_token_ids")

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 stop_token_ids: frozenset[int]):
        self.detokenizer = detokenizer_for(tokenizer, prompt_token_ids, params.skip_special_tokens)
        self.stop_matcher = StopStringMatcher(list(params.stop), params.include_stop_str_in_output)
        self.stop_token_ids = stop_token_ids

    def feed(self, token_id: int, reason: str | None) -> tuple[str, str | None]:
        """(the text `token_id` adds, the request's finish reason after it). `reason`: the scheduler's for this
        token (None: it goes on). A stop token or EOS that ended the request adds no text; "length" and a
        completed grammar add the token's text and what was held back; a stop string makes it "stop"."""
        if reason == "stop" and token_id in self.stop_token_ids:
            return "", reason
        text, stopped = self.stop_matcher.feed(self.detokenizer.step([token_id]))
        if stopped:
            return text, "stop"
        if reason is not None:  # the last token: what the detokenizer and the stop matcher held back
            text += self.stop_matcher.feed(self.detokenizer.flush())[0] + self.stop_matcher.flush()
        return text, reason


class RequestState:
    def __init__(self, seq: Sequence, sink: OutputSink, tokenizer: Tokenizer, make_text: bool = True):
        self.seq, self.sink = seq, sink
        # make_text False: another process makes the text (an engine process's parent, text_outputs.py), and the
        # outputs here carry token ids with no text.
        self.text = RequestText(tokenizer, seq.prompt_token_ids, seq.params, seq.stop_token_ids) if make_text else None

    def process_token(self, token_id: int, logprob: TokenLogprob | None, now: float | None = None) -> RequestOutput:
        """The output for the token the scheduler just appended (possibly with empty text); `now`: the step's
        time.monotonic(), read once for all its tokens (default: read here).

        A finished output whose `seq.finish_reason` is None ended on a stop string: the caller must end
        the sequence in the scheduler.
        """
        seq = self.seq
        now = time.monotonic() if now is None else now
        first = seq.first_token_time is None
        if first:
            seq.first_token_time = now
        reason, text = seq.finish_reason, ""
        if self.text is not None:
            text, reason = self.text.feed(token_id, reason)
        out = self._output([token_id], text, now)
        out.logprobs = [logprob] if logprob else None
        if first and seq.params.prompt_logprobs is not None:
            out.prompt_logprobs = [TokenLogprob(seq.prompt_token_ids[0], None), *seq.prompt_logprobs]
        if reason:
            out.finished, out.finish_reason, out.lora_name = True, reason, seq.params.lora_name
        return out

    def final(self, reason: str, error: str | None = None) -> RequestOutput:
        """The last output of a request ended from outside the token stream (abort, error)."""
        out = self._output([], "", time.monotonic())
        out.finished, out.finish_reason, out.error, out.lora_name = True, reason, error, self.seq.params.lora_name
        return out

    def _output(self, token_ids: list[int], text: str, now: float) -> RequestOutput:
        seq = self.seq
        # Positional, in RequestOutput's field order: built for every token of every request, where keywords
        # cost twice as much (0.66 against 0.31 us).
        return RequestOutput(
            seq.request_id, token_ids, text, False, None,  # request_id, token_ids, text, finished, finish_reason
            seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens,
            None, None,  # logprobs, error
            seq.num_spec_proposed_tokens, seq.num_spec_accepted_tokens,
            seq.arrival_time, seq.first_token_time, now,
        )
