"""Sampler behaviour on CPU with a tiny vocabulary and random logits."""

import math

import pytest
import torch

from kvtriton.backend.engine import cpu_sampling
from kvtriton.backend.engine.sampler import Sampler, apply_penalties, apply_top_k_top_p
from kvtriton.backend.engine.sampling_metadata import SamplingMetadata
from kvtriton.backend.engine.sampling_params import SamplingParams

V = 32
sampler = Sampler()


def build(params, logits, prompt=None, output=None, generators=None, stops=None):
    batch = len(params)
    return SamplingMetadata.build(
        params,
        prompt if prompt is not None else [[] for _ in range(batch)],
        output if output is not None else [[] for _ in range(batch)],
        generators if generators is not None else [None] * batch,
        stops if stops is not None else [frozenset()] * batch,
        logits.shape[-1], logits.device)


def sample(params, logits, **kw):
    return sampler(logits, build(params, logits, **kw))


def draws(row_logits, params, copies=200, steps=20):
    """Token counts from copies*steps unseeded draws of one logits row."""
    logits = row_logits.expand(copies, -1)  # (copies, V)
    meta = build([params] * copies, logits)
    counts = torch.zeros(row_logits.shape[-1], dtype=torch.long)
    for _ in range(steps):
        counts += torch.bincount(sampler(logits, meta).sampled_token_ids,
                                 minlength=row_logits.shape[-1])
    return counts


def support(counts):
    return set(torch.nonzero(counts).flatten().tolist())


@pytest.fixture(autouse=True)
def fixed_global_rng():
    torch.manual_seed(0)


@pytest.fixture
def staircase():
    """Shuffled logits 0..6 in even steps: every token has a known rank and probability."""
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(7))
    return torch.linspace(0, 6, V)[perm]  # (V,)


def test_greedy_is_argmax():
    logits = torch.randn(6, V)
    out = sample([SamplingParams(temperature=0)] * 6, logits)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_token_ids.dtype == torch.int64


def test_greedy_rows_in_a_mixed_batch_take_the_argmax():
    logits = torch.randn(6, V)
    params = [SamplingParams(temperature=0 if i % 2 == 0 else 1.0) for i in range(6)]
    for _ in range(10):
        out = sample(params, logits).sampled_token_ids
        assert torch.equal(out[::2], logits[::2].argmax(-1))


def test_temperature_to_zero_approaches_greedy():
    logits = torch.randn(8, V)
    logits[torch.arange(8), logits.argmax(-1)] += 1.0  # a gap of >= 1 to the runner-up
    for temperature in (1e-3, 1e-7, 1e-30):  # the last two are the greedy limit
        for _ in range(20):
            out = sample([SamplingParams(temperature=temperature)] * 8, logits)
            assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_top_k_one_is_greedy_at_any_temperature():
    logits = torch.randn(8, V)
    for _ in range(20):
        out = sample([SamplingParams(temperature=2.0, top_k=1)] * 8, logits)
        assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


def test_tiny_top_p_keeps_only_the_max(staircase):
    counts = draws(staircase, SamplingParams(temperature=1.5, top_p=1e-6))
    assert support(counts) == {int(staircase.argmax())}


def test_top_p_always_keeps_one_token_when_one_holds_all_the_mass():
    # float32 cumsum reaches exactly 1 == 1 - 1e-9, so without the guard all would drop.
    logits = torch.zeros(1, V)
    logits[0, 11] = 100.0
    kept = apply_top_k_top_p(logits.clone(), None, torch.tensor([1e-9]))  # (1, V)
    assert torch.isfinite(kept).nonzero()[:, 1].tolist() == [11]
    assert sample([SamplingParams(top_p=1e-9)], logits).sampled_token_ids.tolist() == [11]


def test_min_p_keeps_tokens_within_the_ratio_of_the_top(staircase):
    probs = torch.softmax(staircase.double(), -1)
    expected = set(torch.nonzero(probs >= 0.1 * probs.max()).flatten().tolist())
    assert len(expected) == 12  # logits >= 6 + ln(0.1): the 12 highest steps
    assert support(draws(staircase, SamplingParams(min_p=0.1))) == expected


