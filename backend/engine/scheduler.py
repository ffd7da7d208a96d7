"""Scheduler: which sequences compute how many tokens this step.

vLLM v1's idea: schedule tokens, not phases. Every sequence wants
`num_tokens - num_computed_tokens` more tokens (a whole prompt, the rest of a
chunked prompt, or 1 for a decode); one token budget per step is handed out,
running sequences first, then waiting ones in the queue's order (never
skipping ahead of its head). Chunked prefill falls out of capping a sequence's
share at the budget left, so a long prompt never stalls the running decodes.

When the KV pool runs dry, the last running sequence is preempted by
recompute: its blocks are freed and it goes back to the waiting queue with its
generated tokens kept. The policy (request_queue.py) sets both orders:
- fcfs: the queue in arrival order; running in admission order, so the victim
  is the newest and goes back to the front;
- priority: both by (priority, arrival), so the victim is the lowest-priority
  newest one. Before anything else is scheduled, a waiting head of strictly
  higher priority than the last running sequence preempts it when it could
  not be seated otherwise (no seat left, or too few free blocks for its
  prompt), as vLLM's priority policy does.

The scheduler owns the bookkeeping of what it schedules, split as in vLLM's
async scheduling:
- `schedule()` decides, allocates and advances `num_computed_tokens` at once,
  as if the step had run; its output carries the block ids it allocated (each
  sequence's `block_ids` is its block table, kept in step with the block
  manager). A sequence that catches up this step will get a token whose id
  only the device knows for now: it holds a placeholder for it, so the next
  step can be scheduled (and its input fed from the device) before the host
  has seen that token.
- `update_from_output()` runs one step later: it replaces the placeholders by
  the sampled tokens, applies the token-level stop rules and frees finished
  sequences. A sequence that stops this way may already sit in the step
  after: that one token is computed and discarded.
Stop strings need text, so output processing finds them and ends the
sequence through `finish()`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import cached_property

from kvtriton.backend.engine.block_manager import BlockManager
from kvtriton.backend.engine.request_queue import priority_key, waiting_queue
from kvtriton.backend.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool = True
    max_model_len: int = 1 << 30  # a sequence that reaches it finishes with "length"
    policy: str = "fcfs"  # config.SCHEDULING_POLICIES


@dataclass
class SchedulerOutput:
    # (sequence, new tokens) in batch order: one-token sequences first (the decode group).
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Block ids allocated this step, per request id (prefix-cache hits included at admission).
    new_block_ids: dict[str, list[int]] = field(default_factory=dict)
    # Positions in `scheduled` whose sequence catches up this step: its last row's logits yield a token.
    # Filled by schedule(), in batch order; update_from_output() takes one sampled token for each.
    sample_indices: list[int] = field(default_factory=list)

    @cached_property  # read three times a step (sampling metadata, the next step's inputs), once schedule() is done
    def sampled_seqs(self) -> list[Sequence]:
        """The sequences of sample_indices, in that order: row j of the step's sampled tokens is the j-th."""
        return [self.scheduled[i][0] for i in self.sample_indices]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting = waiting_queue(config.policy)
        self.by_priority = config.policy == "priority"
        self.running: list[Sequence] = []  # in the policy's order: the last is the next victim
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # computed prompt tokens since start (prefix-cache hits excluded)
        self.num_generation_tokens = 0  # sampled tokens since start
        # Unfinished sequences that asked for prompt logprobs: while there are none (the common case) a step
        # looks for no prompt rows, so the others pay nothing per sequence for the feature.
        self.prompt_logprob_seqs: set[Sequence] = set()

    def add(self, seq: Sequence) -> None:
        seq.max_num_tokens = min(seq.num_prompt_tokens + seq.params.max_tokens, self.config.max_model_len)
        self.waiting.add(seq)
        if seq.params.prompt_logprobs is not None:
            self.prompt_logprob_seqs.add(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and release its blocks (finished, aborted or failed)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.block_ids = []
        self.block_manager.free(seq.request_id)
        self.prompt_logprob_seqs.discard(seq)

    def update_from_output(self, out: SchedulerOutput, sampled_token_ids: list[int]) -> tuple[list[Sequence],
                                                                                             list[int]]:
        """Account for an executed step: `sampled_token_ids[j]` is the token of `out.sample_indices[j]`.

        Each sampled token replaces its sequence's placeholder; a sequence whose token is a stop token
        ("stop") or that reached max_tokens or max_model_len ("length") is finished and freed. Sequences
        finished meanwhile (aborted, or stopped by the step before) drop their token. Returns the
        sequences that got a token and the indices of their tokens in `sampled_token_ids`, in batch
        order; finished ones have status FINISHED and `finish_reason` set.
        """
        seqs, kept = [], []
        for j, (i, token_id) in enumerate(zip(out.sample_indices, sampled_token_ids, strict=True)):
            seq = out.scheduled[i][0]
            if seq.status is SequenceStatus.FINISHED:
                continue
            seq.num_placeholders -= 1
            self.append_token(seq, token_id)
            seqs.append(seq)
            kept.append(j)
        return seqs, kept

    def rollback_proposals(self, out: SchedulerOutput, num_accepted: list[int]) -> None:
        """Account for a verify step (speculative decoding): `num_accepted[j]` of the proposals of
        `out.sample_indices[j]` were accepted. The rejected ones are rolled back: `num_computed_tokens` drops
        by their number and the blocks past the kept tokens are freed, as if only the accepted proposals
        had been scheduled. The tokens themselves follow through append_token, one at a time."""
        for i, accepted in zip(out.sample_indices, num_accepted, strict=True):
            seq = out.scheduled[i][0]
            rejected, seq.spec_token_ids = len(seq.spec_token_ids) - accepted, []
            if seq.status is SequenceStatus.FINISHED:
                continue
            seq.num_placeholders -= 1  # the step's token: now the host's, appended by append_token
            if rejected:
                seq.num_computed_tokens -= rejected
                seq.block_ids = self.block_manager.trim(seq.request_id, seq.num_computed_tokens)

    def append_token(self, seq: Sequence, token_id: int) -> None:
        """A token the host now knows: appended, then the token-level stop rules ("stop": a stop token;
        "length": max_tokens or max_model_len) finish and free the sequence."""
        seq.token_ids.append(token_id)
        self.num_generation_tokens += 1
        if token_id in seq.stop_token_ids:
            seq.finish_reason = "stop"
        elif len(seq.token_ids) >= seq.max_num_tokens:  # max_tokens or max_model_len
            seq.finish_reason = "length"
        else:
            return
        self.finish(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # Prompt tokens whose logits are computed for prompt_logprobs, at most max_num_seqs a step: the logits
        # rows a step makes stay within twice what the memory profile sized (one a sequence).
        logit_budget = self.config.max_num_seqs
        bm = self.block_manager

        # 0. priority: a waiting head of higher priority than the last running sequence takes its place.
        if self.by_priority:
            self._preempt_for_priority(out)
        preempted_for_priority = len(out.preempted)

        # 1. Running sequences in order. Preempt from the end when blocks run out.
        i, scoring, block_size = 0, bool(self.prompt_logprob_seqs), bm.block_size
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_total_tokens = len(seq.token_ids) + seq.num_placeholders  # (Sequence.num_total_tokens, inlined)
            if seq.num_placeholders and num_total_tokens >= seq.max_num_tokens:
                i += 1  # its pending token reaches max_tokens or max_model_len: scheduling it again would be wasted
                continue
            if seq.spec_token_ids:  # proposals to verify: as many as the budget leaves room for
                del seq.spec_token_ids[max(budget - 1, 0):]
            elif (num_total_tokens == seq.num_computed_tokens + 1 and not scoring
                  and seq.num_computed_tokens < len(seq.block_ids) * block_size):
                # A decode whose slot is in a block it holds: nothing to allocate (the hot path, inlined). Blocks
                # that filled meanwhile are hashed for prefix reuse at its next allocation.
                out.scheduled.append((seq, 1))
                budget -= 1
                i += 1
                continue
            scores_prompt = scoring and seq.needs_prompt_logprobs
            if scores_prompt and logit_budget == 0:  # its prompt goes on next step; the others need not wait
                i += 1
                continue
            n = self._share(num_total_tokens + len(seq.spec_token_ids) - seq.num_computed_tokens,
                            min(budget, logit_budget) if scores_prompt else budget)
            if n == 0:
                break
            if scores_prompt:
                logit_budget -= n
            if n == 1 and seq.num_computed_tokens < len(seq.block_ids) * block_size:
                # The same nothing-to-allocate case as the inlined path above, reached here by a verify step cut to
                # its one token, or by a row that scores prompt logprobs.
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
                continue
            # Proposals count as placeholders: they get slots, and no block holding one is hashed.
            while (new_ids := bm.allocate_slots(seq.request_id, seq.token_ids, seq.num_computed_tokens, n,
                                                num_placeholders=seq.num_placeholders + len(seq.spec_token_ids))
                   ) is None:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                seq.block_ids += new_ids
                out.new_block_ids[seq.request_id] = new_ids
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: nothing after it is running any more
        for seq in self.running[i:]:  # not scheduled (the budget ran out): their proposals are stale next step
            seq.spec_token_ids = []

        # 2. Waiting sequences in the queue's order, unless step 1 had to preempt (the pool is short).
        while (self.waiting and budget > 0 and len(out.preempted) == preempted_for_priority
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting.peek()
            if seq.num_placeholders:
                break  # preempted with a token in flight: admitted once the host has it (next step)
            hits, num_cached = ([], 0)
            # A prompt whose logprobs are asked for is computed whole (vLLM does the same): cached blocks would
            # skip positions whose logits are needed.
            if seq.num_computed_tokens == 0 and not seq.needs_prompt_logprobs:
                hits, num_cached = bm.get_computed_blocks(seq.token_ids, seq.lora_adapter)
            scores_prompt = seq.needs_prompt_logprobs
            n = self._share(seq.num_tokens - num_cached, min(budget, logit_budget) if scores_prompt else budget)
            if n == 0:
                break
            if scores_prompt:
                logit_budget -= n
            new_ids = bm.allocate_slots(seq.request_id, seq.token_ids, num_cached, n, hits or None,
                                        namespace=seq.lora_adapter)  # an adapter's K/V is its own to share
            if new_ids is None:
                break  # wait for blocks rather than let a later, smaller request overtake
            self.waiting.pop()
            seq.block_ids = [b.block_id for b in hits] + new_ids
            out.new_block_ids[seq.request_id] = seq.block_ids
            seq.num_computed_tokens = num_cached
            seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            if self.by_priority:
                bisect.insort_right(self.running, seq, key=priority_key)
            else:
                self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n

        out.scheduled.sort(key=lambda item: item[1] != 1)  # stable: decode group first
        self._update_after_schedule(out)
        return out

    def _update_after_schedule(self, out: SchedulerOutput) -> None:
        """Advance each scheduled sequence as if the step had run; one that catches up gets a placeholder."""
        for i, (seq, n) in enumerate(out.scheduled):
            computed = seq.num_computed_tokens
            if computed < len(seq.prompt_token_ids):
                self.num_prompt_tokens += min(n, len(seq.prompt_token_ids) - computed)
            seq.num_computed_tokens = computed = computed + n
            if computed >= len(seq.token_ids) + seq.num_placeholders:  # past it by the proposals being verified
                seq.num_placeholders += 1
                out.sample_indices.append(i)

    def _preempt_for_priority(self, out: SchedulerOutput) -> None:
        """Preempt running sequences of strictly lower priority than the waiting head, last first, while the
        head could not be seated: every seat taken, or fewer free blocks than its uncached prompt needs (the
        whole prompt, not only this step's chunk, so that it is not preempted in turn halfway). The blocks the
        running sequences take this step are not foreseen: if they leave too few, the head waits one step and
        is weighed again then."""
        if not self.waiting or not self.running:
            return
        head = self.waiting.peek()
        if head.num_placeholders or self.running[-1].params.priority <= head.params.priority:
            return  # preempted with a token in flight (admitted next step), or no one to take the place of
        bm = self.block_manager  # only now the prompt's cached blocks: a hash a block, not every step's work
        hits, num_cached = (bm.get_computed_blocks(head.token_ids, head.lora_adapter)
                            if not head.needs_prompt_logprobs else ([], 0))
        # A cached block nobody holds sits in the free queue: reusing it takes it from there too.
        needed = bm.num_blocks_needed(head.num_tokens - num_cached) + sum(1 for b in hits if b.ref_cnt == 0)
        while (self.running and self.running[-1].params.priority > head.params.priority
               and (len(self.running) >= self.config.max_num_seqs or bm.num_free_blocks < needed)):
            self._preempt(self.running[-1], out)

    def _share(self, wanted: int, budget: int) -> int:
        if wanted <= budget:
            return wanted
        return budget if self.config.enable_chunked_prefill else 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.request_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.block_ids = []
        seq.spec_token_ids = []
        self.num_preemptions += 1
        self.waiting.requeue(seq)
        out.preempted.append(seq)  # victims come from the unscheduled tail of `running`
