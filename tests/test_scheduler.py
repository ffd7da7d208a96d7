"""Scheduler decisions on tiny pools: token budget, chunked prefill, FCFS, preemption order, exact blocks."""

from kvtriton.backend.engine.block_manager import BlockManager
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.scheduler import Scheduler, SchedulerConfig
from kvtriton.backend.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=16, block_size=4, max_seqs=8, budget=8, chunked=True, prefix=True):
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(SchedulerConfig(max_seqs, budget, chunked), bm), bm


def seq(name, n, first=100):
    return Sequence(name, list(range(first, first + n)), SamplingParams(max_tokens=8))


def complete(sched, out):
    """The step ran: every sequence that caught up samples token 7."""
    return sched.update_from_output(out, [7] * len(out.sample_indices))


def test_long_prompt_is_chunked_and_never_stalls_running_decodes():
    sched, bm = make(budget=8)
    short = seq("short", 3)
    sched.add(short)
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("short", 3)]
    complete(sched, out)
    sched.add(seq("long", 20, first=500))
    steps = []
    for _ in range(3):
        out = sched.schedule()
        steps.append([(s.request_id, n) for s, n in out.scheduled])
        complete(sched, out)
    # Every step: the decode first (1 token), the long prompt takes the rest of the budget (7, 7, then 6).
    assert steps == [[("short", 1), ("long", 7)], [("short", 1), ("long", 7)], [("short", 1), ("long", 6)]]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched, _ = make(budget=8, chunked=False)
    sched.add(seq("a", 6))
    sched.add(seq("b", 6, first=300))
    out = sched.schedule()
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 6)]  # b does not fit the 2 tokens left


def test_fcfs_admission_does_not_skip_ahead():
    sched, _ = make(num_blocks=4, block_size=4, budget=64)
    sched.add(seq("big", 12))  # 3 blocks
    sched.add(seq("bigger", 8, first=300))  # 2 blocks: does not fit the 1 left
    sched.add(seq("small", 2, first=600))  # would fit, but must not overtake
    out = sched.schedule()
    assert [s.request_id for s, _ in out.scheduled] == ["big"]
    assert [s.request_id for s in sched.waiting] == ["bigger", "small"]


def test_preemption_takes_the_newest_and_requeues_it_first_with_exact_blocks():
    sched, bm = make(num_blocks=4, block_size=4, budget=64, prefix=False)
    a, b = seq("a", 8), seq("b", 7, first=300)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    complete(sched, out)
    assert bm.block_table("a") == [0, 1] and bm.block_table("b") == [2, 3]
    out = sched.schedule()  # a needs a 3rd block for its 9th token: none free, b (newest) is preempted
    assert [s.request_id for s in out.preempted] == ["b"]
    assert [(s.request_id, n) for s, n in out.scheduled] == [("a", 1)]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and sched.num_preemptions == 1
    assert sched.waiting.peek() is b and b.token_ids[-1] == 7  # its generated token is kept (recompute)
    assert bm.block_table("a") == [0, 1, 3]  # b's blocks were freed tail-first: 3 is reused first


def test_finish_frees_blocks_wherever_the_sequence_is():
    sched, bm = make()
    a, b = seq("a", 5), seq("b", 5, first=300)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.finish(a)
    sched.finish(b)
    assert bm.usage == 0.0 and not sched.has_work()


def test_async_scheduling_schedules_the_next_decode_before_the_token_is_known():
    sched, bm = make(budget=16)
    a = seq("a", 3)
    sched.add(a)
    first = sched.schedule()  # the prompt; it catches up, so its token is a placeholder
    assert first.sample_indices == [0] and a.num_placeholders == 1 and a.num_computed_tokens == 3
    second = sched.schedule()  # the decode of that unknown token, before the host has it
    assert [(s.request_id, n) for s, n in second.scheduled] == [("a", 1)] and a.num_placeholders == 2
    sched.update_from_output(first, [41])
    assert a.token_ids[-1] == 41 and a.num_placeholders == 1 and a.num_computed_tokens == 4
    sched.update_from_output(second, [42])
    assert a.output_token_ids == [41, 42] and a.num_placeholders == 0


def test_a_token_that_stops_in_flight_costs_one_discarded_token_and_no_leak():
    sched, bm = make(budget=16)
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=8), stop_token_ids=frozenset({0}))
    sched.add(a)
    first = sched.schedule()
    second = sched.schedule()  # scheduled on the placeholder
    seqs, kept = sched.update_from_output(first, [0])  # the stop token
    assert seqs == [a] and a.finish_reason == "stop" and bm.usage == 0.0 and not sched.has_work()
    seqs, kept = sched.update_from_output(second, [5])  # the step in flight: its token is dropped
    assert seqs == [] and kept == [] and a.output_token_ids == [0]


def test_a_sequence_whose_pending_token_is_its_last_is_not_scheduled_again():
    sched, _ = make(budget=16)
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=1))
    sched.add(a)
    first = sched.schedule()
    assert sched.schedule().is_empty  # max_tokens is reached by the pending token: no wasted step
    sched.update_from_output(first, [9])
    assert a.finish_reason == "length" and not sched.has_work()


def test_preempted_with_a_token_in_flight_waits_for_it_then_recomputes():
    sched, bm = make(num_blocks=2, block_size=4, budget=64, prefix=False)
    a, b = seq("a", 4), seq("b", 3, first=300)
    sched.add(a)
    sched.add(b)
    first = sched.schedule()  # a: blocks [0]; b: blocks [1]; both sample
    second = sched.schedule()  # a's 5th token needs a new block: b (newest) is preempted, its token in flight
    assert [s.request_id for s in second.preempted] == ["b"] and b.num_placeholders == 1
    sched.update_from_output(first, [7, 8])
    assert b.token_ids[-1] == 8 and b.num_placeholders == 0 and sched.waiting.peek() is b
