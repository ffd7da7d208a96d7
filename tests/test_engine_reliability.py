"""The engine's guards (tiny random Llama, CPU): a fault outside a step stops the engine loudly, and the
request bounds (queue length, queue time, request time, prompt bytes, stop strings) refuse or end work."""

import threading
import time

import pytest

from kvtriton.backend.engine.llm_engine import EngineBusyError, EngineDeadError
from kvtriton.backend.engine.outputs import RequestStream
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.stop_strings import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS

from tests.tiny_model import make_tiny_engine

pytest.importorskip("transformers")

LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)


def make_engine(folder, **overrides):
    return make_tiny_engine(folder, **{"max_num_seqs": 4, **overrides})


def last(stream: RequestStream, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    out = None
    while out is None or not out.finished:
        out = stream._queue.get(timeout=max(0.01, deadline - time.monotonic()))
    return out


def test_a_fault_outside_a_step_fails_every_request_and_refuses_new_ones(tiny_folder):
    engine = make_engine(tiny_folder).start()
    try:
        running = [engine.add_request(f"r{i}", "the quick brown fox", LONG) for i in range(6)]  # 4 run, 2 wait
        while engine.stats().num_running < 4:
            time.sleep(0.01)
        assert engine.is_healthy()

        def broken():
            raise MemoryError("injected")
        engine.scheduler.schedule = broken  # the next step fails before its own try
        finals = [last(s) for s in running]
        assert [f.finish_reason for f in finals] == ["error"] * 6
        for i, f in enumerate(finals):
            assert f.error.startswith(f"internal error (request r{i})") and "injected" not in f.error
        assert not engine.is_healthy()
        with pytest.raises(EngineDeadError, match="retry"):
            engine.add_request("late", "hello", LONG)
        # A request that raced with the failure into the inbox is answered too.
        raced = RequestStream("raced")
        engine._inbox.put(("add", type("Seq", (), {"request_id": "raced"})(), raced))
        engine._wakeup.set()
        assert last(raced).finish_reason == "error"
    finally:
        started = time.monotonic()
        engine.shutdown(timeout_s=30)
        assert time.monotonic() - started < 5  # a failed engine does not wait for its requests to finish


def test_a_full_waiting_queue_refuses_at_once(tiny_folder):
    engine = make_engine(tiny_folder, max_num_seqs=1, max_num_waiting=2).start()
    try:
        streams = [engine.add_request("r0", "the quick brown fox", LONG)]
        while engine.stats().num_running < 1:
            time.sleep(0.01)
        streams += [engine.add_request(f"r{i}", "the quick brown fox", LONG) for i in (1, 2)]  # queued (or inbox)
        with pytest.raises(EngineBusyError, match=r"server busy: 2 requests are already waiting \(max_num_waiting\)"):
            engine.add_request("r3", "hello", LONG)
        for s in streams:
            engine.abort(s.request_id)
        assert all(last(s).finish_reason == "abort" for s in streams)
        assert engine.stats().kv_usage == 0.0
        assert last(engine.add_request("after", "hello", SamplingParams(max_tokens=2))).finish_reason == "length"
    finally:
        engine.shutdown()


def test_queue_time_and_request_time_limits_end_requests_with_an_error(tiny_folder):
    engine = make_engine(tiny_folder, max_num_seqs=1, max_queue_time_s=0.3, max_request_time_s=1.0)
    execute = engine.runner.execute
    engine.runner.execute = lambda step: time.sleep(0.01) or execute(step)  # >= 4 s for 400 tokens
    engine.start()
    try:
        started = time.monotonic()
        first = engine.add_request("first", "the quick brown fox", LONG)
        queued = engine.add_request("queued", "the lazy dog", LONG)  # max_num_seqs=1: waits behind it
        out = last(queued)
        assert out.finish_reason == "error" and out.error.startswith("server busy: the request waited 0.3 s")
        assert 0.3 <= time.monotonic() - started < 1.0
        out = last(first)
        assert out.finish_reason == "error"
        assert out.error == "the request ran longer than 1 s (max_request_time_s) and was stopped"
        assert 1.0 <= time.monotonic() - started < 2.0
        assert engine.stats().kv_usage == 0.0 and not engine.has_work()
    finally:
        engine.shutdown()


def test_prompt_bytes_and_stop_strings_are_bounded_before_tokenizing(tiny_folder):
    engine = make_engine(tiny_folder, max_prompt_bytes=1000)
    calls = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda text: calls.append(len(text)) or encode(text)
    try:
        assert engine.max_prompt_bytes() == 1000
        with pytest.raises(ValueError, match=r"prompt must be at most 1000 bytes \(max_prompt_bytes; .*\), got 1002"):
            engine.add_request("big", "é" * 501)
        with pytest.raises(ValueError, match=rf"stop must hold at most {MAX_STOP_STRINGS} strings"):
            engine.add_request("stops", "hi", SamplingParams(stop=["x"] * (MAX_STOP_STRINGS + 1)))
        with pytest.raises(ValueError, match=rf"stop\[0\] must be at most {MAX_STOP_STRING_CHARS} characters"):
            engine.add_request("stop", "hi", SamplingParams(stop=["q" * (MAX_STOP_STRING_CHARS + 1)]))
        assert calls == []  # none of them reached the tokenizer
    finally:
        engine.tokenizer.encode = encode
        engine.shutdown()
    auto = make_engine(tiny_folder)
    try:
        assert auto.max_prompt_bytes() == 64 * auto.max_model_len
    finally:
        auto.shutdown()


def test_a_long_stop_string_does_not_slow_the_other_streams(tiny_folder):
    """The issue's case, at the limit: a 256-character stop string that keeps almost matching."""
    engine = make_engine(tiny_folder).start()
    try:
        stop = ["the " * 63 + "zzzz"]
        out = engine.generate(["the quick brown fox"] * 2,
                              SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, stop=stop))
        assert [o.finish_reason for o in out] == ["length", "length"]
    finally:
        engine.shutdown()


