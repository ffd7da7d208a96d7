"""Speculative decoding: the verify step, its rollback, the proposers, exactness and the target's distribution.

Fast tests run a tiny random Llama on the CPU (tests/tiny_model.py); the `slow` ones run the default model
(SmolLM2-135M-Instruct, fp32) and check greedy output token for token against the plain engine's."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.block_manager import BlockManager, hash_block_tokens
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.speculative.ngram import lookup
from kvtriton.backend.engine.speculative.verification import accepted_runs

from tests.test_block_manager import check_invariants
from tests.tiny_model import make_tiny_engine

pytest.importorskip("transformers")


# ---- units ---------------------------------------------------------------------------------------
def test_ngram_lookup_takes_the_longest_most_recent_match():
    tokens = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert lookup(tokens, 1, 4, 3) == [7, 8, 5]  # "2 3" last seen before "7 8 5"
    assert lookup(tokens, 1, 1, 2) == [7, 8]  # "3": most recent earlier occurrence
    assert lookup(np.array([4, 5, 6]), 1, 3, 2) == []  # nothing repeats
    assert lookup(np.array([1, 2, 1]), 1, 2, 5) == [2, 1]  # the continuation runs to the end


def test_ngram_lookup_agrees_with_its_definition_on_random_texts():
    def by_definition(tokens, min_n, max_n, k):  # every window, longest n first, the latest start
        t = tokens.tolist()
        for n in range(min(max_n, len(t) - 1), min_n - 1, -1):
            starts = [s for s in range(len(t) - n) if t[s : s + n] == t[len(t) - n :]]
            if starts:
                return t[starts[-1] + n : starts[-1] + n + k]
        return []

    rng = np.random.default_rng(0)
    for _ in range(3000):
        tokens = rng.integers(0, int(rng.integers(1, 6)), int(rng.integers(0, 40)))
        min_n = int(rng.integers(1, 4))
        max_n, k = int(rng.integers(min_n, 7)), int(rng.integers(0, 6))
        assert lookup(tokens, min_n, max_n, k) == by_definition(tokens, min_n, max_n, k), (tokens, min_n, max_n, k)


def test_accepted_runs_stop_at_the_first_mismatch():
    # Sampled rows of two sequences: proposals [5, 6, 7] (row tokens 5 6 9 4) and [] (row token 3).
    assert accepted_runs([5, 6, 9, 4, 3], [[5, 6, 7], []]) == [(0, 3), (4, 1)]
    assert accepted_runs([5, 6, 7, 4], [[5, 6, 7]]) == [(0, 4)]  # all accepted: the bonus token too
    assert accepted_runs([1, 6], [[5]]) == [(0, 1)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(speculative_method="medusa"), "speculative_method must be one of"),
    (dict(speculative_method="ngram"), "num_speculative_tokens >= 1"),
    (dict(speculative_method="draft", num_speculative_tokens=3), "needs speculative_model"),
    (dict(speculative_method="ngram", num_speculative_tokens=3, runner="onnxruntime"),
     "speculative decoding runs on the torch runner"),
    (dict(num_speculative_tokens=3), "need speculative_method ngram or draft"),
    (dict(speculative_method="ngram", num_speculative_tokens=99), "num_speculative_tokens must be in"),
    (dict(speculative_method="ngram", num_speculative_tokens=2, prompt_lookup_min=3, prompt_lookup_max=2),
     "prompt_lookup_min"),
])
def test_config_refuses_bad_speculation_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_proposal_cap_tapers_k_with_the_batch():
    from kvtriton.backend.engine.speculative.policy import proposal_cap

    config = EngineConfig(model="x", speculative_method="ngram", num_speculative_tokens=4,
                          speculative_disable_by_batch_size=8)
    assert [proposal_cap(config, n) for n in range(1, 10)] == [4, 4, 3, 3, 2, 2, 1, 0, 0]
    never = EngineConfig(model="x", speculative_method="ngram", num_speculative_tokens=4,
                         speculative_disable_by_batch_size=0)
    assert proposal_cap(never, 200) == 4
    assert proposal_cap(EngineConfig(model="x"), 1) == 0


def test_config_pbtxt_style_parameters():
    cfg = EngineConfig.from_mapping({"speculative_method": "draft", "speculative_model": "self-int8",
                                     "num_speculative_tokens": "4", "speculative_disable_by_batch_size": "0"})
    assert (cfg.speculative_method, cfg.speculative_model, cfg.num_speculative_tokens) == ("draft", "self-int8", 4)
    with pytest.raises(ValueError, match="num_speculative_tokens must be >= 0"):
        SamplingParams(num_speculative_tokens=-1)
    assert SamplingParams.from_dict({"num_speculative_tokens": "2"}).num_speculative_tokens == 2


def test_trim_frees_only_unhashed_tail_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = list(range(9))
    # 9 known tokens + 4 proposals: 13 slots, 4 blocks; the first two (8 known tokens) are hashed.
    assert bm.allocate_slots("a", tokens, 0, 13, num_placeholders=4) is not None
    check_invariants(bm)
    assert len(bm.block_table("a")) == 4 and bm.num_free_blocks == 4
    assert bm.trim("a", 10) == bm.block_table("a") and len(bm.block_table("a")) == 3
    check_invariants(bm)
    assert bm.num_free_blocks == 5
    with pytest.raises(ValueError, match="hashed for prefix reuse"):
        bm.trim("a", 7)


# ---- the engine on a tiny model ---------------------------------------------------------------------
def prompts(n=12):
    words = "the quick brown fox jumps over the lazy dog the quick brown fox".split()
    return [" ".join(words[: 2 + (i * 5) % len(words)]) * (1 + i % 3) for i in range(n)]


def check_hashes_cover_known_tokens(engine: LLMEngine) -> None:
    """Every prefix-cache hash a running sequence holds is the chained hash of its own known tokens: none
    covers a proposal (rejected or not yet verified)."""
    bm = engine.block_manager
    for seq in engine.scheduler.running:
        parent = None
        for i, h in enumerate(bm._seq_hashes.get(seq.request_id, [])):
            parent = hash_block_tokens(parent, seq.token_ids[i * bm.block_size:(i + 1) * bm.block_size])
            assert h == parent, seq.request_id


def run_stepwise(engine: LLMEngine, prompt_list, params) -> list[list[int]]:
    """Drive the loop by hand, checking the block managers' invariants after every step."""
    params = params if isinstance(params, list) else [params] * len(prompt_list)
    streams = [engine.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompt_list, params))]
    draft = getattr(engine.proposer, "block_manager", None)
    while engine.has_work():
        engine.step()
        check_invariants(engine.block_manager)
        check_hashes_cover_known_tokens(engine)
        for seq in engine.scheduler.running:  # rolled back exactly: the table covers the computed tokens
            if seq.num_placeholders == 0:
                assert len(seq.block_ids) == engine.block_manager.num_blocks_needed(seq.num_computed_tokens)
        if draft is not None:
            check_invariants(draft)
    assert engine.block_manager.usage == 0.0
    return [s.result().token_ids for s in streams]


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def plain_greedy(tiny_folder):
    engine = make_tiny_engine(tiny_folder)
    try:
        return run_stepwise(engine, prompts(), GREEDY)
    finally:
        engine.shutdown()


