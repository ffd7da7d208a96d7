"""DecodeInputs: a steady decode batch's inputs updated in place equal prepare_step's, step after step, as the
overlapped loop drives the scheduler (arrivals, block growth, finished and preempted rows)."""

import random

import pytest
import torch

from kvtriton.backend.engine.block_manager import BlockManager
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.scheduler import Scheduler, SchedulerConfig
from kvtriton.backend.engine.sequence import Sequence
from kvtriton.backend.runners.decode_inputs import DecodeInputs
from kvtriton.backend.runners.step_input import StepInput, prepare_step

BLOCK = 4


def assert_same_step(got: StepInput, want: StepInput) -> None:
    assert torch.equal(got.packed, want.packed)
    assert torch.equal(got.attn.block_tables, want.attn.block_tables)
    assert got.placeholders == want.placeholders
    assert got.attn.num_decodes == want.attn.num_decodes
    assert got.attn.query_lens == want.attn.query_lens
    assert got.attn.context_lens_host == want.attn.context_lens_host
    assert got.attn.decode_context_blocks == want.attn.decode_context_blocks
    for name in ("input_ids", "positions", "last_token_indices"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.attn.slot_mapping, want.attn.slot_mapping)
    assert torch.equal(got.attn.context_lens, want.attn.context_lens)
    assert (got.adapters is None) == (want.adapters is None)
    if want.adapters is not None:
        assert torch.equal(got.adapters.token_adapters, want.adapters.token_adapters)
        assert (got.adapters.first, got.adapters.last) == (want.adapters.first, want.adapters.last)


def drive(num_blocks: int, arrivals: dict[int, list[Sequence]], steps: int, seed: int = 0):
    """The overlapped loop's order: schedule N+1, then the tokens of step N. Yields (scheduled, DecodeInputs'
    step or None, prepare_step's step) for each step."""
    rng = random.Random(seed)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=200),
                      BlockManager(num_blocks, BLOCK))
    inputs = DecodeInputs(BLOCK, "cpu")
    pending = None
    for i in range(steps):
        for seq in arrivals.get(i, []):
            sched.add(seq)
        out = sched.schedule()
        if not out.is_empty:
            yield out.scheduled, inputs.step(out.scheduled), prepare_step(out.scheduled, BLOCK, "cpu")
        if pending is not None:
            sched.update_from_output(pending, [rng.randrange(3, 50) for _ in pending.sample_indices])
        pending = None if out.is_empty else out


def prompt(name: str, n: int, max_tokens: int, lora_adapter: int = 0) -> Sequence:
    return Sequence(name, list(range(10, 10 + n)), SamplingParams(max_tokens=max_tokens), lora_adapter=lora_adapter)


def test_steady_decode_steps_equal_prepare_step_as_tables_grow_rows_finish_and_arrive():
    arrivals = {0: [prompt("a", 5, 40), prompt("b", 3, 25), prompt("c", 9, 60)], 12: [prompt("d", 6, 30)],
                30: [prompt("e", 2, 50), prompt("f", 7, 50)]}
    served = 0
    for scheduled, got, want in drive(64, arrivals, 90):
        if all(n == 1 for _, n in scheduled) and len(want.placeholders) == len(scheduled):
            assert got is not None
            assert_same_step(got, want)
            served += 1
        else:  # a prefill in the step: prepare_step builds it
            assert got is None
    assert served > 60


def test_rows_of_lora_adapters_carry_them_and_base_only_batches_carry_none():
    # a and c end early: the batch becomes base-only (b, d), then adapted rows arrive again (e).
    arrivals = {0: [prompt("a", 5, 20, lora_adapter=2), prompt("b", 3, 60), prompt("c", 9, 20, lora_adapter=1)],
                10: [prompt("d", 6, 50)], 40: [prompt("e", 2, 30, lora_adapter=1)]}
    adapted = base_only = 0
    for scheduled, got, want in drive(64, arrivals, 80):
        if got is not None:
            assert_same_step(got, want)
            adapted += got.adapters is not None
            base_only += got.adapters is None
    assert adapted > 10 and base_only > 10


def test_preemption_and_the_rows_after_it_stay_exact():
    # 12 blocks of 4 tokens for three sequences that want 16 blocks: the newest is preempted and comes back.
    arrivals = {0: [prompt("a", 6, 40), prompt("b", 6, 40), prompt("c", 6, 40)]}
    served = 0
    for scheduled, got, want in drive(12, arrivals, 150, seed=1):
        if got is not None:
            assert_same_step(got, want)
            served += 1
    assert served > 50


def test_steps_it_does_not_serve():
    inputs = DecodeInputs(BLOCK, "cpu")
    seq = prompt("a", 5, 10)
    seq.block_ids, seq.num_computed_tokens = [3, 4], 5
    assert inputs.step([(seq, 5)]) is None  # a prefill
    seq.token_ids.append(7)
    seq.num_computed_tokens = 6
    assert inputs.step([(seq, 1)]) is None  # the host knows the token (the synchronous loop)
    seq.num_placeholders, seq.num_computed_tokens = 1, 7
    seq.spec_token_ids = [8, 9]
    assert inputs.step([(seq, 3)]) is None  # a verify step
    seq.spec_token_ids = []
    assert inputs.step([(seq, 1)]) is not None
    seq.num_computed_tokens, seq.num_placeholders = 10, 4  # position 9: past the 2 blocks of its table
    assert inputs.step([(seq, 1)]) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_pinned_buffers_alternate_and_the_inputs_arrive():
    inputs = DecodeInputs(BLOCK, "cuda")
    seqs = [prompt(f"s{i}", 4 + i, 50) for i in range(3)]
    for i, seq in enumerate(seqs):
        seq.num_placeholders, seq.num_computed_tokens = 1, len(seq.token_ids) + 1
        seq.block_ids = list(range(10 * i, 10 * i + 3))
    for _ in range(6):
        scheduled = [(seq, 1) for seq in seqs]
        assert_same_step(inputs.step(scheduled), prepare_step(scheduled, BLOCK, "cuda"))
        for seq in seqs:
            seq.token_ids.append(5)
            seq.num_computed_tokens += 1


def test_a_step_whose_tokens_reached_the_host_first_takes_none_for_device_tokens():
    """A verify step (StepExecutor.speculative_step) takes the step in flight's tokens before it schedules, so its
    rows' tokens are the host's. Even with the last overlapped step's rows, each one token further, DecodeInputs must
    not take them for device tokens (a placeholder with no step in flight to fill it failed the whole step)."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=200),
                      BlockManager(32, BLOCK))
    inputs = DecodeInputs(BLOCK, "cpu")
    for seq in (prompt("a", 3, 50), prompt("b", 5, 50)):
        sched.add(seq)
    pending = None
    for _ in range(6):  # the overlapped order: schedule N + 1, then step N's tokens
        out = sched.schedule()
        last = inputs.step(out.scheduled)
        if pending is not None:
            sched.update_from_output(pending, [7] * len(pending.sample_indices))
        pending = out
    assert len(out.scheduled) == 2 and last is not None and len(last.placeholders) == 2  # steady device tokens
    sched.update_from_output(pending, [7] * len(pending.sample_indices))  # the verify step's order: tokens first
    out = sched.schedule()
    want = prepare_step(out.scheduled, BLOCK, "cpu")
    assert want.placeholders == []
    got = inputs.step(out.scheduled)
    if got is not None:
        assert_same_step(got, want)
