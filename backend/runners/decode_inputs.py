"""DecodeInputs: a decode batch's step inputs, kept and updated in place from one step to the next.

After vLLM's persistent batch (InputBatch, and its block table kept in numpy): in a steady decode batch,
the same sequences in the same rows as the step before with one new token each, a row's position, slot
and context length move on by one token a step, and its block table only grows, by one block every
block_size steps. prepare_step rebuilds them from Python lists, a few microseconds a row (80 us for 64 rows
on a 2-core EPYC). Here they live in numpy arrays: positions and context lengths come from one read of the
sequences' counters, slots from one gather in the table, and only the table rows that grew are rewritten.
The step's inputs reach the device in one copy from a pinned buffer that is reused: two, alternating, each
rewritten only once the copy that last read it has run (its event).

It serves decode-only steps whose every input token is still on the device (async scheduling's steady
state: each row's token comes from the step in flight). Any other step (a prefill, a verify, tokens the
host knows) returns None: the caller builds it with prepare_step.

Invariant: `_rows` are the sequences of the last step built here, in row order, and `_tables[i, :_lens[i]]`
is row i's block table as that step saw it.
"""

from __future__ import annotations

import functools
import operator
from typing import Sequence

import numpy as np
import torch

from kvtriton.backend.models.lora import StepAdapters
from kvtriton.backend.runners.step_input import ScheduledSequence, StepInput, unpack_step

_num_computed_tokens = operator.attrgetter("num_computed_tokens")


def same_rows(before: Sequence, now: Sequence) -> bool:
    """The same sequence objects in the same rows: a steady batch, whose per-row step state carries over."""
    return len(before) == len(now) and all(map(operator.is_, before, now))


@functools.lru_cache(maxsize=None)
def _batch_constants(b: int) -> tuple[np.ndarray, list[int], list[tuple[int, int]]]:
    """What every steady step of b rows shares, built once and only read: the row indices, the query lengths (one
    token a row) and the placeholders (row i's token is the one sampled in row i)."""
    rows = np.arange(b)
    rows.flags.writeable = False
    return rows, [1] * b, [(i, i) for i in range(b)]