def test_top_k_keeps_exactly_the_k_largest(staircase):
    expected = set(staircase.topk(5).indices.tolist())
    assert support(draws(staircase, SamplingParams(top_k=5))) == expected


def nucleus(probs, p):
    """Smallest set of largest-probability tokens whose mass reaches p (float64 reference)."""
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(0)
    n = int((mass < p).sum()) + 1
    assert abs(float(mass[n - 1]) - p) > 1e-3, "test logits sit on the top-p boundary"
    return set(order[:n].tolist())


def test_top_p_keeps_the_smallest_set_reaching_p(staircase):
    expected = nucleus(torch.softmax(staircase.double(), -1), 0.6)
    assert 3 <= len(expected) < V
    assert support(draws(staircase, SamplingParams(top_p=0.6))) == expected


def test_top_p_applies_to_the_top_k_renormalised_distribution(staircase):
    top8 = staircase.topk(8).indices
    probs = torch.zeros(V, dtype=torch.float64)
    probs[top8] = torch.softmax(staircase[top8].double(), -1)
    expected = nucleus(probs, 0.5)
    counts = draws(staircase, SamplingParams(top_k=8, top_p=0.5))
    assert support(counts) == expected


def test_each_row_uses_its_own_filters(staircase):
    kinds = [SamplingParams(top_k=3), SamplingParams(top_p=0.6),
             SamplingParams(min_p=0.1), SamplingParams(temperature=0)]
    params = [kinds[i % 4] for i in range(200)]
    logits = staircase.expand(200, -1)  # (200, V)
    meta = build(params, logits)
    seen = [set() for _ in kinds]
    for _ in range(20):
        tokens = sampler(logits, meta).sampled_token_ids.tolist()
        for i, t in enumerate(tokens):
            seen[i % 4].add(t)
    probs = torch.softmax(staircase.double(), -1)
    assert seen[0] == set(staircase.topk(3).indices.tolist())
    assert seen[1] == nucleus(probs, 0.6)
    assert seen[2] == set(torch.nonzero(probs >= 0.1 * probs.max()).flatten().tolist())
    assert seen[3] == {int(staircase.argmax())}


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_sampling_distribution_matches_softmax_over_temperature(temperature):
    vocab, copies, steps = 16, 200, 30  # 6000 draws
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(3)) * 0.8
    counts = draws(row, SamplingParams(temperature=temperature), copies, steps).double()
    expected = torch.softmax(row.double() / temperature, -1) * copies * steps
    assert expected.min() > 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7, f"chi-square {chi2:.1f} over 15 degrees of freedom (p < 0.001)"


def test_penalties_follow_the_formulas():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0],
                           [2.0, -1.0, 0.5, 3.0, -2.0]])
    prompt_mask = torch.tensor([[True, True, False, False, False]] * 2)
    counts = torch.tensor([[0.0, 2.0, 0.0, 1.0, 0.0]] * 2)
    out = apply_penalties(
        logits.clone(), prompt_mask, counts,
        repetition_penalty=torch.tensor([2.0, 1.0]),
        frequency_penalty=torch.tensor([0.5, 0.0]),
        presence_penalty=torch.tensor([0.25, 0.0]))
    # token 0: prompt only, positive -> divided; token 1: prompt+output twice, negative ->
    # multiplied then -0.5*2 -0.25; token 3: output once, positive -> /2 -0.5 -0.25.
    assert torch.allclose(out[0], torch.tensor([1.0, -3.25, 0.5, 0.75, -2.0]))
    assert torch.equal(out[1], logits[1])  # neutral values change nothing


def test_build_counts_tokens_and_ignores_padding():
    params = [SamplingParams(repetition_penalty=1.2, frequency_penalty=0.1),
              SamplingParams()]
    logits = torch.zeros(2, 8)
    meta = build(params, logits, prompt=[[1, 1, 7], []], output=[[2, 2, 2, 7], [0]])
    assert meta.prompt_token_mask.tolist() == [
        [False, True, False, False, False, False, False, True], [False] * 8]
    assert meta.output_token_counts.tolist() == [
        [0, 0, 3, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, 0]]
    assert meta.presence_penalty is None


