"""Structured output: grammar-constrained decoding through llguidance.

A guided request (`SamplingParams.guided_decoding`: a JSON schema, any JSON
object, a regex, a list of choices or a Lark / GBNF grammar) carries a `GrammarMatcher`, its
position in the grammar. Each step the rows of the batch that sample a guided
sequence get the matcher's allowed-token bitmask (one bit per token id,
filled for the whole batch in one call); the sampler masks the logits of every
row in one op (token_bitmask.py); the sampled token then advances the matcher.
EOS is allowed only while the grammar accepts. Once the matcher can take
nothing but EOS, the request ends with "stop" after that token's text, without
spending a step on the EOS.

The overlapped loop (step_executor.py) queues step N+1's forward before the host
has seen step N's tokens, so a guided row's mask for N+1 cannot be known when
N+1 is scheduled. It is not needed then: the engine updates N (the matchers
take N's tokens) before it samples N+1, and builds N+1's bitmask in between,
while the device runs N+1's forward. vLLM's async scheduling does the same
(execute_model without sampling, then get_grammar_bitmask, then
sample_tokens: vllm-project/vllm#26866), and so does SGLang's overlap
scheduler (the forward thread waits on `sampling_info_done`, set once the
previous batch's tokens reached the grammars). No step is made synchronous.

Grammars are compiled on the caller's thread (the request's admission, never
the engine thread) and cached per constraint: a cached one is deep-copied
into each new request's matcher. The llguidance tokenizer is built at start-up
(`warm_up`): its construction holds the GIL (238 ms for the default model's 49k
vocabulary on the 2-core VM), and built on the first guided request it stalled
every stream for that long.

Why llguidance rather than xgrammar: its wheel has no dependencies (xgrammar's
pull in transformers, triton and a tvm runtime, which the serving image does
not otherwise need), it computes masks lazily (no per-schema precompilation
over the vocabulary, so a new schema costs well under a millisecond), and it
takes JSON schemas, regexes, Lark and GBNF grammars; vLLM, SGLang and
TensorRT-LLM all offer it as a backend.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Iterable

import llguidance
import llguidance.numpy
import numpy as np
import torch

from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.token_limits import is_limited, limit_row
from kvtriton.backend.engine.tokenizer import Tokenizer
from kvtriton.backend.kernels.device_copy import to_device

if TYPE_CHECKING:
    from kvtriton.backend.engine.sequence import Sequence

log = logging.getLogger("kvtriton")

# JSON as json.dumps writes it: one line, ", " and ": ". Free whitespace (llguidance's whitespace_flexible)
# lets small models loop on newlines inside an object until max_tokens; a schema's own "x-guidance" wins.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = '{"type": "object"}'
MAX_CACHED_GRAMMARS = 256
_MAX_ERROR_CHARS = 1000


class GrammarMatcher:
    """One request's position in its grammar. Used by the engine thread only."""

    __slots__ = ("_matcher",)

    def __init__(self, matcher: llguidance.LLMatcher):
        self._matcher = matcher

    def accept(self, token_id: int) -> bool:
        """Advance by the sampled token; False if the grammar rejects it (the matcher then stays in error)."""
        return self._matcher.consume_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """Nothing but EOS may follow: the output is complete."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        return _short(self._matcher.get_error())


class StructuredOutputManager:
    """Compiles constraints into matchers (any thread) and fills a batch's bitmask (the engine thread)."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Iterable[int]):
        self._tokenizer = tokenizer
        # EOS ids the tokenizer cannot decode (a padded embedding's) are no tokens for the grammar either.
        self._eos_token_ids = sorted(t for t in eos_token_ids if 0 <= t < tokenizer.vocab_size)
        self._lock = threading.Lock()  # guards the cache and the tokenizer's construction
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], llguidance.LLMatcher] = OrderedDict()
        self._executor: llguidance.LLExecutor | None = None

    def warm_up(self) -> None:
        """Build the llguidance tokenizer now, before any request (see above); a tokenizer llguidance cannot read
        is said here in one line, and each guided request is then refused with the same reason."""
        try:
            self.ll_tokenizer
        except ValueError as exc:
            log.warning("%s; requests with guided_* constraints will be refused", exc)

    def matcher_for(self, params: SamplingParams) -> GrammarMatcher | None:
        """A fresh matcher for the request's constraint (None when it has none). Raises ValueError, naming the
        guided_* key, when the schema, regex or grammar is invalid."""
        constraint = params.guided_decoding
        if constraint is None:
            return None
        with self._lock:
            compiled = self._cache.get(constraint)
            if compiled is not None:
                self._cache.move_to_end(constraint)
        if compiled is None:
            compiled = self._compile(*constraint)  # outside the lock: other requests need not wait for it
            with self._lock:
                self._cache[constraint] = compiled
                while len(self._cache) > MAX_CACHED_GRAMMARS:
                    self._cache.popitem(last=False)
        return GrammarMatcher(compiled.deep_copy())

    def bitmask(self, seqs: list[Sequence], device: torch.device) -> torch.Tensor | None:
        """(B, ceil(V / 32)) int32 on `device`, the step's allowed-token mask: row i allows what seqs[i]'s
        grammar allows, narrowed by its allowed_token_ids and bad_words (token_limits.py); all tokens for a row
        with none of them. None when no row has any (the sampler then does no masking work)."""
        rows = [(seq.grammar._matcher, i) for i, seq in enumerate(seqs)
                if seq.grammar is not None and seq.finish_reason is None]
        limited = [i for i, seq in enumerate(seqs) if is_limited(seq)]
        if not rows and not limited:
            return None
        if rows:
            # llguidance.numpy, not llguidance.torch: the latter runs torch.compile at import (it loads inductor,
            # seconds, and fails inside Triton's Python stub).
            bitmask = llguidance.numpy.allocate_token_bitmask(len(seqs), self.ll_tokenizer.vocab_size)  # all -1
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            # One call for the batch; llguidance releases the GIL and spreads the rows over its threads.
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, rows, bitmask)
        else:  # no grammar: no llguidance tokenizer either (a tokenizer it cannot read still takes the limits)
            bitmask = np.full((len(seqs), -(-self._tokenizer.vocab_size // 32)), -1, dtype=np.int32)
        for i in limited:
            limit_row(bitmask[i], seqs[i])
        return to_device(torch.from_numpy(bitmask), device)  # pinned: no wait for the step in flight

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll_tokenizer is None:
                try:
                    self._ll_tokenizer = llguidance.LLTokenizer(
                        self._tokenizer.to_json(), n_vocab=self._tokenizer.vocab_size,
                        eos_token=self._eos_token_ids or None)
                except Exception as exc:
                    raise ValueError(f"guided decoding is not available for this model's tokenizer: {exc}") from None
            return self._ll_tokenizer

    def _compile(self, kind: str, spec: str) -> llguidance.LLMatcher:
        grammar = _llguidance_grammar(kind, spec)
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"guided_{kind} is invalid: {_short(matcher.get_error())}")
        return matcher


def _llguidance_grammar(kind: str, spec: str) -> str:
    """The constraint as an llguidance grammar; ValueError names the key for a spec that cannot be read."""
    if kind == "json":
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"guided_json is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                             ) from None
        except RecursionError:
            raise ValueError("guided_json is not valid JSON: nested too deeply") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"guided_json must be a JSON schema (an object), got {type(schema).__name__}")
        try:  # llguidance's own reader refuses what Python's accepts, e.g. nesting past its recursion limit
            return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise ValueError(f"guided_json is invalid: {_short(str(exc))}") from None
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    if kind == "choice":  # vLLM's guided_choice: one terminal of string literals (JSON's escapes are Lark's), so
        # one lexer automaton; as a rule of alternatives, 100,000 choices passed llguidance's grammar-symbol limit
        choices = " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(spec))
        return llguidance.grammar_from("lark", f"start: CHOICE\nCHOICE: {choices}")
    if kind == "grammar":
        try:  # Lark as is; GBNF / EBNF (llama.cpp's "root ::= ...") converted to Lark
            return llguidance.grammar_from("grammar", spec)
        except ValueError as exc:
            raise ValueError(f"guided_grammar is invalid: {_short(str(exc))}") from None
    raise AssertionError(f"unknown guided decoding kind {kind!r}")


def _short(message: str) -> str:
    message = message.split("<backtrace>")[0].strip()  # a panic inside llguidance carries its Rust backtrace
    return message if len(message) <= _MAX_ERROR_CHARS else message[:_MAX_ERROR_CHARS] + " ..."