class DecodeInputs:
    def __init__(self, block_size: int, device: torch.device | str):
        self.block_size = block_size
        self.device = torch.device(device)
        self._rows: list[ScheduledSequence] = []
        self._tables = np.zeros((0, 0), dtype=np.int64)
        self._lens = np.zeros(0, dtype=np.int64)
        self._starts = np.zeros(0, dtype=np.int64)  # each row's position in the last step
        self._adapters = np.zeros(0, dtype=np.int64)  # each row's LoRA adapter (0: the base model)
        # Pinned staging buffers and the event of the copy that last read each (CUDA only).
        self._staging: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0

    def step(self, scheduled: Sequence[tuple[ScheduledSequence, int]]) -> StepInput | None:
        """The inputs of a decode step whose tokens all come from the device, else None (the kept rows are then
        forgotten: the next decode step rewrites every table row)."""
        b = len(scheduled)
        seqs = [seq for seq, _ in scheduled]
        starts = np.fromiter(map(_num_computed_tokens, seqs), dtype=np.int64, count=b) - 1
        bs = self.block_size
        blocks = starts // bs  # each row's slot's index in its table
        # Each row's token must be one the host does not know yet: a verify step takes the step in flight's tokens
        # before it schedules, so the last overlapped step's rows, one token further, may come with host tokens.
        known = np.fromiter((len(seq.token_ids) for seq in seqs), dtype=np.int64, count=b)
        if not (starts >= known).all():
            self._rows = []
            return None
        if same_rows(self._rows, seqs) and (starts == self._starts + 1).all():
            # The last step's rows, one token on each: still decodes of device tokens. Tables only grow in
            # a decode, so the rows to update are those whose new slot is past the table kept for them.
            grown = np.flatnonzero(blocks >= self._lens[:b])
            if len(grown):
                self._append_blocks(seqs, grown)
        elif self._one_token_each(scheduled):
            self._write_tables(seqs, range(b))
            self._adapters = np.fromiter((seq.lora_adapter for seq in seqs), dtype=np.int64, count=b)
        else:
            self._rows = []
            return None
        if (blocks >= self._lens[:b]).any():  # a slot past a row's table: prepare_step names the row
            self._rows = []
            return None
        self._rows, self._starts = seqs, starts
        rows, ones, placeholders = _batch_constants(b)
        slots = self._tables[rows, blocks] * bs + starts % bs
        context_lens = starts + 1
        width = int(self._lens[:b].max())
        adapted = bool(self._adapters.any())  # the rows' adapters ride in the same copy, after the tables
        host = np.concatenate([np.zeros(b, dtype=np.int64), starts, slots, context_lens, rows,
                               self._tables[:b, :width].reshape(-1), self._adapters if adapted else rows[:0]])
        device = self._to_device(host)
        tables_end = 5 * b + b * width
        step = unpack_step(device[: 5 * b], device[5 * b : tables_end].view(b, width), b, b, ones,
                           context_lens.tolist(), -(-int(context_lens.max()) // bs))
        step.placeholders = placeholders
        step.adapters = StepAdapters.of_rows(device[tables_end:], self._adapters.tolist()) if adapted else None
        return step

    @staticmethod
    def _one_token_each(scheduled: Sequence[tuple[ScheduledSequence, int]]) -> bool:
        """Every row a one-token decode, without proposals."""
        return bool(scheduled) and not any(n != 1 or seq.spec_token_ids for seq, n in scheduled)

    def _append_blocks(self, seqs: list[ScheduledSequence], rows: np.ndarray) -> None:
        """The tables of `rows` grew since the last step: in a decode by the one block that the new slot opened,
        written for all of them at once (sequences of equal lengths all cross a block boundary in the same step:
        one write per row cost a 64-row step 66 us on the 2-core VM). A row that grew otherwise is rewritten."""
        tables = [seqs[i].block_ids for i in rows.tolist()]
        sizes = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
        kept = self._lens[rows]
        if (sizes == kept + 1).all() and sizes.max() <= self._tables.shape[1]:
            self._tables[rows, kept] = [table[-1] for table in tables]
            self._lens[rows] = sizes
        else:
            self._write_tables(seqs, rows)

    def _write_tables(self, seqs: list[ScheduledSequence], rows) -> None:
        """Copy the block tables of `rows` (indices into seqs) into the kept ones, growing those as needed."""
        b = len(seqs)
        if b > self._tables.shape[0]:
            self._tables = np.pad(self._tables, ((0, b - self._tables.shape[0]), (0, 0)))
            self._lens = np.pad(self._lens, (0, b - len(self._lens)))
        for i in rows:
            table = seqs[i].block_ids
            if len(table) > self._tables.shape[1]:
                self._tables = np.pad(self._tables, ((0, 0), (0, max(len(table), 2 * self._tables.shape[1]))))
            self._tables[i, : len(table)] = table
            self._tables[i, len(table):] = 0  # padding as prepare_step's (a row may have held a longer table)
            self._lens[i] = len(table)

    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        """One copy to the device. On CUDA through a reused pinned buffer: a copy from pageable memory would make
        the host wait for the step in flight (see kernels/device_copy.py)."""
        if self.device.type != "cuda":
            return torch.from_numpy(host).to(self.device)  # a fresh tensor: the forward thread may still read the last
        turn, self._turn = self._turn, 1 - self._turn
        staging = self._staging[turn]
        if staging is not None:
            self._copied[turn].synchronize()  # the copy two steps ago: it has long run, this returns at once
        if staging is None or staging.numel() < host.size:
            staging = self._staging[turn] = torch.empty(max(host.size, 4096), dtype=torch.int64, pin_memory=True)
            self._copied[turn] = torch.cuda.Event()
        staging.numpy()[: host.size] = host
        device = torch.empty(host.size, dtype=torch.int64, device=self.device)
        device.copy_(staging[: host.size], non_blocking=True)
        self._copied[turn].record()  # right after each copy from this buffer, so the wait above covers it
        return device
