"""TokenOutputProcessor: the output processing of an engine whose requests' text another process makes.

An engine process (engine_process.py) sends each step's tokens to its parent, which detokenizes them
(text_outputs.py), as vLLM V1's EngineCore sends new token ids to the frontend process's OutputProcessor. The
loop beside the GPU's step then does no per-token text work, and most tokens cost it one tuple: on the 2-core VM,
64 decode rows with the forward made free, the engine loop's host time went 0.32 -> 0.22 ms a step.

A step's rows, in order (`take_rows`, the wire format that text_outputs.py reads):
  - a float: time.monotonic() of the tokens that follow (read once a step);
  - (request_id, token_id): a plain decode token, neither the request's first nor its last, without logprobs;
  - RequestOutput's fields (outputs.request_output_fields): every other output (first tokens, logprobs, a
    verify step's runs, ends, errors), its text "" unless this process made it.
A request with stop strings is detokenized here as before, for the stop string must end it at the step that
completes it (the parent would see it a step or two later): its outputs come with their text.
"""

from __future__ import annotations

import time

from kvtriton.backend.engine.output_processor import OutputProcessor
from kvtriton.backend.engine.outputs import OutputSink, RequestOutput, TokenLogprob, request_output_fields
from kvtriton.backend.engine.request_state import RequestState
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.sequence import Sequence


def engine_makes_text(params: SamplingParams) -> bool:
    """Whether the engine process detokenizes a request itself (its parent, text_outputs.py, makes the others'
    text): one with stop strings, which must end at the step that completes one."""
    return bool(params.stop)


class TokenOutputProcessor(OutputProcessor):
    def __init__(self, scheduler, tokenizer):
        super().__init__(scheduler, tokenizer)
        self.rows: list = []  # this step's, in order; the engine thread appends, take_rows() hands them over

    def take_rows(self) -> list:
        rows, self.rows = self.rows, []
        return rows

    def _new_state(self, seq: Sequence, sink: OutputSink) -> RequestState:
        return RequestState(seq, sink, self.tokenizer, make_text=engine_makes_text(seq.params))

    def emit_tokens(self, seqs: list[Sequence], token_ids: list[int], logprobs: list[TokenLogprob | None]) -> None:
        now, states, rows = time.monotonic(), self.states, self.rows
        rows.append(now)
        for seq, token_id, lp in zip(seqs, token_ids, logprobs):
            state = states[seq.request_id]
            if state.text is None and lp is None and seq.finish_reason is None and seq.first_token_time is not None:
                rows.append((seq.request_id, token_id))  # the hot path: the parent knows the rest
                continue
            output = self._process_token(state, token_id, lp, now)
            if output is not None:
                self._emit(state, output)

    def _emit(self, state: RequestState, output: RequestOutput) -> None:
        self.rows.append(request_output_fields(output))