def test_penalties_steer_sampling():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0] + [-10.0] * 4])
    greedy = SamplingParams(temperature=0, frequency_penalty=1.0)
    out = sample([greedy], logits, output=[[0, 0]])
    assert out.sampled_token_ids.tolist() == [1]  # 5 - 2 < 4
    rep = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample([rep], logits, prompt=[[0]]).sampled_token_ids.tolist() == [1]  # 2.5 < 4


def test_unused_features_are_not_built():
    meta = build([SamplingParams()] * 3, torch.zeros(3, V))
    assert meta.all_random and not meta.all_greedy and meta.greedy_mask is None
    for field in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                  "frequency_penalty", "presence_penalty", "prompt_token_mask",
                  "output_token_counts", "min_tokens_banned", "logit_bias"):
        assert getattr(meta, field) is None, field
    assert meta.generators == {} and meta.max_num_logprobs is None


def test_min_tokens_bans_stop_ids_until_reached():
    eos, stop_id = 7, 9
    logits = torch.zeros(2, V)
    logits[:, eos], logits[:, stop_id], logits[:, 4] = 3.0, 2.0, 1.0
    params = [SamplingParams(temperature=0, min_tokens=3), SamplingParams(temperature=0)]
    stops = [frozenset({eos, stop_id}), frozenset({eos})]
    for produced in range(5):
        output = [[4] * produced, [4] * produced]
        tokens = sample(params, logits, output=output, stops=stops).sampled_token_ids.tolist()
        assert tokens[0] == (4 if produced < 3 else eos)
        assert tokens[1] == eos  # the row without min_tokens is never masked


def test_logit_bias_moves_each_rows_own_tokens():
    logits = torch.zeros(3, V)
    logits[:, 4] = 1.0  # every row's argmax before the bias
    params = [SamplingParams(temperature=0, logit_bias={"9": 2.0}),  # JSON's string keys
              SamplingParams(temperature=0, logit_bias={4: -100.0}),
              SamplingParams(temperature=0)]
    meta = build(params, logits)
    index, bias = meta.logit_bias
    assert sorted(index.tolist()) == [0 * V + 9, 1 * V + 4] and bias.dtype == torch.float32
    tokens = sampler(logits, meta).sampled_token_ids.tolist()
    assert tokens[0] == 9 and tokens[1] != 4 and tokens[2] == 4


def test_logit_bias_of_minus_100_bans_a_token_in_sampling():
    logits = torch.zeros(1, V)
    counts = draws(logits[0], SamplingParams(temperature=1.0, logit_bias={3: -100.0, 5: -100.0}))
    assert counts[3] == 0 and counts[5] == 0 and len(support(counts)) == V - 2


def test_logprobs_are_the_raw_ones_under_logit_bias():
    """As vLLM v1's default: logprobs come before logit processors, so a bias moves the choice, not them."""
    logits = torch.randn(2, V)
    out = sample([SamplingParams(temperature=0, logprobs=2, logit_bias={7: 50.0})] * 2, logits)
    assert out.sampled_token_ids.tolist() == [7, 7]
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1)[:, 7])


def test_min_tokens_rejects_stop_ids_outside_the_vocabulary():
    with pytest.raises(ValueError, match=r"stop_ids_for_min_tokens\[0\].*99"):
        build([SamplingParams(min_tokens=1)], torch.zeros(1, V), stops=[frozenset({99})])


