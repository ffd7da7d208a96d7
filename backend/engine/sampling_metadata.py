"""SamplingMetadata: a batch's sampling parameters as device tensors, built once from the requests'
`SamplingParams` and token histories, with flags that tell the Sampler which features the batch uses.

Built on the host with one copy to the device per tensor (through pinned memory, so that a copy never
waits for the forward pass queued before it); a steady batch keeps its metadata from step to step
(sampling_batch.py), moving only the penalty counts by the tokens just sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from kvtriton.backend.engine.sampling_params import SamplingParams
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
    # logit_bias: (M,) i64 flat indices row * V + token and (M,) f32 biases; None when no row has one
    logit_bias: tuple[torch.Tensor, torch.Tensor] | None
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

        biased = [(row * vocab_size + t, b) for row, p in enumerate(params) for t, b in p.logit_bias]
        if any(t >= vocab_size for p in params for t, _ in p.logit_bias):  # its flat index would hit the next row
            raise ValueError(f"logit_bias holds a token id outside the vocabulary [0, {vocab_size})")
        logit_bias = None
        if biased:  # one copy of (2, M): float64 holds the flat indices exactly
            table = _to_device(np.array(biased, dtype=np.float64).T.copy(), device)
            logit_bias = table[0].long(), table[1].float()

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
            logit_bias=logit_bias,
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