class NoisyProposer:
    """Wraps a real proposer and replaces each proposed token by a random one with probability 0.3, so that
    runs are cut at every length and rollbacks (of the target, and of the draft's own pool) happen often."""

    def __init__(self, inner, vocab_size: int):
        self.inner, self.vocab_size = inner, vocab_size
        self.block_manager = getattr(inner, "block_manager", None)
        self.rng = np.random.default_rng(0)

    def propose(self, seqs, ks):
        return [[int(self.rng.integers(self.vocab_size)) if self.rng.random() < 0.3 else t for t in tokens]
                for tokens in self.inner.propose(seqs, ks)]

    def close(self):
        self.inner.close()


@pytest.mark.parametrize("overrides", [
    dict(speculative_method="ngram", num_speculative_tokens=3),
    dict(speculative_method="ngram", num_speculative_tokens=5, prompt_lookup_min=2, prompt_lookup_max=3),
    dict(speculative_method="draft", speculative_model="self-int8", num_speculative_tokens=4),
    # A pool too small for the load: preemption by recompute, of the target and of the draft.
    dict(speculative_method="draft", speculative_model="self-int8", num_speculative_tokens=4, num_kv_blocks=24,
         max_num_batched_tokens=16),
    dict(speculative_method="ngram", num_speculative_tokens=4, enable_prefix_caching=False),
    # The served checkpoint as its own draft: every proposal is the target's own greedy token.
    dict(speculative_method="draft", speculative_model="tiny", num_speculative_tokens=3),
    # A token budget smaller than the proposals: some sequences wait a step, and with the back-off at 6
    # running, verify steps and overlapped steps alternate.
    dict(speculative_method="ngram", num_speculative_tokens=4, max_num_batched_tokens=10,
         speculative_disable_by_batch_size=6),
])
@pytest.mark.parametrize("noisy", [False, True])
def test_greedy_equals_plain_and_blocks_stay_exact(tiny_folder, plain_greedy, overrides, noisy):
    same_model = overrides.get("speculative_model") == "tiny"
    if same_model:
        overrides = {**overrides, "speculative_model": str(tiny_folder)}
    engine = make_tiny_engine(tiny_folder, **{"speculative_disable_by_batch_size": 0, **overrides})
    if noisy:
        engine.proposer = NoisyProposer(engine.proposer, engine._sample_vocab)
    try:
        assert run_stepwise(engine, prompts(), GREEDY) == plain_greedy
        stats = engine.stats()
        assert stats.num_spec_proposed_tokens > 0 and stats.num_spec_accepted_tokens > 0
        if noisy:
            assert stats.num_spec_accepted_tokens < 0.9 * stats.num_spec_proposed_tokens  # rollbacks happened
        elif same_model:
            assert stats.num_spec_accepted_tokens == stats.num_spec_proposed_tokens
        if "num_kv_blocks" in overrides:
            assert stats.num_preemptions > 0
    finally:
        engine.shutdown()


