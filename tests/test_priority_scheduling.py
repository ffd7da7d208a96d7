"""scheduling_policy priority (vLLM's): the waiting queue and the running list by (priority, arrival), the
lowest-priority running sequence preempted first, and a waiting request of higher priority seated by preemption.
The scheduler on tiny pools, then the engine on a tiny random Llama."""

import dataclasses
import threading
import time

import pytest

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.block_manager import BlockManager
from kvtriton.backend.engine.request_queue import FCFSQueue, PriorityQueue
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.scheduler import Scheduler, SchedulerConfig
from kvtriton.backend.engine.sequence import Sequence, SequenceStatus

from tests.tiny_model import make_tiny_engine


def make(num_blocks=16, block_size=4, max_seqs=8, budget=64, policy="priority"):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    return Scheduler(SchedulerConfig(max_seqs, budget, True, policy=policy), bm), bm


def seq(name, n, priority=0, first=100, max_tokens=8):
    return Sequence(name, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens, priority=priority))


def step(sched):
    """One step, run: every sequence that caught up samples token 7. Returns the step's (id, tokens) pairs."""
    out = sched.schedule()
    sched.update_from_output(out, [7] * len(out.sample_indices))
    return out


def ids(seqs):
    return [s.request_id for s in seqs]


def test_the_priority_queue_orders_by_priority_then_arrival_and_requeues_by_the_same_key():
    q = PriorityQueue()
    a, b, c, d = seq("a", 2, 5), seq("b", 2, 0), seq("c", 2, 5), seq("d", 2, -1)
    for s in (a, b, c, d):
        q.add(s)
    assert ids(q) == ["d", "b", "a", "c"]
    assert q.pop() is d and q.peek() is b
    q.requeue(d)  # preempted: back to its place, which here is the front again
    assert ids(q) == ["d", "b", "a", "c"] and len(q) == 4 and c in q
    q.remove(a)
    assert ids(q) == ["d", "b", "c"]
    fcfs = FCFSQueue()
    for s in (a, b, c):
        fcfs.add(s)
    fcfs.requeue(d)
    assert ids(fcfs) == ["d", "a", "b", "c"]  # arrival order, the preempted one first


def test_waiting_requests_are_admitted_by_priority_when_seats_free_up():
    sched, _ = make(max_seqs=1)
    for s in (seq("low", 2, 3, first=100, max_tokens=1), seq("mid", 2, 1, first=200, max_tokens=1),
              seq("high", 2, 0, first=300, max_tokens=1)):
        sched.add(s)
    order = []
    while sched.has_work():
        order += [s.request_id for s, _ in step(sched).scheduled]
    assert order == ["high", "mid", "low"]


def test_a_waiting_request_of_higher_priority_takes_the_seat_of_a_lower_one():
    sched, bm = make(max_seqs=1)
    low = seq("low", 4, priority=1)
    sched.add(low)
    step(sched)
    sched.add(seq("high", 3, priority=0, first=300))
    out = step(sched)
    assert ids(out.preempted) == ["low"] and [s.request_id for s, _ in out.scheduled] == ["high"]
    assert low.status is SequenceStatus.WAITING and low.output_token_ids == [7]  # kept: recomputed later
    assert sched.waiting.peek() is low and bm.block_table("low") == []


def test_equal_or_lower_priority_waits_for_its_turn():
    for newcomer in (1, 2):
        sched, _ = make(max_seqs=1)
        sched.add(seq("running", 4, priority=1))
        step(sched)
        sched.add(seq("new", 3, priority=newcomer, first=300))
        out = step(sched)
        assert out.preempted == [] and [s.request_id for s, _ in out.scheduled] == ["running"]


def test_a_higher_priority_prompt_that_lacks_blocks_preempts_and_one_that_fits_does_not():
    for newcomer, tokens, preempted in (("fits", 8, []), ("big", 20, ["low"])):
        sched, bm = make(num_blocks=8, block_size=4)
        sched.add(seq("low", 16, priority=1))  # 4 of the 8 blocks
        step(sched)
        sched.add(seq(newcomer, tokens, priority=0, first=300))  # 2 blocks: free; 5: one short
        out = step(sched)
        assert ids(out.preempted) == preempted, newcomer
        assert newcomer in [s.request_id for s, _ in out.scheduled]


def test_when_the_pool_runs_dry_the_lowest_priority_is_preempted_not_the_newest():
    for policy, victim in (("priority", "low"), ("fcfs", "high")):
        sched, bm = make(num_blocks=4, block_size=4, policy=policy)
        low, high = seq("low", 8, priority=1 if policy == "priority" else 0), seq("high", 7, first=300)
        sched.add(low)
        sched.add(high)
        step(sched)
        assert sorted(ids(sched.running)) == ["high", "low"] and bm.num_free_blocks == 0
        # low's 9th token needs a third block; under priority low itself gives way, under fcfs the newest does
        out = step(sched)
        assert ids(out.preempted) == [victim], policy


def test_priority_is_refused_unless_the_engine_schedules_by_it(tiny_folder):
    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, priority"):
        EngineConfig(scheduling_policy="sjf")
    with pytest.raises(ValueError, match="priority must be a 32-bit integer"):
        SamplingParams(priority=2**31)
    assert SamplingParams.from_dict({"priority": "-3"}).priority == -3
    engine = make_tiny_engine(tiny_folder)
    try:
        with pytest.raises(ValueError, match="priority 2 needs scheduling_policy priority; this model schedules fcfs"):
            engine.add_request("p", "the dog", SamplingParams(priority=2))
    finally:
        engine.shutdown()


class Recorder:
    """A sink that keeps every output with its arrival order across requests."""

    def __init__(self, log: list, lock: threading.Lock):
        self.log, self.lock, self.done = log, lock, threading.Event()

    def put(self, output) -> None:
        with self.lock:
            self.log.append(output)
        if output.finished:
            self.done.set()


def test_the_engine_serves_a_high_priority_request_first_and_the_preempted_one_loses_nothing(tiny_folder):
    long = SamplingParams(temperature=0.0, max_tokens=300, ignore_eos=True, priority=1)
    solo = make_tiny_engine(tiny_folder).start()
    try:
        expected = solo.generate(["the quick brown fox"], dataclasses.replace(long, priority=0))[0].token_ids
    finally:
        solo.shutdown()
    engine = make_tiny_engine(tiny_folder, scheduling_policy="priority", max_num_seqs=1).start()
    log, lock = [], threading.Lock()
    low, high = Recorder(log, lock), Recorder(log, lock)
    try:
        engine.add_request("low", "the quick brown fox", long, sink=low)
        while not log:  # low is running
            time.sleep(0.001)
        engine.add_request("high", "paris is the capital of",
                           SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), sink=high)
        assert high.done.wait(60) and low.done.wait(60)
        finished = [o.request_id for o in log if o.finished]
        assert finished == ["high", "low"]
        assert engine.stats().num_preemptions >= 1 and engine.stats().kv_usage == 0.0
        low_tokens = [t for o in log if o.request_id == "low" for t in o.token_ids]
        assert low_tokens == expected  # recomputed after preemption: the same greedy continuation
    finally:
        engine.shutdown()
