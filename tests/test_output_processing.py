"""Stop rules, end to end on the host: Scheduler.update_from_output (token rules) + RequestState (text rules).

No model: each step "samples" a scripted token, so the tests pin down exactly
which token ends a request, with which reason, and what text reaches the client.
"""

import pytest

from kvtriton.backend.engine.block_manager import BlockManager
from kvtriton.backend.engine.request_state import RequestState
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.scheduler import Scheduler, SchedulerConfig
from kvtriton.backend.engine.sequence import Sequence, SequenceStatus

from tests.test_detokenizer import load

EOS = 256  # per_byte tokenizer: bytes are 0..255 (in its alphabet's order), then <|endoftext|>


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tokenizer = load("per_byte", tmp_path_factory.mktemp("tok"))
    assert tokenizer.eos_token_ids == {EOS}
    return tokenizer


def run(tokenizer, text_tokens: list[int], params: SamplingParams, max_model_len: int = 1 << 30):
    """Feed `text_tokens` one per step; -> (outputs, sequence, block manager)."""
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(8, 64, True, max_model_len), bm)
    prompt = tokenizer.encode("hi", add_special_tokens=False)
    stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else {EOS})
    seq = Sequence("r", prompt, params, stop_ids)
    state = RequestState(seq, sink=None, tokenizer=tokenizer)
    sched.add(seq)
    outputs = []
    for token in text_tokens:
        out = sched.schedule()
        assert out.sample_indices == [0]
        sched.update_from_output(out, [token])
        output = state.process_token(token, None)
        if output.finished and seq.finish_reason is None:  # a stop string: the engine ends it
            sched.finish(seq)
        outputs.append(output)
        if output.finished:
            break
    return outputs, seq, bm


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def text(outputs) -> str:
    return "".join(o.text for o in outputs)


def test_eos_stops_and_its_text_is_never_emitted(tokenizer):
    outputs, seq, bm = run(tokenizer, ids(tokenizer, "ok") + [EOS] + ids(tokenizer, "more"), SamplingParams())
    assert text(outputs) == "ok" and outputs[-1].finish_reason == "stop" and len(outputs) == 3
    assert seq.status is SequenceStatus.FINISHED and bm.usage == 0.0


def test_ignore_eos_keeps_going_until_max_tokens(tokenizer):
    outputs, seq, _ = run(tokenizer, [EOS, EOS, EOS, EOS], SamplingParams(ignore_eos=True, max_tokens=3))
    assert [o.finished for o in outputs] == [False, False, True] and outputs[-1].finish_reason == "length"


def test_stop_token_ids_end_the_request_like_eos(tokenizer):
    stop = ids(tokenizer, "!")[0]
    outputs, _, _ = run(tokenizer, ids(tokenizer, "ab!cd"), SamplingParams(stop_token_ids=(stop,)))
    assert text(outputs) == "ab" and outputs[-1].finish_reason == "stop"


def test_max_tokens_finishes_with_length_after_emitting_the_token(tokenizer):
    outputs, seq, bm = run(tokenizer, ids(tokenizer, "abcdef"), SamplingParams(max_tokens=4))
    assert text(outputs) == "abcd" and outputs[-1].finish_reason == "length" and seq.num_output_tokens == 4
    assert bm.usage == 0.0


def test_model_context_finishes_with_length(tokenizer):
    prompt_len = len(ids(tokenizer, "hi"))
    outputs, _, _ = run(tokenizer, ids(tokenizer, "abcdef"), SamplingParams(max_tokens=100),
                        max_model_len=prompt_len + 3)
    assert text(outputs) == "abc" and outputs[-1].finish_reason == "length"


def test_stop_string_across_tokens_is_cut_and_frees_the_sequence(tokenizer):
    outputs, seq, bm = run(tokenizer, ids(tokenizer, "one END two"), SamplingParams(stop=["END"]))
    assert text(outputs) == "one " and outputs[-1].finish_reason == "stop"
    assert seq.status is SequenceStatus.FINISHED and bm.usage == 0.0


def test_a_stop_token_wins_over_max_tokens_on_the_same_token(tokenizer):
    outputs, _, _ = run(tokenizer, ids(tokenizer, "a") + [EOS], SamplingParams(max_tokens=2))
    assert outputs[-1].finish_reason == "stop" and text(outputs) == "a"


def test_held_back_stop_prefix_is_released_at_length(tokenizer):
    outputs, _, _ = run(tokenizer, ids(tokenizer, "abEN"), SamplingParams(stop=["END"], max_tokens=4))
    assert text(outputs) == "abEN" and outputs[-1].finish_reason == "length"


def test_each_output_carries_its_request_counts_and_times(tokenizer):
    """RequestState builds outputs positionally (a per-token hot path): every field lands where it belongs."""
    outputs, seq, _ = run(tokenizer, ids(tokenizer, "abc"), SamplingParams(max_tokens=3))
    for n, out in enumerate(outputs, start=1):
        assert (out.request_id, out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens) == (
            "r", seq.num_prompt_tokens, n, 0)
        assert (out.logprobs, out.error, out.num_spec_proposed_tokens, out.num_spec_accepted_tokens) == (
            None, None, 0, 0)
        assert out.arrival_time == seq.arrival_time and out.first_token_time == seq.first_token_time
        assert out.first_token_time <= out.time and out.token_ids == [ids(tokenizer, "abc")[n - 1]]
    assert [o.finished for o in outputs] == [False, False, True] and outputs[-1].finish_reason == "length"