class CorruptLast:
    """Wraps a proposer whose proposals are the target's own greedy tokens and, every other time, makes the
    last one wrong: only that one is rejected, so the draft's next round mixes sequences with one unseen token
    and sequences with two."""

    def __init__(self, inner, vocab_size: int):
        self.inner, self.vocab_size, self.corrupted, self.calls = inner, vocab_size, 0, 0
        self.block_manager = inner.block_manager

    def propose(self, seqs, ks):
        out = self.inner.propose(seqs, ks)
        for tokens in out:
            self.calls += 1
            if tokens and self.calls % 2:
                tokens[-1] = (tokens[-1] + 1) % self.vocab_size
                self.corrupted += 1
        return out

    def close(self):
        self.inner.close()


def test_same_model_draft_proposes_the_target_tokens(tiny_folder, plain_greedy):
    """The served checkpoint as its own draft proposes exactly the target's greedy tokens, whatever mix of
    catch-up lengths a round holds: every proposal that was not corrupted on purpose is accepted."""
    engine = make_tiny_engine(tiny_folder, speculative_disable_by_batch_size=0, speculative_method="draft",
                         speculative_model=str(tiny_folder), num_speculative_tokens=3)
    engine.proposer = proposer = CorruptLast(engine.proposer, engine._sample_vocab)
    try:
        lengths = [24 - i for i in range(12)]  # staggered ends
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
        assert run_stepwise(engine, prompts(), params) == [want[:n] for want, n in zip(plain_greedy, lengths)]
        stats = engine.stats()
        assert proposer.corrupted > 10
        assert stats.num_spec_accepted_tokens == stats.num_spec_proposed_tokens - proposer.corrupted
    finally:
        engine.shutdown()


