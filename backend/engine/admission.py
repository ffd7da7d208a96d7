"""Admission: what makes a request impossible to run, found before it reaches the engine loop.

Everything here is checked on the caller's thread (Triton's execute()), so a
bad request gets its error at once and never touches engine state. The
limits come from the loaded model and KV pool; an engine in a child process
sends them to its handle (EngineProcess), which admits requests the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.stop_strings import check_stop_strings
from kvtriton.backend.engine.token_limits import check_bad_words
from kvtriton.backend.engine.tokenizer import Tokenizer

# Bytes of prompt text per token of context beyond which a prompt cannot fit (max_prompt_bytes = 0).
PROMPT_BYTES_PER_TOKEN = 64


@dataclass(frozen=True)
class AdmissionLimits:
    max_model_len: int
    vocab_size: int  # ids the sampler may produce and prompts may hold: [0, vocab_size)
    num_kv_blocks: int
    block_size: int
    max_prompt_bytes: int  # UTF-8 bytes of prompt text, checked before tokenizing
    num_speculative_tokens: int = 0  # the most a request may ask for (the server's k; 0: speculation off)
    # Why this engine cannot return prompt logprobs ("": it can): only the torch runner on one device computes
    # the logits of every prompt token; the exported graphs and the tensor-parallel step give one row a sequence.
    prompt_logprobs_refusal: str = ""
    scheduling_policy: str = "fcfs"  # EngineConfig.scheduling_policy: under fcfs a request's priority must be 0
    lora_names: tuple[str, ...] = ()  # the LoRA adapters a request may name (EngineConfig.lora_adapters' order)


class Admission:
    def __init__(self, tokenizer: Tokenizer, limits: AdmissionLimits):
        self.tokenizer, self.limits = tokenizer, limits

    def admit(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """The prompt's token ids; ValueError with a user-facing message for a request that can never run."""
        check_stop_strings(params.stop)
        check_bad_words(params.bad_words)
        ids = self.tokenize(prompt)
        if (k := params.truncate_prompt_tokens) is not None:  # vLLM's: the last k tokens, cut from the left
            ids = ids[-(self.limits.max_model_len if k == -1 else k):]
        self.check_ids(ids, params)
        return ids

    def tokenize(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        """The prompt's token ids as a generation gets them: text encoded with the tokenizer's special tokens, a
        rendered chat (`chat`) without them (Tokenizer.encode_chat_prompt), ids as they are. ValueError for text
        over max_prompt_bytes or an id outside the model's vocabulary (checked here only, for every prompt)."""
        if not isinstance(prompt, str):
            return self._in_vocabulary(list(prompt), "prompt token ids")
        limit = self.limits.max_prompt_bytes
        if len(prompt) > limit // 4:  # no UTF-8 character is over 4 bytes
            size = len(prompt.encode("utf-8", errors="surrogatepass"))
            if size > limit:
                raise ValueError(f"prompt must be at most {limit} bytes (max_prompt_bytes; the model's context is "
                                 f"{self.limits.max_model_len} tokens), got {size}")
        ids = self.tokenizer.encode_chat_prompt(prompt) if chat else self.tokenizer.encode(prompt)
        return self._in_vocabulary(ids, "prompt token ids")  # a tokenizer may know more ids than the model has

    def detokenize(self, ids: list[int]) -> str:
        """The text of ids, special tokens included (vLLM's /detokenize, HF's decode default)."""
        return self.tokenizer.decode(self._in_vocabulary(ids, "token ids"), skip_special_tokens=False)

    def _in_vocabulary(self, ids: list[int], what: str) -> list[int]:
        vocab = self.limits.vocab_size
        if ids and (min(ids) < 0 or max(ids) >= vocab):  # two C-level scans: prompts run to thousands of ids
            raise ValueError(f"{what} must be in [0, {vocab})")
        return ids

    def check_ids(self, ids: list[int], params: SamplingParams) -> None:
        lim = self.limits
        if not ids:
            raise ValueError("prompt is empty")
        vocab = lim.vocab_size
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {list(params.stop_token_ids)}")
        outside = [t for t, _ in params.logit_bias if t >= vocab]
        if outside:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}), got {outside[:8]}")
        if params.allowed_token_ids and params.allowed_token_ids[-1] >= vocab:  # sorted
            raise ValueError(f"allowed_token_ids must be in [0, {vocab}), got {params.allowed_token_ids[-1]}")
        if len(ids) >= lim.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but the model's context is {lim.max_model_len} tokens")
        total = len(ids) + params.max_tokens
        if total > lim.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the model's "
                f"context of {lim.max_model_len} tokens; lower max_tokens"
            )
        if params.prompt_logprobs is not None and lim.prompt_logprobs_refusal:
            raise ValueError(f"prompt_logprobs is not available here: {lim.prompt_logprobs_refusal}")
        if params.priority and lim.scheduling_policy != "priority":
            raise ValueError(f"priority {params.priority} needs scheduling_policy priority; this model schedules "
                             f"{lim.scheduling_policy} (first come, first served), where only priority 0 is accepted")
        if params.lora_name is not None and params.lora_name not in lim.lora_names:
            served = f"this model serves {', '.join(lim.lora_names)}" if lim.lora_names else \
                "this model serves none (its lora_modules setting is empty)"
            raise ValueError(f"lora_name {params.lora_name!r} is not a LoRA adapter of this model; {served}")
        k = params.num_speculative_tokens
        if k is not None and k > lim.num_speculative_tokens:
            raise ValueError(f"num_speculative_tokens {k} is more than this model allows "
                             f"({lim.num_speculative_tokens}: its num_speculative_tokens setting)")
        if -(-total // lim.block_size) > lim.num_kv_blocks:
            raise ValueError(
                f"prompt + max_tokens = {total} tokens needs more KV blocks than the whole pool holds "
                f"({lim.num_kv_blocks} blocks of {lim.block_size}); lower max_tokens"
            )
