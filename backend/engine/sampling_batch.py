"""SamplingBatch: the sampling metadata of a step's sample rows, kept while the same rows come back.

A steady decode batch samples the same sequences in the same rows step after step. Rebuilding their
SamplingMetadata each step would copy every row's parameters (with penalties, its prompt and output too)
to the device again; vLLM keeps its sampling tensors in a persistent batch for the same reason.
"""

from __future__ import annotations

import torch

from kvtriton.backend.engine.pending_step import PendingStep
from kvtriton.backend.engine.sampling_metadata import SamplingMetadata
from kvtriton.backend.engine.scheduler import SchedulerOutput
from kvtriton.backend.engine.sequence import Sequence
from kvtriton.backend.engine.structured_output import StructuredOutputManager
from kvtriton.backend.runners.decode_inputs import same_rows


class SamplingBatch:
    def __init__(self, structured_output: StructuredOutputManager, vocab_size: int, device: torch.device):
        self.structured_output, self.vocab_size, self.device = structured_output, vocab_size, device
        # The last step's sample rows, its sampling metadata and their output tokens then.
        self.last: tuple[list[Sequence], SamplingMetadata, int] | None = None

    def metadata(self, sched: SchedulerOutput, previous: PendingStep | None) -> SamplingMetadata | None:
        """previous: the step whose tokens the host has just taken (None if none)."""
        seqs = sched.sampled_seqs
        if not seqs:
            return None
        # The same sequences in the same rows as the step before (a steady decode batch), and nothing in its
        # metadata that moves with their outputs: that step's metadata serves again, with no per-row work.
        # Penalty counts move by the one token each row has sampled since: added on the device from that
        # step's tokens.
        last = self.last
        steady = last is not None and same_rows(last[0], seqs)
        if steady and last[1].outlives_step:
            meta, num_outputs = last[1], last[2]
        else:
            num_outputs = sum(s.num_output_tokens for s in seqs)
            # Counts may move on only if each row took exactly the one token `previous` sampled for it.
            if (steady and last[1].counts_move_alone and num_outputs == last[2] + len(seqs)
                    and previous is not None and same_rows(previous.sched.sampled_seqs, seqs)):
                meta = last[1]
                meta.count_new_tokens(previous.token_ids)
            else:
                meta = SamplingMetadata.build(
                    [s.params for s in seqs], [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs],
                    [s.generator for s in seqs], [s.stop_token_ids for s in seqs], self.vocab_size, self.device,
                )
        self.last = seqs, meta, num_outputs
        # After the previous step's update, so guided rows' grammars have taken every token before this one.
        meta.allowed_token_bitmask = self.structured_output.bitmask(seqs, self.device)
        return meta