def seeded_run(position, batch, seed=1234, steps=20, global_seed=0):
    """Tokens of the seeded row at `position` over `steps`; the other rows vary freely."""
    torch.manual_seed(global_seed)
    row_logits = torch.randn(steps, V, generator=torch.Generator().manual_seed(5))
    target = SamplingParams(temperature=0.9, top_p=0.95, seed=seed)
    others = [SamplingParams(), SamplingParams(temperature=0), SamplingParams(top_k=4, seed=99),
              SamplingParams(min_p=0.05), SamplingParams(temperature=1.3, presence_penalty=0.5)]
    params = [others[i % len(others)] for i in range(batch)]
    params[position] = target
    generators = [torch.Generator().manual_seed(p.seed) if p.seed is not None else None
                  for p in params]
    tokens = []
    for step in range(steps):
        logits = torch.randn(batch, V) * 2  # (B, V) fresh neighbours each step
        logits[position] = row_logits[step]
        out = sampler(logits, build(params, logits, generators=generators,
                                    output=[[] for _ in params]))
        tokens.append(int(out.sampled_token_ids[position]))
    return tokens


def test_per_request_seed_is_independent_of_the_batch():
    alone = seeded_run(position=0, batch=1)
    assert len(set(alone)) > 3  # genuinely random, not collapsed to greedy
    for position, global_seed in ((0, 1), (3, 2), (7, 3)):
        assert seeded_run(position, batch=8, global_seed=global_seed) == alone
    assert seeded_run(position=0, batch=1, seed=4321) != alone


def test_logprobs_come_from_raw_logits():
    logits = torch.randn(3, V, dtype=torch.bfloat16)
    params = [SamplingParams(temperature=0.8, repetition_penalty=1.5, top_k=5, logprobs=3),
              SamplingParams(),
              SamplingParams(temperature=0, frequency_penalty=2.0, logprobs=0)]
    out = sample(params, logits, prompt=[[1, 2], [], []], output=[[3], [], [4]])
    raw = torch.log_softmax(logits.float(), -1)  # (B, V)
    chosen = raw.gather(1, out.sampled_token_ids.unsqueeze(1)).squeeze(1)
    assert out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs, chosen)
    assert out.top_logprobs.shape == (3, 3) and out.top_token_ids.dtype == torch.int64
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert torch.allclose(out.top_logprobs, raw.topk(3).values)
    assert torch.allclose(raw.gather(1, out.top_token_ids), out.top_logprobs)


def test_logprobs_zero_gives_only_the_chosen_token():
    logits = torch.randn(2, V)
    out = sample([SamplingParams(logprobs=0), SamplingParams()], logits)
    assert out.logprobs.shape == (2,) and out.top_logprobs is None and out.top_token_ids is None
    expected = torch.log_softmax(logits, -1)[0, out.sampled_token_ids[0]]
    assert math.isclose(float(out.logprobs[0]), float(expected), rel_tol=1e-6)


def test_no_logprobs_when_no_row_asks():
    out = sample([SamplingParams()] * 2, torch.randn(2, V))
    assert out.logprobs is None and out.top_logprobs is None and out.top_token_ids is None


def test_caller_logits_are_not_modified():
    logits = torch.randn(4, V)
    before = logits.clone()
    params = [SamplingParams(temperature=0.5, top_k=3, top_p=0.8, min_p=0.1,
                             repetition_penalty=1.3, min_tokens=2)] * 4
    sample(params, logits, prompt=[[1]] * 4, stops=[frozenset({0})] * 4)
    assert torch.equal(logits, before)


