"""Batched on-device sampler: one token per scheduled sequence per step.

The whole batch is processed with tensor ops on the logits' device; nothing
here reads a tensor value back to the host, so the engine's single
`.tolist()` on the result is the step's only device->host sync. Which
features run is decided on the host from the requests' `SamplingParams`
(flags in `SamplingMetadata`), so a batch that uses no penalty, no top-k and
no logprobs pays for none of them.

Order of operations (as vLLM v1): grammar bitmask (structured output) ->
raw logprobs -> min_tokens mask -> repetition / presence / frequency
penalties -> greedy argmax | temperature -> min_p -> top_k -> top_p ->
exponential-race sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.token_bitmask import apply_token_bitmask_
from kvtriton.backend.kernels.device_copy import to_device


@dataclass
class SamplingMetadata:
    """Per-step view of the batch's sampling needs; row i is sequence i.

    A tensor field is None when no row uses that feature. Tensors live on the
    logits' device. Greedy rows hold temperature 1 so the random path never
    divides by zero; their random sample is discarded.
    """

    all_greedy: bool
    all_random: bool
    greedy_mask: torch.Tensor | None  # (B,) bool; None when all_greedy or all_random
    temperature: torch.Tensor | None  # (B,) f32; None when every random row has T = 1
    top_k: torch.Tensor | None  # (B,) i64; rows without top-k hold V
    top_p: torch.Tensor | None  # (B,) f32
    min_p: torch.Tensor | None  # (B,) f32
    repetition_penalty: torch.Tensor | None  # (B,) f32
    frequency_penalty: torch.Tensor | None  # (B,) f32
    presence_penalty: torch.Tensor | None  # (B,) f32
    prompt_token_mask: torch.Tensor | None  # (B, V) bool; set with repetition_penalty
    output_token_counts: torch.Tensor | None  # (B, V) f32; set with any penalty
    # (M,) i64 flat indices row * V + token of stop ids banned by min_tokens
    min_tokens_banned: torch.Tensor | None
    generators: dict[int, torch.Generator]  # random rows with a per-request seed
    max_num_logprobs: int | None  # None: no row asked for logprobs
    vocab_size: int  # V that the ids and flat indices above were built for
    # (B, ceil(V / 32)) int32: the tokens each row's grammar allows (token_bitmask.py); None: no guided row.
    # Set by the engine after build(), once the previous step's tokens have advanced the grammars.
    allowed_token_bitmask: torch.Tensor | None = None

    @property
    def outlives_step(self) -> bool:
        """True when nothing here moves with the rows' outputs (penalty counts, a min_tokens ban, which only
        ever shrinks): the next step over the same rows may reuse it."""
        return self.output_token_counts is None and self.min_tokens_banned is None

    @property
    def counts_move_alone(self) -> bool:
        """True when the penalty counts are the one thing here that moves with the rows' outputs: the next step
        over the same rows may reuse it once `count_new_tokens` has added the tokens sampled meanwhile."""
        return self.output_token_counts is not None and self.min_tokens_banned is None

    def count_new_tokens(self, token_ids: torch.Tensor) -> None:
        """Row i has sampled token_ids[i] (B,) since: its output counts take it, in place on the device, where
        a rebuild would copy every row's prompt and output again (vLLM's persistent batch keeps its penalty
        counts the same way). Stream order puts this after the sampling that read the counts before."""
        ids = token_ids.view(-1, 1)  # int64 on the counts' device: the sampler's argmax / sample
        self.output_token_counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[Sequence[int]],
        output_token_ids: list[Sequence[int]],
        generators: list[torch.Generator | None],
        stop_ids_for_min_tokens: list[frozenset[int]],
        vocab_size: int,
        device: torch.device | str,
    ) -> SamplingMetadata:
        """Gather the step's sampling inputs onto `device`.

        `generators[i]` must live on `device`; it is advanced only when row i
        samples randomly. Token id rows may be lists or numpy int64 arrays;
        pass arrays for long prompts (a list costs ~40 ns a token per step).
        """
        device = torch.device(device)
        batch = len(params)
        for name, seq in (("prompt_token_ids", prompt_token_ids),
                          ("output_token_ids", output_token_ids),
                          ("generators", generators),
                          ("stop_ids_for_min_tokens", stop_ids_for_min_tokens)):
            if len(seq) != batch:
                raise ValueError(f"{name} has {len(seq)} rows but params has {batch}")
        greedy = [p.is_greedy for p in params]
        random_rows = [p for p, g in zip(params, greedy) if not g]
        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        use_freq = any(p.frequency_penalty != 0.0 for p in params)
        use_pres = any(p.presence_penalty != 0.0 for p in params)

        if all(greedy) and not (use_rep or use_freq or use_pres):
            # The common serving batch (greedy, no penalty) needs no per-row scalar on the device.
            temperature = top_k = top_p = min_p = rep = freq = pres = greedy_f = None
        else:
            # One host->device copy for all per-row scalars; columns are sliced on device.
            columns = np.array([[
                1.0 if g else p.temperature,
                min(p.top_k, vocab_size) if p.top_k > 0 else vocab_size,
                p.top_p, p.min_p,
                p.repetition_penalty, p.frequency_penalty, p.presence_penalty,
                float(g),
            ] for p, g in zip(params, greedy)], dtype=np.float32).reshape(batch, 8)
            table = _to_device(columns, device)  # (B, 8)
            (temperature, top_k, top_p, min_p, rep, freq, pres, greedy_f) = table.unbind(1)
        prompt_mask = output_counts = None
        if use_rep or use_freq or use_pres:
            prompt_mask, output_counts = _token_occurrences(
                prompt_token_ids if use_rep else None, output_token_ids, vocab_size, device)

        ban: list[int] = []  # flat (row, token) indices into the (B, V) logits
        for row, (p, out, stops) in enumerate(
                zip(params, output_token_ids, stop_ids_for_min_tokens)):
            if p.min_tokens and len(out) < p.min_tokens:
                for t in stops:
                    if not 0 <= t < vocab_size:
                        raise ValueError(
                            f"stop_ids_for_min_tokens[{row}] holds {t}, outside the "
                            f"vocabulary [0, {vocab_size})")
                    ban.append(row * vocab_size + t)

        seeded: dict[int, torch.Generator] = {}
        for row, (gen, g) in enumerate(zip(generators, greedy)):
            if gen is None or g:
                continue
            if torch.device(gen.device).type != device.type:
                raise ValueError(
                    f"generators[{row}] is on {gen.device} but the logits are on "
                    f"{device}; create it with torch.Generator(device=...)")
            seeded[row] = gen

        asked = [p.logprobs for p in params if p.logprobs is not None]
        all_greedy, all_random = all(greedy), not any(greedy)
        return cls(
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=None if all_greedy or all_random else greedy_f.bool(),
            temperature=(temperature if any(p.temperature != 1.0 for p in random_rows)
                         else None),
            top_k=(top_k.long() if any(0 < p.top_k < vocab_size for p in random_rows)
                   else None),
            top_p=top_p if any(p.top_p < 1.0 for p in random_rows) else None,
            min_p=min_p if any(p.min_p > 0.0 for p in random_rows) else None,
            repetition_penalty=rep if use_rep else None,
            frequency_penalty=freq if use_freq else None,
            presence_penalty=pres if use_pres else None,
            prompt_token_mask=prompt_mask,
            output_token_counts=output_counts,
            min_tokens_banned=(_to_device(np.array(ban, dtype=np.int64), device)
                               if ban else None),
            generators=seeded,
            max_num_logprobs=max(asked) if asked else None,
            vocab_size=vocab_size,
        )


def _token_occurrences(
    prompt_token_ids: list[Sequence[int]] | None,
    output_token_ids: list[Sequence[int]],
    vocab_size: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Prompt presence mask and output counts, built on device with one copy.

    Ids are padded with `vocab_size`, which lands in a spare column that is
    dropped, so padding never counts as a token.
    """
    batch = len(output_token_ids)
    out_len = max((len(t) for t in output_token_ids), default=0)
    prompt_len = max((len(t) for t in prompt_token_ids), default=0) if prompt_token_ids else 0
    ids = np.full((batch, prompt_len + out_len), vocab_size, dtype=np.int64)
    for row in range(batch):
        if prompt_token_ids is not None:
            ids[row, :len(prompt_token_ids[row])] = prompt_token_ids[row]
        ids[row, prompt_len:prompt_len + len(output_token_ids[row])] = output_token_ids[row]
    ids_d = _to_device(ids, device)  # (B, Lp + Lo)
    prompt_ids, out_ids = ids_d[:, :prompt_len], ids_d[:, prompt_len:]

    counts = torch.zeros(batch, vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=torch.float32))
    prompt_mask = None
    if prompt_token_ids is not None:
        prompt_mask = torch.zeros(batch, vocab_size + 1, dtype=torch.bool, device=device)
        prompt_mask.scatter_(1, prompt_ids, True)
        prompt_mask = prompt_mask[:, :vocab_size]  # (B, V)
    return prompt_mask, counts[:, :vocab_size]  # (B, V)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # Through pinned memory: a pageable copy would wait for the GPU work already queued (the forward).
    return to_device(torch.from_numpy(np.ascontiguousarray(array)), device)


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # (B,) i64
    logprobs: torch.Tensor | None  # (B,) f32 raw logprob of the sampled token
    # Rows that asked for fewer than N (or none) slice their own prefix on the host.
    top_logprobs: torch.Tensor | None  # (B, N) f32, descending; N = max asked
    top_token_ids: torch.Tensor | None  # (B, N) i64


