"""TextOutputs: the parent of an engine process turns the rows it sends into each request's outputs."""

from kvtriton.backend.engine.outputs import RequestOutput, RequestStream, request_output_fields
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.text_outputs import TextOutputs

from tests.test_detokenizer import load

EOS = 256  # per_byte tokenizer: bytes are 0..255 (in its alphabet's order), then <|endoftext|>


def first(request_id: str, token_id: int, time: float = 1.0) -> tuple:
    """The row of a request's first token, as the engine process sends it (every field, no text)."""
    return request_output_fields(RequestOutput(request_id, [token_id], "", num_prompt_tokens=2, num_output_tokens=1,
                                               arrival_time=0.5, first_token_time=time, time=time))


def test_plain_tokens_take_their_text_and_the_fields_of_the_requests_first_output(tmp_path):
    tokenizer = load("per_byte", tmp_path)
    outputs = TextOutputs(tokenizer, frozenset({EOS}))
    stream = RequestStream("a")
    outputs.add("a", [1, 2], SamplingParams(), stream)
    h, i = tokenizer.encode("hi", add_special_tokens=False)
    last = request_output_fields(RequestOutput("a", [EOS], "", True, "stop", 2, 4, time=3.0))
    assert outputs.deliver([1.0, first("a", h), 2.0, ("a", i), 3.0, last]) == []
    got = list(stream)
    assert [(o.token_ids, o.text, o.num_output_tokens, o.time) for o in got] == [
        ([h], "h", 1, 1.0), ([i], "i", 2, 2.0), ([EOS], "", 4, 3.0)]  # EOS ends it without text
    assert got[1].arrival_time == 0.5 and got[1].first_token_time == 1.0 and got[-1].finish_reason == "stop"
    assert len(outputs) == 0


def test_a_request_whose_text_fails_here_ends_with_an_error_and_is_handed_back_to_abort(tmp_path):
    tokenizer = load("per_byte", tmp_path)
    outputs = TextOutputs(tokenizer, frozenset({EOS}))
    bad, good = RequestStream("bad"), RequestStream("good")
    outputs.add("bad", [1], SamplingParams(), bad)
    outputs.add("good", [1], SamplingParams(), good)
    h = tokenizer.encode("h", add_special_tokens=False)[0]
    rows = [1.0, first("bad", h), first("good", h), 2.0, ("bad", 10**9), ("good", h), ("unknown", h)]
    assert outputs.deliver(rows) == ["bad"]  # the engine process must abort it
    assert outputs.deliver([3.0, ("bad", h)]) == []  # a late row of a request that ended here: dropped
    got = list(bad)
    assert got[-1].finished and got[-1].finish_reason == "error" and "internal error (request bad)" in got[-1].error
    assert [o.text for o in got] == ["h", ""]
    outputs.fail_all("the engine stopped; retry")
    assert [(o.text, o.finish_reason) for o in good] == [("h", None), ("h", None), ("", "error")]
    assert len(outputs) == 0


def test_a_request_with_stop_strings_takes_the_text_the_engine_process_made(tmp_path):
    outputs = TextOutputs(load("per_byte", tmp_path), frozenset({EOS}))
    stream = RequestStream("s")
    outputs.add("s", [1], SamplingParams(stop=["x"]), stream)
    made = request_output_fields(RequestOutput("s", [7], "made there", True, "stop", 1, 1))
    outputs.deliver([made])
    assert [o.text for o in stream] == ["made there"]
