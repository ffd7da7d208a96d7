"""Batched on-device sampler: one token per scheduled sequence per step.

The whole batch is processed with tensor ops on the logits' device; nothing
here reads a tensor value back to the host, so the engine's single
`.tolist()` on the result is the step's only device->host sync. Which
features run is decided on the host from the requests' `SamplingParams`
(flags in `SamplingMetadata`), so a batch that uses no penalty, no top-k and
no logprobs pays for none of them.

Order of operations (as vLLM v1): grammar bitmask (structured output) ->
raw logprobs -> logit_bias -> min_tokens mask -> repetition / presence /
frequency penalties -> greedy argmax | temperature -> min_p -> top_k ->
top_p -> exponential-race sample. On a CPU, top-k / top-p and the draw take
cpu_sampling.py's forms (same semantics, a fraction of the time; a CPU has no
device to sync with).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtriton.backend.engine.cpu_sampling import inverse_cdf_sample, top_k_top_p_
from kvtriton.backend.engine.sampling_metadata import SamplingMetadata
from kvtriton.backend.engine.token_bitmask import apply_token_bitmask_


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # (B,) i64
    logprobs: torch.Tensor | None  # (B,) f32 raw logprob of the sampled token
    # Rows that asked for fewer than N (or none) slice their own prefix on the host.
    top_logprobs: torch.Tensor | None  # (B, N) f32, descending; N = max asked
    top_token_ids: torch.Tensor | None  # (B, N) i64


class Sampler:
    # On a CPU, cpu_sampling.py's forms of top-k / top-p and the draw; False: the device path's there too (the
    # baseline of benchmarks/sampling_bench.py).
    cpu_forms = True

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[1] != meta.vocab_size:
            raise ValueError(
                f"logits have shape {tuple(logits.shape)} but the sampling metadata was "
                f"built for vocab_size={meta.vocab_size}; build it with logits.shape[-1]")
        if (meta.all_greedy and meta.allowed_token_bitmask is None and meta.max_num_logprobs is None
                and meta.min_tokens_banned is None and meta.output_token_counts is None
                and meta.logit_bias is None):
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

        if meta.logit_bias is not None:  # after the raw logprobs, before penalties, as vLLM v1
            index, bias = meta.logit_bias
            logits.view(-1).index_add_(0, index, bias)
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

    def _sample_random(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Sample every row from its processed distribution; modifies `logits`."""
        if meta.temperature is not None:
            logits.div_(meta.temperature.unsqueeze(1))  # (B, V)
        if meta.min_p is not None:
            logits = apply_min_p(logits, meta.min_p)
        # On a CPU sorting and per-token noise cost most of a small model's step (cpu_sampling.py).
        on_cpu = logits.device.type == "cpu" and self.cpu_forms
        if meta.top_k is not None or meta.top_p is not None:
            filters = top_k_top_p_ if on_cpu else apply_top_k_top_p
            logits = filters(logits, meta.top_k, meta.top_p)
        probs = torch.softmax(logits, dim=-1)  # (B, V)
        return inverse_cdf_sample(probs, meta.generators) if on_cpu else exponential_race(probs, meta.generators)


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
