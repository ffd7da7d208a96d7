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
    assert sched.waiting[0] is b and b.token_ids[-1] == 7  # its generated token is kept (recompute)
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