def test_an_accepted_run_reaches_the_client_as_one_output(tiny_folder, plain_greedy):
    """A verify step's accepted run is one output (one streamed response through Triton, not one per token),
    carrying the run's tokens and text; the counts stay cumulative."""
    engine = make_tiny_engine(tiny_folder, speculative_disable_by_batch_size=0, speculative_method="draft",
                              speculative_model=str(tiny_folder), num_speculative_tokens=3)
    try:
        stream = engine.add_request("run", prompts()[0], GREEDY)
        while engine.has_work():
            engine.step()
        outputs = list(stream)
        assert [t for o in outputs for t in o.token_ids] == plain_greedy[0]
        assert max(len(o.token_ids) for o in outputs) == 4  # three proposals accepted, then the bonus token
        assert len(outputs) < len(plain_greedy[0])
        assert [o.num_output_tokens for o in outputs] == list(itertools.accumulate(len(o.token_ids) for o in outputs))
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    finally:
        engine.shutdown()


def test_arrivals_switch_verify_steps_to_overlapped_ones(tiny_folder, plain_greedy):
    """Three requests speculate under a budget that fits two verifies a step; then three more arrive, the
    back-off turns speculation off and the next step is an overlapped one: no proposal left over from the
    verify step may reach it."""
    engine = make_tiny_engine(tiny_folder, speculative_method="ngram", num_speculative_tokens=4,
                         max_num_batched_tokens=10, speculative_disable_by_batch_size=4)
    try:
        streams = [engine.add_request(f"a{i}", p, GREEDY) for i, p in enumerate(prompts(6)[:3])]
        for _ in range(12):
            engine.step()
        assert engine.stats().num_spec_proposed_tokens > 0
        streams += [engine.add_request(f"b{i}", p, GREEDY) for i, p in enumerate(prompts(6)[3:])]
        while engine.has_work():
            engine.step()
            check_invariants(engine.block_manager)
        assert [s.result().token_ids for s in streams] == plain_greedy[:6]
    finally:
        engine.shutdown()


def test_back_off_and_per_request_switch(tiny_folder, plain_greedy):
    # 12 requests that end one after the other, back-off at 4 running: the crowded steps run without proposals
    # (overlapped, with tokens in flight), the last ones with.
    engine = make_tiny_engine(tiny_folder, speculative_method="ngram", num_speculative_tokens=3,
                         speculative_disable_by_batch_size=4)
    lengths = [2 + 2 * i for i in range(12)]
    try:
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
        got = run_stepwise(engine, prompts(), params)
        assert got == [want[:n] for want, n in zip(plain_greedy, lengths)]
        proposed = engine.stats().num_spec_proposed_tokens
        assert 0 < proposed <= 3 * (24 - 18)  # only the last 3 requests speculated, in their last 6 tokens
    finally:
        engine.shutdown()
    engine = make_tiny_engine(tiny_folder, speculative_method="ngram", num_speculative_tokens=3,
                         speculative_disable_by_batch_size=0)
    try:
        off = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, num_speculative_tokens=0)
        assert run_stepwise(engine, prompts(), off) == plain_greedy
        assert engine.stats().num_spec_proposed_tokens == 0
        with pytest.raises(ValueError, match="more than this model allows"):
            engine.add_request("x", "hi", SamplingParams(num_speculative_tokens=4))
    finally:
        engine.shutdown()


