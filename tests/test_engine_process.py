"""EngineProcess: the engine in a child process behaves as the engine in-process, and its death is seen."""

import dataclasses
import os
import signal
import time

import pytest

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.engine_process import EngineProcess
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.engine.sampling_params import SamplingParams

from tests.engine_helpers import assert_engine_dead
from tests.tiny_model import make_tiny_model

pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["the quick brown fox", "paris is the capital of", "blocks of keys and values", "one two three"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    return EngineConfig(model=str(folder), device="cpu", block_size=4, num_kv_blocks=128, max_num_seqs=8,
                        max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def engine(config):
    engine = EngineProcess(config)
    yield engine
    engine.shutdown(timeout_s=5)


class Metrics:
    def __init__(self):
        self.outputs, self.steps = [], []

    def observe_output(self, out):
        self.outputs.append(out)

    def observe_step(self, stats, force=False):
        self.steps.append(stats)


def test_greedy_output_equals_the_engine_in_process(config, engine):
    local = LLMEngine(config)
    expected = local.generate(PROMPTS, GREEDY)
    local.shutdown()
    streams = [engine.add_request(f"eq{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    got = [s.result() for s in streams]
    assert [g.token_ids for g in got] == [e.token_ids for e in expected]
    assert [g.text for g in got] == [e.text for e in expected] and all(g.finish_reason == "length" for g in got)


def streamed(stream) -> list[tuple]:
    """What a client sees of each output (not its times)."""
    return [(o.token_ids, o.text, o.finished, o.finish_reason, o.num_prompt_tokens, o.num_output_tokens,
             o.num_cached_tokens, o.error, o.logprobs, o.prompt_logprobs) for o in stream]


def test_streamed_outputs_equal_the_engine_in_process(config, engine):
    """The parent makes the text from the tokens the child sends (text_outputs.py), except for requests with stop
    strings, which the child detokenizes: every output a client sees is the one the engine in-process streams,
    per token, whichever way its text was made and however the request ended."""
    prompt, sampled = "a new prompt for streaming", SamplingParams(temperature=1.0, seed=7, max_tokens=16)
    local = LLMEngine(config).start()
    tokens, text = (lambda out: (out.token_ids, out.text))(local.generate([prompt], sampled)[0])
    cases = [sampled, SamplingParams(temperature=1.0, seed=7, max_tokens=10, logprobs=2),
             SamplingParams(temperature=1.0, seed=7, max_tokens=16, stop=[text[len(text) // 2:][:2]]),
             SamplingParams(temperature=1.0, seed=7, max_tokens=9, ignore_eos=True, prompt_logprobs=1),
             SamplingParams(temperature=1.0, seed=7, max_tokens=16, stop_token_ids=[tokens[5]])]
    expected = [streamed(local.add_request(f"in{i}", prompt, params)) for i, params in enumerate(cases)]
    local.shutdown()
    engine.add_request("warm", prompt, sampled).result()  # the same prefix cache as the engine in-process
    got = [streamed(engine.add_request(f"out{i}", prompt, params)) for i, params in enumerate(cases)]
    assert got == expected
    assert [e[-1][3] for e in expected] == ["length", "length", "stop", "length", "stop"]
    assert len(expected[2]) < 16 and len(expected[4]) <= 6  # ended by the stop string, by the stop token


def test_a_verify_steps_runs_stream_as_in_process(config):
    """Speculative decoding: a verify step's accepted run reaches the parent as one output of several tokens, whose
    text the parent makes token by token (a run that ends on max_tokens flushes at its last)."""
    config = dataclasses.replace(config, speculative_method="ngram", num_speculative_tokens=3)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (12, 17)]
    local = LLMEngine(config).start()
    expected = [streamed(local.add_request(f"in{i}", PROMPTS[1], p)) for i, p in enumerate(params)]
    local.shutdown()
    engine = EngineProcess(config)
    try:
        got = [streamed(engine.add_request(f"out{i}", PROMPTS[1], p)) for i, p in enumerate(params)]
    finally:
        engine.shutdown(timeout_s=5)
    assert got == expected and any(len(o[0]) > 1 for e in expected for o in e)  # runs of several tokens


def test_stats_count_a_finished_request_once_its_result_is_in(engine):
    before = engine.stats().num_generation_tokens
    out = engine.add_request("stats", PROMPTS[0], GREEDY).result()
    assert engine.stats().num_generation_tokens - before == len(out.token_ids) == GREEDY.max_tokens


def test_a_request_that_can_never_run_is_refused_on_the_callers_thread(engine):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        engine.add_request("too-long", "hello", SamplingParams(max_tokens=10**6))
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("empty", [], GREEDY)


def test_abort_ends_the_stream_and_frees_the_blocks(engine):
    stream = engine.add_request("ab", "hello there", SamplingParams(max_tokens=400, ignore_eos=True))
    engine.abort("ab")
    assert stream.result().finish_reason == "abort"
    metrics = Metrics()
    engine.metrics = metrics  # the child reports its stats every step, and every 0.1 s when idle
    deadline = time.monotonic() + 10
    while not (metrics.steps and metrics.steps[-1].kv_usage == 0.0) and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.metrics = None
    assert metrics.steps[-1].kv_usage == 0.0 and metrics.steps[-1].num_running == 0


def test_a_dead_engine_process_fails_its_requests_and_reports_unhealthy(config):
    engine = EngineProcess(config)
    stream = engine.add_request("long", "hello", SamplingParams(max_tokens=400, ignore_eos=True))
    os.kill(engine.pid, signal.SIGKILL)
    assert_engine_dead(engine, [stream.result()], "internal error (request long)")
    engine.shutdown(timeout_s=1)


def test_shutdown_leaves_no_process_behind(config):
    engine = EngineProcess(config)
    pid = engine.pid
    engine.add_request("s", "hello", GREEDY).result()
    engine.shutdown(timeout_s=5)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_parents_start_up_heap_is_frozen(config):
    """A full garbage collection in the process that reads the engine's outputs (Triton's stub) stops it reading;
    the engine process then blocks on the full socket and the whole batch waits (the forward made free, 64
    requests: a 57 ms collection put a run's ITL mean at 0.66 ms against 0.47-0.54). So, as in the child, what
    start-up left alive is frozen: collections scan only what came after."""
    import gc

    gc.unfreeze()  # what earlier tests froze in this process
    engine = EngineProcess(config)
    try:
        assert gc.get_freeze_count() > 0
    finally:
        engine.shutdown(timeout_s=5)
