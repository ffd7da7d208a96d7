"""Scheduler: which sequences compute how many tokens this step.

vLLM v1's idea: schedule tokens, not phases. Every sequence wants
`num_tokens - num_computed_tokens` more tokens (a whole prompt, the rest of a
chunked prompt, or 1 for a decode); one token budget per step is handed out,
running sequences first, then waiting ones in arrival order (FCFS, never
skipping ahead). Chunked prefill falls out of capping a sequence's share at
the budget left, so a long prompt never stalls the running decodes.

When the KV pool runs dry, the most recently arrived running sequence is
preempted by recompute: its blocks are freed and it goes back to the front of
the waiting queue with its generated tokens kept.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvtriton.backend.engine.block_manager import BlockManager
from kvtriton.backend.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool = True


@dataclass
class SchedulerOutput:
    # (sequence, new tokens) in batch order: one-token sequences first (the decode group).
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

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
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and release its blocks (finished, aborted or failed)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free(seq.request_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences, oldest first. Preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._share(seq.num_tokens - seq.num_computed_tokens, budget)
            if n == 0:
                break
            while bm.allocate_slots(seq.request_id, seq.token_ids, seq.num_computed_tokens, n) is None:
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                budget -= n
                i += 1
                continue
            break  # seq itself was preempted: nothing after it is running any more

        # 2. Waiting sequences in arrival order, unless this step already had to preempt.
        while self.waiting and budget > 0 and not out.preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits, num_cached = ([], 0)
            if seq.num_computed_tokens == 0:
                hits, num_cached = bm.get_computed_blocks(seq.token_ids)
            n = self._share(seq.num_tokens - num_cached, budget)
            if n == 0:
                break
            if bm.allocate_slots(seq.request_id, seq.token_ids, num_cached, n, hits or None) is None:
                break  # FCFS: wait for blocks rather than let a later, smaller request overtake
            self.waiting.popleft()
            seq.num_computed_tokens = num_cached
            seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n

        out.scheduled.sort(key=lambda item: item[1] != 1)  # stable: decode group first
        return out

    def _share(self, wanted: int, budget: int) -> int:
        if wanted <= budget:
            return wanted
        return budget if self.config.enable_chunked_prefill else 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq.request_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)  # victims come from the unscheduled tail of `running`