def test_seeded_sampling_is_reproducible(tiny_folder):
    params = [SamplingParams(temperature=0.8, top_k=20, max_tokens=20, ignore_eos=True, seed=i) for i in range(6)]
    runs = []
    for _ in range(2):
        engine = make_tiny_engine(tiny_folder, speculative_method="draft", speculative_model="self-int8",
                             num_speculative_tokens=3, speculative_disable_by_batch_size=0)
        try:
            streams = [engine.add_request(f"s{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts(6), params))]
            while engine.has_work():
                engine.step()
            runs.append([s.result().token_ids for s in streams])
        finally:
            engine.shutdown()
    assert runs[0] == runs[1]


def chi_square_quantile(df: int, p: float = 0.999) -> float:
    """Wilson-Hilferty: the p-quantile of a chi-square distribution with df degrees of freedom."""
    z = {0.999: 3.0902}[p]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def sample_pairs(engine: LLMEngine, n: int, params: dict) -> Counter:
    """The first two generated tokens of n seeded requests on one prompt: the second comes out of a verify
    step whenever the first was sampled by one."""
    prompt = "the quick brown fox"
    streams = [engine.add_request(f"q{i}", prompt, SamplingParams(max_tokens=3, ignore_eos=True, seed=i, **params))
               for i in range(n)]
    engine.start()
    return Counter(tuple(s.result().token_ids[1:3]) for s in streams)


def test_rejection_sampling_keeps_the_target_distribution(tiny_folder):
    """Tokens 2 and 3 of 3,000 seeded requests, with and without speculation (a self-int8 draft whose
    argmax is accepted about half of the time: the random model's logits are sharp, temperature 12 spreads
    them), compared by Pearson's chi-square test of
    homogeneity over the pairs seen at least 10 times in total (rare pairs pooled in one cell). Tolerance:
    the statistic stays below the chi-square 99.9% quantile; a false failure is a 1-in-1,000 event, and the
    seeds make the test deterministic."""
    n, params = 3000, dict(temperature=12.0, top_k=6)
    counts = []
    for overrides in (dict(), dict(speculative_method="draft", speculative_model="self-int8",
                                   num_speculative_tokens=2, speculative_disable_by_batch_size=0)):
        engine = make_tiny_engine(tiny_folder, max_num_seqs=64, max_num_waiting=0, **overrides)
        try:
            counts.append(sample_pairs(engine, n, params))
            stats = engine.stats()
        finally:
            engine.shutdown()
    plain, spec = counts
    common = [k for k in set(plain) | set(spec) if plain[k] + spec[k] >= 10]
    cells = [(plain[k], spec[k]) for k in common]
    cells.append((n - sum(a for a, _ in cells), n - sum(b for _, b in cells)))
    cells = [c for c in cells if sum(c) > 0]
    stat = sum((a - b) ** 2 / (a + b) for a, b in cells)  # equal sample sizes: the two-sample chi-square
    assert len(cells) > 10
    assert stat < chi_square_quantile(len(cells) - 1), (stat, len(cells))
    rate = stats.num_spec_accepted_tokens / stats.num_spec_proposed_tokens
    assert 0.15 < rate < 0.9, rate  # both accepting and rejecting were exercised


# ---- exactness on the default model (slow) ---------------------------------------------------------------
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QUESTIONS = [
    "Repeat this paragraph with one word changed: The river runs past the old mill, under the stone bridge, "
    "and on to the sea, where the fishing boats wait for the morning tide.",
    "What is the capital of France?", "List the days of the week.", "Write a haiku about autumn leaves.",
    "Count from 1 to 30, separated by commas.", "Say hello.", "Explain what a hash table is in two sentences.",
    "Copy this code: def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b",
]


def default_params():
    """Greedy, with the stop rules that can land inside an accepted run: EOS (ignore_eos false), stop
    strings, max_tokens, min_tokens."""
    return [
        SamplingParams(temperature=0, max_tokens=96),
        SamplingParams(temperature=0, max_tokens=40, stop=["Paris"]),
        SamplingParams(temperature=0, max_tokens=64, stop=["Friday"]),
        SamplingParams(temperature=0, max_tokens=13),
        SamplingParams(temperature=0, max_tokens=80, stop=[", 17"]),
        SamplingParams(temperature=0, max_tokens=30, min_tokens=12),
        SamplingParams(temperature=0, max_tokens=50),
        SamplingParams(temperature=0, max_tokens=70, stop=["sub"]),
    ]


def generate_all(engine: LLMEngine, copies: int = 2):
    """Every question `copies` times at once (prefix-cache hits between copies), each with its params."""
    engine.start()
    streams = [engine.add_request(f"d{c}-{i}", CHAT.format(q), p) for c in range(copies)
               for i, (q, p) in enumerate(zip(QUESTIONS, default_params()))]
    return [(out.token_ids, out.text, out.finish_reason) for out in (s.result() for s in streams)]


@pytest.fixture(scope="module")
def default_plain(default_model_folder):
    engine = LLMEngine(EngineConfig(quantization="none", device="cpu", speculative_method="none"))
    try:
        return generate_all(engine)
    finally:
        engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("method, model", [
    ("ngram", ""), ("draft", "self-int8"), ("draft", "self-int4"), ("draft", "folder"),
])
def test_default_model_greedy_is_identical(default_model_folder, default_plain, method, model):
    model = str(default_model_folder) if model == "folder" else model
    engine = LLMEngine(EngineConfig(quantization="none", device="cpu", speculative_method=method,
                                    speculative_model=model, num_speculative_tokens=4,
                                    speculative_disable_by_batch_size=0))
    try:
        got = generate_all(engine)
        stats = engine.stats()
    finally:
        engine.shutdown()
    for (want_ids, want_text, want_reason), (ids, text, reason) in zip(default_plain, got):
        assert (ids, text, reason) == (want_ids, want_text, want_reason)
    reasons = {r for _, _, r in got}
    assert reasons == {"stop", "length"}  # EOS / stop strings and max_tokens both ended requests
    assert stats.num_spec_accepted_tokens > 0
    if method == "draft":  # the served model's own weights (or itself) guess well
        assert stats.num_spec_accepted_tokens > 0.5 * stats.num_spec_proposed_tokens


# ---- the GPU path (the lead runs these on the H200) ---------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("method, model", [("ngram", ""), ("draft", "folder")])
def test_cuda_greedy_agrees_with_plain(default_model_folder, method, model):
    """On CUDA, bf16: verify steps (their CUDA graphs: k + 1 rows per sequence, plain decodes padded beside
    them) agree with plain decoding within test_engine_gpu.py's near-tie tolerance; the draft (the default
    model itself) runs its one-token rounds through its own CUDA graphs."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from tests.test_engine_gpu import PARAMS, assert_greedy_agrees, prompts

    model = str(default_model_folder) if model == "folder" else model
    base = dict(model=str(default_model_folder), device="cuda", dtype="bfloat16", max_model_len=2048)
    plain = LLMEngine(EngineConfig(**base)).start()
    try:
        reference = plain.generate(prompts(plain), PARAMS)
    finally:
        plain.shutdown()
    engine = LLMEngine(EngineConfig(**base, speculative_method=method, speculative_model=model,
                                    num_speculative_tokens=4, speculative_disable_by_batch_size=0)).start()
    runner = engine.runner
    assert runner.verify_width == 5 and runner.verify_batch_sizes, "verify steps have CUDA graphs"
    replays = []
    replay = runner._replay_verify
    runner._replay_verify = lambda step: replays.append(step.num_seqs) or replay(step)
    try:
        assert_greedy_agrees(reference, engine.generate(prompts(engine), PARAMS))
        assert engine.stats().num_spec_accepted_tokens > 0 and engine.stats().kv_usage == 0.0
        assert replays, "no verify step replayed a CUDA graph"
    finally:
        engine.shutdown()


def test_a_self_draft_of_a_model_served_quantized_is_said_not_to_pay(tiny_folder, caplog):
    """A self-int8 draft of a model served in int4 costs a step as long as the model's own: said at load."""
    with caplog.at_level("WARNING", logger="kvtriton"):
        engine = make_tiny_engine(tiny_folder, quantization="int4", speculative_method="draft",
                                  speculative_model="self-int8", num_speculative_tokens=2)
    engine.shutdown()
    assert any("the served model is already int4" in r.getMessage() and "ngram" in r.getMessage()
               for r in caplog.records)