def test_build_rejects_mismatched_row_counts():
    with pytest.raises(ValueError, match="output_token_ids has 1 rows but params has 2"):
        SamplingMetadata.build([SamplingParams()] * 2, [[], []], [[]], [None, None],
                               [frozenset()] * 2, V, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_has_no_host_sync_and_seeds_hold():
    dev = torch.device("cuda")
    params = [SamplingParams(temperature=0), SamplingParams(top_p=0.9, seed=3, logprobs=2),
              SamplingParams(top_k=5, repetition_penalty=1.2, min_tokens=3),
              SamplingParams(min_p=0.1, presence_penalty=0.5, frequency_penalty=0.5)]
    logits = torch.randn(4, 1000, device=dev, dtype=torch.bfloat16)

    def step():
        generators = [torch.Generator(device=dev).manual_seed(p.seed)
                      if p.seed is not None else None
                      for p in params]
        meta = SamplingMetadata.build(params, [[1, 2, 3]] * 4, [[4], [5], [6], [7]],
                                      generators, [frozenset({0})] * 4, 1000, dev)
        return sampler(logits, meta)

    expected = step().sampled_token_ids.cpu()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.sampled_token_ids[1].item() == expected[1].item()  # same seed, same token
    assert out.sampled_token_ids[0].item() == int(logits[0].float().argmax())


def test_logits_width_must_match_the_metadata_vocab():
    meta = build([SamplingParams()], torch.zeros(1, V))
    with pytest.raises(ValueError, match=r"shape \(1, 40\).*vocab_size=32"):
        sampler(torch.zeros(1, 40), meta)


@pytest.mark.parametrize("vocab", [300, 49152])
def test_cpu_top_k_top_p_keeps_what_the_sort_keeps(vocab):
    # Rows that the leading candidates decide, rows that need more of the order and rows that need all of it
    # (top_p's mass spreads past the first 256, then past 4,096, of 49,152 logits), side by side and alone: the
    # kept set is the sorting path's, row by row.
    g = torch.Generator().manual_seed(3)
    spread = torch.tensor([4.0, 4.0, 4.0, 4.0, 0.05, 0.05, 0.05, 0.05, 3.0, 2.0]).unsqueeze(1)
    logits = torch.randn(10, vocab, generator=g) * spread  # (10, V)
    top_k = torch.tensor([vocab, 40, 1, vocab, vocab, 40, vocab, 7, vocab, vocab])
    top_p = torch.tensor([0.9, 1.0, 0.5, 1.0, 0.95, 0.8, 1.0, 0.3, 0.9, 0.5])
    expected = torch.isinf(apply_top_k_top_p(logits.clone(), top_k, top_p))
    kept = torch.isinf(cpu_sampling.top_k_top_p_(logits.clone(), top_k, top_p))
    assert torch.equal(kept, expected)
    for row in range(10):  # alone, whatever path its neighbours took
        alone = cpu_sampling.top_k_top_p_(logits[row:row + 1].clone(), top_k[row:row + 1], top_p[row:row + 1])
        assert torch.equal(torch.isinf(alone[0]), expected[row])
    if vocab > cpu_sampling.WIDER[0]:  # each search width decided a row
        first, wider = cpu_sampling.CANDIDATES, cpu_sampling.WIDER[0]
        assert (~kept[0]).sum() <= first < (~kept[8]).sum() <= wider < (~kept[4]).sum()


@pytest.mark.parametrize("top_k", [None, 5])
def test_cpu_top_k_top_p_leaves_a_row_with_no_allowed_token_as_it_is(top_k):
    # A guided_* grammar and allowed_token_ids that share no token leave a row of -inf: the row must come back as
    # it is (its request then ends with the error naming its constraints), the other rows filtered as alone. It
    # had raised an index error that failed every request of the step.
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 300, generator=g) * 3
    logits[1] = float("-inf")
    k = None if top_k is None else torch.tensor([top_k, top_k, 300])
    p = torch.tensor([0.9, 0.9, 0.5])
    got = cpu_sampling.top_k_top_p_(logits.clone(), k, p)
    assert torch.isinf(got[1]).all()
    for row in (0, 2):
        alone = cpu_sampling.top_k_top_p_(logits[row:row + 1].clone(), None if k is None else k[row:row + 1],
                                          p[row:row + 1])
        assert torch.equal(got[row], alone[0])


def test_cpu_draw_never_takes_a_token_of_probability_zero():
    probs = torch.zeros(4, V)
    probs[:, [0, 5, 31]] = torch.tensor([0.2, 0.5, 0.3])
    drawn = torch.cat([cpu_sampling.inverse_cdf_sample(probs, {}) for _ in range(500)])
    assert set(drawn.tolist()) == {0, 5, 31}
    share = torch.bincount(drawn, minlength=V)[[0, 5, 31]].float() / len(drawn)
    assert torch.allclose(share, torch.tensor([0.2, 0.5, 0.3]), atol=0.04)
