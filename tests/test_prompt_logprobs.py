"""Prompt logprobs in the engine, on a tiny random Llama against HF transformers' own forward pass: each prompt
token's logprob given the ones before it and the top N there, however the prompt is chunked, beside requests
that do not ask (whose tokens do not change), and again when the prompt is in the prefix cache."""

from __future__ import annotations

import pytest
import torch

from kvtriton.backend.engine.sampling_params import SamplingParams

from tests.tiny_model import make_tiny_engine

transformers = pytest.importorskip("transformers")

PROMPT = [(7 * i + 3) % 200 + 10 for i in range(37)]
OTHER = [(5 * i + 1) % 150 + 20 for i in range(21)]


@pytest.fixture(scope="module")
def reference(tiny_folder):
    """HF's log_softmax at every prompt position: (P, V)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([PROMPT])).logits[0].float(), dim=-1)


def check(prompt_logprobs, reference, top_n):
    first = prompt_logprobs[0]
    assert (first.token_id, first.logprob, first.rank) == (PROMPT[0], None, None)
    assert len(prompt_logprobs) == len(PROMPT)
    for p, entry in enumerate(prompt_logprobs[1:]):  # entry p: token p + 1, from position p's logits
        assert entry.token_id == PROMPT[p + 1]
        assert entry.logprob == pytest.approx(reference[p, PROMPT[p + 1]].item(), abs=2e-4)
        # its rank: 1 + the tokens likelier than it (a random tiny model has no near-ties at these margins)
        assert entry.rank == int((reference[p] > reference[p, PROMPT[p + 1]]).sum()) + 1
        top = reference[p].topk(top_n)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=2e-4)


@pytest.mark.parametrize("overrides", [
    dict(),  # the whole prompt in one step
    dict(max_num_batched_tokens=8),  # chunked: 5 steps of prompt
    dict(max_num_batched_tokens=8, enable_async_scheduling=False),
    dict(max_num_seqs=3),  # 3 prompt rows a step (max_num_seqs): 12 steps of prompt, however large the budget
    # beside speculating requests: the steps that prefill it do not verify (the verify step takes one row a prefill)
    dict(max_num_batched_tokens=8, speculative_method="ngram", num_speculative_tokens=3),
])
def test_prompt_logprobs_match_transformers_and_leave_other_requests_alone(tiny_folder, reference, overrides):
    engine = make_tiny_engine(tiny_folder, **overrides)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    try:
        alone = engine.generate([OTHER], greedy)[0]
        other, asked = engine.generate([OTHER, PROMPT], greedy)[0], engine.generate(
            [PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=3))[0]
        check(asked.prompt_logprobs, reference, 3)
        assert other.token_ids == alone.token_ids and other.prompt_logprobs is None
        both = engine.generate([OTHER, PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                               prompt_logprobs=0))
        assert both[0].token_ids == alone.token_ids  # asked too: its own rows, the sampled tokens unchanged
        check(both[1].prompt_logprobs, reference, 0)
        assert both[1].token_ids == asked.token_ids
        again = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1))[0]
        check(again.prompt_logprobs, reference, 1)  # the prompt's blocks are cached by now: computed anyway
    finally:
        engine.shutdown()


def test_prompt_logprobs_refused_where_the_runner_cannot(tiny_folder):
    from kvtriton.backend.config import EngineConfig
    from kvtriton.backend.engine.llm_engine import _prompt_logprobs_refusal

    assert _prompt_logprobs_refusal(EngineConfig(model=str(tiny_folder))) == ""
    assert "onnxruntime runner" in _prompt_logprobs_refusal(EngineConfig(model=str(tiny_folder), runner="onnxruntime",
                                                                        engine_path="x.onnx"))
    assert "enable_chunked_prefill" in _prompt_logprobs_refusal(EngineConfig(model=str(tiny_folder),
                                                                             enable_chunked_prefill=False))
    with pytest.raises(ValueError, match="prompt_logprobs must be null or in"):
        SamplingParams(prompt_logprobs=21)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overrides", [dict(), dict(max_num_batched_tokens=8)])
def test_prompt_logprobs_on_cuda(tiny_folder, reference, overrides, fresh_dynamo):
    """The same on a GPU in fp32: prefill steps with prompt rows replay the prefill CUDA graphs (their logits rows
    are the step's own, as a verify step's) or run eagerly."""
    engine = make_tiny_engine(tiny_folder, device="cuda", dtype="float32", **overrides)
    try:
        out = engine.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=3))[0]
        check(out.prompt_logprobs, reference, 3)
    finally:
        engine.shutdown()
