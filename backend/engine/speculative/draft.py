"""Draft-model proposer: a second, cheaper model guesses the next k tokens greedily.

The draft runs in the engine's process on the same device, with a runner and a paged KV pool of its own
and a BlockManager over that pool (prefix caching included: a prompt prefix another request already fed
the draft is not fed again). It holds a sequence's K/V for as long as the target runs it: a sequence that
finishes, is aborted or is preempted by the target loses its draft blocks at the next proposal round.

Per round (one verify step): each sequence first feeds the draft the tokens it has not seen (its whole
prompt at first; after a verify step the accepted proposals are already there, so only the tokens from the
first rejected one on), and the logits at its last token give proposal 1; then k - 1 one-token steps give
the rest, each fed the previous step's argmax on the device: the host reads the k proposals once, at the end
of the round, rather than waiting for every step (what made a GPU round several times its kernels' time).
Each step is one batched forward pass of the draft runner over every proposing sequence (on a GPU the
one-token steps replay decode CUDA graphs, and the catch-up of 1 or 2 tokens the verify graphs). K/V of
proposals that the target rejects is dropped the same way as the target's: counts trimmed, never hashed.

The draft proposes its argmax, so the verification's rejection rule sees a point-mass proposal
(verification.py); a draft that samples would need its probabilities kept, for no gain in exactness.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch

from kvtriton.backend.config import SELF_DRAFTS, EngineConfig
from kvtriton.backend.engine.block_manager import BlockManager
from kvtriton.backend.engine.sequence import Sequence, SequenceStatus
from kvtriton.backend.engine.tokenizer import Tokenizer
from kvtriton.backend.kernels.device_copy import to_device
from kvtriton.backend.models.checkpoint import resolve_checkpoint
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.runners.step_input import prepare_step
from kvtriton.backend.runners.torch_runner import TorchRunner

log = logging.getLogger("kvtriton")


@dataclass
class _DraftSequence:
    """A sequence as the draft sees it: what prepare_step reads (ScheduledSequence), and its state."""

    seq: Sequence
    token_ids: list[int] = field(default_factory=list)  # the tokens whose K/V the draft pool holds
    block_ids: list[int] = field(default_factory=list)
    num_verified: int = 0  # leading token_ids known to be the sequence's own (the rest were proposals)
    spec_token_ids: list[int] = field(default_factory=list)  # always empty: the draft verifies nothing
    lora_adapter: int = 0  # the draft proposes as the base model, whatever adapter the request runs through

    @property
    def num_computed_tokens(self) -> int:
        return len(self.token_ids)


class DraftProposer:
    def __init__(self, runner, block_size: int, vocab_size: int, enable_prefix_caching: bool):
        self.runner = runner
        self.block_size, self.vocab_size = block_size, vocab_size
        self.block_manager = BlockManager(runner.num_blocks, block_size, enable_prefix_caching)
        self._states: dict[str, _DraftSequence] = {}

    @classmethod
    def create(cls, config: EngineConfig, target_tokenizer: Tokenizer, num_blocks: int, device: torch.device,
               dtype: torch.dtype, max_model_len: int, vocab_size: int,
               served_quantization: str | None = None) -> "DraftProposer":
        """The draft of config.speculative_model: the served model quantized (self-int8 / self-int4), or a
        checkpoint that must share the served model's tokenizer. Its pool holds `num_blocks`: enough for the
        sequences that may speculate at once (draft_pool_blocks). served_quantization: the served model's
        scheme (None: full precision), to say when a self-draft cannot pay."""
        name = config.speculative_model
        if name in SELF_DRAFTS:
            model, quantization = config.model, SELF_DRAFTS[name]
            if served_quantization is not None:
                # Measured on the default model served in int4 (README "Speculative decoding"): 0.69-0.73x.
                log.warning("speculative_model %s: the served model is already %s, so its own %s weights draft at "
                            "about the cost of a step of the model itself, and k draft steps cost more than the "
                            "tokens they save (expect a slow-down); prompt lookup (speculative_method ngram) or a "
                            "smaller draft checkpoint pays", name, served_quantization, quantization)
        else:
            model, quantization = name, "none"
        folder = resolve_checkpoint(model)
        if name not in SELF_DRAFTS:
            draft_vocab = Tokenizer.from_pretrained(folder).vocab_size
            if draft_vocab != target_tokenizer.vocab_size:
                raise ValueError(f"speculative_model {name}: its tokenizer has {draft_vocab} tokens, the served "
                                 f"model's {target_tokenizer.vocab_size}; a draft must share the tokenizer")
        draft_config = dataclasses.replace(
            config, model=model, quantization=quantization, num_kv_blocks=num_blocks, speculative_method="none",
            speculative_model="", num_speculative_tokens=0,
            lora_modules="")  # the draft proposes as the base model: its proposals are verified with the adapter
        model_config = ModelConfig.from_pretrained(folder)
        # The torch runner (speculation needs it, EngineConfig checks): after a verify step the draft catches up
        # on 1 or 2 tokens per sequence (the correction, or the last proposal and the bonus), which replays its
        # verify graphs of the target's width.
        runner = TorchRunner(draft_config, model_config, str(folder), device, dtype, max_model_len,
                             verify_width=config.num_speculative_tokens + 1)
        log.info("speculative draft: %s (%s), %d KV blocks", name, quantization, runner.num_blocks)
        return cls(runner, config.block_size, min(vocab_size, model_config.vocab_size), config.enable_prefix_caching)

    def close(self) -> None:
        self.runner.close()

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        self._release_stopped()
        rows = [self._catch_up(seq) for seq in seqs]
        # Round 1: every token the draft has not seen, logits at the last one. One-token rows go first, as
        # prepare_step and the runners expect of a step (the decode group).
        unseen = {i: len(row.seq.token_ids) - len(row.token_ids) for i, row in enumerate(rows) if row is not None}
        active = sorted(unseen, key=lambda i: unseen[i] != 1)
        scheduled = []
        for i in active:
            row = rows[i]
            row.token_ids += row.seq.token_ids[len(row.token_ids):]
            row.num_verified = len(row.token_ids)
            scheduled.append((row, unseen[i]))
        # Rounds 2..k feed each the proposal just made, which stays on the device: the host prepares the
        # next step while the device runs this one, and reads every proposal once, at the end.
        rounds: list[tuple[list[int], torch.Tensor]] = []  # (sequences, their proposal) per round
        made = [0] * len(seqs)
        while scheduled:
            step = prepare_step(scheduled, self.block_size, self.runner.device)
            if rounds:
                step.input_ids.copy_(self._previous_proposals(rounds[-1], active))
            logits = self.runner.execute(step)
            rounds.append((active, logits[:, : self.vocab_size].argmax(dim=-1)))
            for i in active:
                made[i] += 1
            active = [i for i in active if made[i] < ks[i] and self._grow(rows[i], made[i])]
            scheduled = []
            for i in active:
                rows[i].token_ids.append(0)  # the proposal just made; its value is set once it is read
                scheduled.append((rows[i], 1))
        proposals: list[list[int]] = [[] for _ in seqs]
        if rounds:
            tokens = iter(torch.cat([t for _, t in rounds]).tolist())
            for members, _ in rounds:
                for i in members:
                    proposals[i].append(next(tokens))
        for row, props in zip(rows, proposals):
            if len(props) > 1:  # every proposal but the last was fed to the draft
                row.token_ids[-(len(props) - 1):] = props[:-1]
        return proposals

    def _previous_proposals(self, previous: tuple[list[int], torch.Tensor], active: list[int]) -> torch.Tensor:
        """The last round's proposals (on the device) of the sequences in `active`, in its order."""
        members, tokens = previous
        if members == active:
            return tokens
        where = {i: j for j, i in enumerate(members)}
        index = torch.tensor([where[i] for i in active], dtype=torch.int64)
        return tokens.index_select(0, to_device(index, self.runner.device))

    def _catch_up(self, seq: Sequence) -> _DraftSequence | None:
        """The sequence's draft state with slots for the tokens it has not fed yet; None when the pool is
        full (no proposal this round)."""
        bm, rid = self.block_manager, seq.request_id
        row = self._states.get(rid)
        if row is None:
            hits, num_cached = bm.get_computed_blocks(seq.token_ids)
            ids = bm.allocate_slots(rid, seq.token_ids, num_cached, len(seq.token_ids) - num_cached, hits or None)
            if ids is None:
                return None
            row = self._states[rid] = _DraftSequence(seq, seq.token_ids[:num_cached],
                                                     [b.block_id for b in hits] + ids, num_cached)
            return row
        # Keep the K/V of the proposals the target accepted (and at least the last token to feed again).
        keep, last = row.num_verified, len(seq.token_ids) - 1
        while keep < min(len(row.token_ids), last) and row.token_ids[keep] == seq.token_ids[keep]:
            keep += 1
        del row.token_ids[keep:]
        row.block_ids = bm.trim(rid, keep)
        ids = bm.allocate_slots(rid, seq.token_ids, keep, len(seq.token_ids) - keep)
        if ids is None:
            self._release(rid)
            return None
        row.block_ids += ids
        return row

    def _grow(self, row: _DraftSequence, num_proposals: int) -> bool:
        """A slot for feeding the newest proposal; False when the pool is full (the proposals stop there)."""
        ids = self.block_manager.allocate_slots(row.seq.request_id, row.seq.token_ids, len(row.token_ids), 1,
                                                num_placeholders=num_proposals)
        if ids is None:
            return False
        row.block_ids += ids
        return True

    def _release_stopped(self) -> None:
        """Drop the draft state of sequences the target no longer runs (finished, aborted, preempted)."""
        for rid in [rid for rid, row in self._states.items() if row.seq.status is not SequenceStatus.RUNNING]:
            self._release(rid)

    def _release(self, rid: str) -> None:
        del self._states[rid]
        self.block_manager.free(rid)


def draft_pool_blocks(config: EngineConfig, target_blocks: int, max_model_len: int) -> int:
    """The draft's KV pool: a full-length context for every sequence that may speculate in one step (below
    speculative_disable_by_batch_size, at most max_num_seqs), never more than the target's pool. It is
    allocated beside the target's, which on a GPU took its share of memory first, so it stays small."""
    seqs = min(config.speculative_disable_by_batch_size or config.max_num_seqs, config.max_num_seqs)
    return min(target_blocks, seqs * -(-max_model_len // config.block_size))
