"""PendingStep: a step whose sampling is queued on the device and whose tokens the host has not seen yet.

The overlapped loop (step_executor.py) samples step N+1 before the host has read step N's tokens. Those
tokens stay on the device, where they fill step N+1's placeholders (`feed`), and travel to pinned host
memory (HostCopy) without blocking: the host waits for them only when it updates the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtriton.backend.engine.outputs import TokenLogprob
from kvtriton.backend.engine.scheduler import SchedulerOutput
from kvtriton.backend.engine.sequence import Sequence
from kvtriton.backend.kernels.device_copy import to_device
from kvtriton.backend.runners.decode_inputs import same_rows
from kvtriton.backend.runners.step_input import StepInput


@dataclass
class HostCopy:
    """Device tensors on their way into pinned host memory; `wait()` blocks on this copy only, not on
    work queued after it."""

    tensors: list[torch.Tensor | None]
    done: torch.cuda.Event | None

    @classmethod
    def start(cls, *tensors: torch.Tensor | None) -> "HostCopy":
        if not any(t is not None and t.is_cuda for t in tensors):
            return cls(list(tensors), None)
        host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in tensors]
        done = torch.cuda.Event()
        done.record()
        return cls(host, done)

    def wait(self) -> list:
        if self.done is not None:
            self.done.synchronize()
        return [None if t is None else t.tolist() for t in self.tensors]


def token_logprob(seq: Sequence, token_id: int, row: int, chosen, top_ids, top_lps) -> TokenLogprob | None:
    """Row `row` of a step's sampled logprobs on the host (HostCopy.wait()), as far as `seq` asked for them."""
    n = seq.params.logprobs
    if n is None or chosen is None:
        return None
    return TokenLogprob.from_rows(token_id, row, n, chosen, top_ids, top_lps)


@dataclass
class PendingStep:
    """A step whose sampling is queued: `token_ids` (B,) stay on the device to feed the next step."""

    sched: SchedulerOutput
    token_ids: torch.Tensor
    host: HostCopy

    def feed(self, step: StepInput, scheduled: list[tuple[Sequence, int]], device: torch.device) -> None:
        """Fill the next step's placeholders (`step` is its input, `scheduled` its sequences) with this
        step's tokens, on the device."""
        before = self.sched.sampled_seqs
        if len(step.placeholders) == step.input_ids.shape[0] and same_rows(before, [s for s, _ in scheduled]):
            # A steady decode batch: token j is row j's, sampled in row j of the step before.
            step.input_ids.copy_(self.token_ids)
            return
        source = {seq.request_id: j for j, seq in enumerate(before)}
        positions = [position for position, _ in step.placeholders]
        rows = [source[scheduled[row][0].request_id] for _, row in step.placeholders]
        index = to_device(torch.tensor([positions, rows], dtype=torch.int64), device)
        step.input_ids.index_copy_(0, index[0], self.token_ids.index_select(0, index[1]))
