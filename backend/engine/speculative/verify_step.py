"""Verifier: a verify step's logits -> each sequence's accepted run, the rejected proposals rolled back.

StepExecutor.speculative_step (step_executor.py) proposes, schedules and runs the target's forward pass
over every scheduled token; this samples every verified position as a plain decode step would sample it
(verification.py says why that is rejection sampling), and counts the proposals for EngineStats.
"""

from __future__ import annotations

import torch

from kvtriton.backend.engine.outputs import TokenLogprob
from kvtriton.backend.engine.pending_step import HostCopy, token_logprob
from kvtriton.backend.engine.sampler import Sampler
from kvtriton.backend.engine.sampling_metadata import SamplingMetadata
from kvtriton.backend.engine.scheduler import Scheduler, SchedulerOutput
from kvtriton.backend.engine.sequence import Sequence
from kvtriton.backend.engine.speculative.verification import VerifyRows, accepted_runs
from kvtriton.backend.kernels.device_copy import to_device


class Verifier:
    def __init__(self, scheduler: Scheduler, sampler: Sampler, vocab_size: int, device: torch.device):
        self.scheduler, self.sampler, self.vocab_size, self.device = scheduler, sampler, vocab_size, device
        # Since start: proposals verified, how many of them were accepted, and sequence-steps that verified at
        # least one proposal (vLLM's num_drafts).
        self.num_proposed_tokens = self.num_accepted_tokens = self.num_drafts = 0

    def verify(self, sched: SchedulerOutput, logits: torch.Tensor
               ) -> list[tuple[Sequence, list[int], list[TokenLogprob | None]]]:
        """Sample every verified position, keep each sequence's accepted run, roll back the rest."""
        rows = VerifyRows.build(sched.scheduled, sched.sample_indices)
        if not rows.proposals:
            return []
        meta = SamplingMetadata.build(rows.params, rows.prompt_token_ids, rows.output_token_ids, rows.generators,
                                      rows.stop_token_ids, self.vocab_size, self.device)
        index = to_device(torch.tensor(rows.logits_rows, dtype=torch.int64), self.device)
        out = self.sampler(logits.index_select(0, index)[:, : self.vocab_size], meta)
        sampled, chosen, top_ids, top_lps = HostCopy.start(
            out.sampled_token_ids, out.logprobs, out.top_token_ids, out.top_logprobs).wait()
        spans = accepted_runs(sampled, rows.proposals)
        self.scheduler.rollback_proposals(sched, [n - 1 for _, n in spans])
        runs = []
        for i, props, (first, n) in zip(sched.sample_indices, rows.proposals, spans):
            seq = sched.scheduled[i][0]
            self.num_proposed_tokens += len(props)
            self.num_accepted_tokens += n - 1
            self.num_drafts += bool(props)
            seq.num_spec_proposed_tokens += len(props)
            seq.num_spec_accepted_tokens += n - 1
            lps = [token_logprob(seq, sampled[r], r, chosen, top_ids, top_lps) for r in range(first, first + n)]
            runs.append((seq, sampled[first : first + n], lps))
        return runs