class Sampler:
    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[1] != meta.vocab_size:
            raise ValueError(
                f"logits have shape {tuple(logits.shape)} but the sampling metadata was "
                f"built for vocab_size={meta.vocab_size}; build it with logits.shape[-1]")
        if (meta.all_greedy and meta.allowed_token_bitmask is None and meta.max_num_logprobs is None
                and meta.min_tokens_banned is None and meta.output_token_counts is None):
            # Plain greedy, the common serving batch: nothing changes the logits, so argmax reads them as they
            # are (one kernel a step instead of a copy of the (B, V) logits and then the argmax).
            return SamplerOutput(logits.argmax(dim=-1), None, None, None)
        # Work on a float32 copy: the caller's logits stay untouched.
        logits = logits.to(torch.float32, copy=True)  # (B, V)
        if meta.allowed_token_bitmask is not None:
            # First, as vLLM: every later step (logprobs included) sees the constrained distribution.
            apply_token_bitmask_(logits, meta.allowed_token_bitmask)
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # (B, V)

        if meta.min_tokens_banned is not None:
            # index_fill_ with a Python scalar: advanced-index assignment would copy
            # the value host->device and synchronise.
            logits.view(-1).index_fill_(0, meta.min_tokens_banned, float("-inf"))
        if meta.output_token_counts is not None:
            logits = apply_penalties(
                logits, meta.prompt_token_mask, meta.output_token_counts,
                meta.repetition_penalty, meta.frequency_penalty, meta.presence_penalty)

        if meta.all_greedy:
            sampled = logits.argmax(dim=-1)  # (B,)
        elif meta.all_random:
            sampled = self._sample_random(logits, meta)  # (B,)
        else:
            # Greedy rows take the argmax of the penalised logits, before temperature.
            greedy = logits.argmax(dim=-1)  # (B,)
            sampled = torch.where(meta.greedy_mask, greedy, self._sample_random(logits, meta))

        out = SamplerOutput(sampled, None, None, None)
        if raw_logprobs is not None:
            out.logprobs = raw_logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)  # (B,)
            if meta.max_num_logprobs > 0:
                top = raw_logprobs.topk(meta.max_num_logprobs, dim=-1)  # (B, N)
                out.top_logprobs, out.top_token_ids = top.values, top.indices
        return out

    @staticmethod
    def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Sample every row from its processed distribution; modifies `logits`."""
        if meta.temperature is not None:
            logits.div_(meta.temperature.unsqueeze(1))  # (B, V)
        if meta.min_p is not None:
            logits = apply_min_p(logits, meta.min_p)
        if meta.top_k is not None or meta.top_p is not None:
            logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
        probs = torch.softmax(logits, dim=-1)  # (B, V)
        return exponential_race(probs, meta.generators)


def apply_penalties(
    logits: torch.Tensor,  # (B, V) f32, modified in place
    prompt_token_mask: torch.Tensor | None,  # (B, V) bool; needed for repetition
    output_token_counts: torch.Tensor,  # (B, V) f32
    repetition_penalty: torch.Tensor | None,  # (B,)
    frequency_penalty: torch.Tensor | None,  # (B,)
    presence_penalty: torch.Tensor | None,  # (B,)
) -> torch.Tensor:
    """HF/vLLM repetition penalty over prompt+output; OpenAI presence/frequency over output."""
    seen_in_output = output_token_counts > 0  # (B, V)
    if repetition_penalty is not None:
        seen = prompt_token_mask | seen_in_output  # (B, V)
        r = repetition_penalty.unsqueeze(1).expand_as(logits)  # (B, V)
        # Dividing positive and multiplying negative logits both make a seen token less likely.
        penalised = torch.where(logits > 0, logits / r, logits * r)  # (B, V)
        logits = torch.where(seen, penalised, logits)
    if frequency_penalty is not None:
        logits -= frequency_penalty.unsqueeze(1) * output_token_counts
    if presence_penalty is not None:
        logits -= presence_penalty.unsqueeze(1) * seen_in_output
    return logits


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # (B, 1)
    return logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor,  # (B, V), modified in place
    top_k: torch.Tensor | None,  # (B,) i64 in [1, V]; V = off
    top_p: torch.Tensor | None,  # (B,) f32 in (0, 1]; 1 = off
) -> torch.Tensor:
    """Keep each row's k largest logits, then the smallest set with mass >= p.

    top-p is measured on the distribution renormalised after top-k (vLLM's
    order). Both masks always keep the row's largest logit.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=False, stable=True)  # (B, V)
    if top_k is not None:
        # Ascending order: the k kept tokens are the last k positions.
        positions = torch.arange(vocab, device=logits.device)  # (V,)
        drop = positions.unsqueeze(0) < (vocab - top_k).unsqueeze(1)  # (B, V)
        sorted_logits.masked_fill_(drop, float("-inf"))
    if top_p is not None:
        sorted_probs = torch.softmax(sorted_logits, dim=-1)  # (B, V)
        mass_below = sorted_probs.cumsum(dim=-1)  # (B, V)
        drop = mass_below <= (1 - top_p).unsqueeze(1)  # (B, V)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, sorted_logits)


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """argmax(p / q), q ~ Exp(1), draws index i with probability p_i (no sync).

    Seeded rows draw their own q from their generator, so a row's token depends
    only on its logits and its seed, not on its batch neighbours.
    """
    q = torch.empty_like(probs)  # (B, V)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)
    return probs.div_(q).argmax(dim=-1)  # (B,)
