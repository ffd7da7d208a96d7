"""The engine thread's torch ops stay on one OpenMP thread, so that the forward thread keeps the only team."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import kvtriton.backend.engine.llm_engine as llm_engine
from kvtriton.backend.engine.openmp_threads import use_one_openmp_thread
from kvtriton.backend.engine.sampling_params import SamplingParams

from tests.tiny_model import make_tiny_engine


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def wide_op() -> None:
    """An op over more elements than one OpenMP grain (32,768), which goes parallel where it may."""
    (torch.ones(1 << 20) * 2).sum()


def on_new_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.update(fn()))
    thread.start()
    thread.join()
    return result


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                    reason="needs Linux's /proc and torch on 2+ threads")
def test_one_thread_here_leaves_other_threads_theirs():
    threads = torch.get_num_threads()
    wide_op()  # this thread's team exists before the counts below

    def engine_like():
        done = use_one_openmp_thread()
        before = os_threads()
        wide_op()
        return {"done": done, "threads": torch.get_num_threads(), "new_os_threads": os_threads() - before}

    seen = on_new_thread(engine_like)
    # <= 0: another thread of the test process may end meanwhile; a team of its own would be one more (checked)
    assert seen["done"] and seen["threads"] == 1 and seen["new_os_threads"] <= 0, seen
    assert torch.get_num_threads() == threads  # the calling thread's count is its own
    assert on_new_thread(lambda: {"threads": torch.get_num_threads()}) == {"threads": threads}  # so is a new one's


@pytest.mark.parametrize("single_team", [True, False])
def test_the_engine_thread_takes_one_openmp_thread(tiny_folder, monkeypatch, single_team):
    calls = []

    def recorded():
        done = use_one_openmp_thread()
        calls.append((threading.current_thread().name, done, torch.get_num_threads()))
        return done

    monkeypatch.setattr(llm_engine, "use_one_openmp_thread", recorded)
    engine = make_tiny_engine(tiny_folder, cpu_single_openmp_team=single_team).start()
    try:
        out = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, frequency_penalty=0.5, ignore_eos=True))[0]
        assert out.finish_reason == "length"
    finally:
        engine.shutdown()
    assert calls == [("kvtriton-engine", True, 1)]
