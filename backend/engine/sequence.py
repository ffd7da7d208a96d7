"""Sequence: one request's state inside the engine.

Owned by the engine thread alone (no locks): other threads only talk to the
engine through its inbox. `token_ids` is prompt + generated tokens;
`num_computed_tokens` says how many of them have K/V in the cache (counting
the step in flight), and
`block_ids` is its block table. In a speculative step `num_computed_tokens` also counts the
proposals being verified; the verification rolls the rejected ones back. The scheduler is their only writer: it
advances them each step, and preemption resets them (recompute), keeping the
generated tokens, so nothing is lost or produced twice.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvtriton.backend.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvtriton.backend.engine.outputs import TokenLogprob
    from kvtriton.backend.engine.structured_output import GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int] = frozenset()  # ends the request ("stop"): stop_token_ids, EOS unless ignore_eos
    arrival_time: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None  # per-request seed: its own RNG stream
    grammar: GrammarMatcher | None = None  # a guided request's position in its grammar (structured_output.py)
    status: SequenceStatus = SequenceStatus.WAITING
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    # Sampled tokens the host has not seen yet (0 or 1): scheduled on, fed to the next step from the device.
    num_placeholders: int = 0
    block_ids: list[int] = field(default_factory=list)  # the block table, in token order
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule
    # The token count at which it ends with "length": prompt + max_tokens, capped at max_model_len (Scheduler.add).
    max_num_tokens: int = 1 << 62
    finish_reason: str | None = None  # set when the scheduler ends it by token ("stop", "length")
    first_token_time: float | None = None
    # Speculative decoding: proposals per step this request may use (0: off), and this step's proposals,
    # scheduled after token_ids and verified by the step (never part of token_ids until accepted).
    num_speculative_tokens: int = 0
    spec_token_ids: list[int] = field(default_factory=list)
    # params.bad_words as token sequences (token_limits.bad_words_token_ids), tokenized once at admission
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # The LoRA adapter its tokens run through, 1-based in EngineConfig.lora_adapters' order (0: the base model).
    lora_adapter: int = 0
    num_spec_proposed_tokens: int = 0  # since arrival
    num_spec_accepted_tokens: int = 0
    # params.prompt_logprobs: the logprob of prompt tokens 1, 2, ... computed so far (token 0 has none). Their
    # positions are computed in order, so the list is always a prefix (a recompute after preemption skips it).
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_total_tokens(self) -> int:
        """Tokens including the placeholders: what the K/V cache will hold once every token is computed."""
        return len(self.token_ids) + self.num_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asked for prompt logprobs and some are still to be computed."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1

    def prompt_logprob_positions(self, start: int, n: int) -> range:
        """The positions of this step's new tokens [start, start + n) whose logits give a prompt logprob still
        missing: position p's logits give token p + 1's."""
        return range(max(start, len(self.prompt_logprobs)), min(start + n, len(self.prompt_token_ids) - 1))

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]


def stop_token_ids(params: SamplingParams, eos_token_ids: frozenset[int]) -> frozenset[int]:
    """The tokens that end a request with "stop": its stop_token_ids, and the model's EOS unless it set ignore_eos."""
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else eos_token_ids)