def test_is_healthy_sees_a_dead_thread(tiny_folder):
    engine = make_engine(tiny_folder)
    assert engine.is_healthy()  # not started yet
    engine._thread = threading.Thread(target=lambda: None)
    engine._thread.start()
    engine._thread.join()
    assert not engine.is_healthy()
    engine._thread = None
    engine.shutdown()


def test_an_idle_engine_gives_freed_heap_back_once(tiny_folder, monkeypatch):
    """HEAP_TRIM_IDLE_S after its last step the loop trims the heap once; not before any work, not while busy,
    not again until it has worked again."""
    from kvtriton.backend.engine import llm_engine
    from kvtriton.backend.models import host_memory

    trims = []
    monkeypatch.setattr(llm_engine, "HEAP_TRIM_IDLE_S", 0.3)
    engine = make_engine(tiny_folder).start()  # (its load may trim the heap: the loader frees its working copies)
    monkeypatch.setattr(host_memory, "release_freed_heap", lambda: trims.append(time.monotonic()))
    try:
        time.sleep(0.5)
        assert trims == []  # idle since the start: nothing was freed by serving
        for round_ in range(2):
            out = engine.add_request(f"r{round_}", "hello", SamplingParams(max_tokens=4)).result()
            done = time.monotonic()
            assert len(trims) == round_ and out.finish_reason == "length"
            time.sleep(0.8)
            assert len(trims) == round_ + 1 and trims[-1] - done >= 0.25
    finally:
        engine.shutdown()


def test_a_forward_stuck_in_a_dead_ranks_collective_still_fails_every_request(tiny_folder):
    """A tensor-parallel rank that dies can leave the forward thread in a collective that never returns (gloo,
    once in CI); the runner, which saw the rank exit, says so while the engine thread waits, and the engine
    fails its requests without waiting for the forward pass."""
    from kvtriton.backend.runners.tensor_parallel_runner import RunnerFailedError

    engine = make_engine(tiny_folder, cpu_single_openmp_team=True).start()  # CPU steps on a forward thread
    runner, dead, stuck, release = engine.runner, threading.Event(), threading.Event(), threading.Event()
    execute = runner.execute

    def stuck_execute(step):
        if dead.is_set():
            stuck.set()
            release.wait()  # the collective with the dead rank, until the test ends
        return execute(step)

    def check_health():
        if dead.is_set():
            raise RunnerFailedError("tensor-parallel rank 1 exited (code -9)")

    runner.execute, runner.check_health = stuck_execute, check_health
    try:
        stream = engine.add_request("long", "the quick brown fox", LONG)
        while engine.stats().num_running < 1:
            time.sleep(0.01)
        dead.set()
        assert stuck.wait(10)
        final = last(stream, timeout=10)
        assert final.finish_reason == "error" and "engine failed" in final.error
        assert not engine.is_healthy()
    finally:
        release.set()
        engine.shutdown(timeout_s=5)
