"""Qwen3 (QK-norm: each head of q and k RMS-normalised before RoPE) through the engine on the CPU, a tiny random
checkpoint saved by HF transformers: greedy output equals transformers' own generate, eagerly and through the
compiled decode graphs; int4 weights serve it too. The CPU's one-call C++ layers do not have the norm and say
so; the fused GPU decode kernels do (the logits against HF, per variant: tests/test_llama_core.py)."""

from __future__ import annotations

import pytest
import torch

from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.runners.cpu_native_decode import why_not_native

from tests.tiny_model import make_tiny_engine, make_tiny_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("fresh_dynamo")

PROMPTS = [[5, 9, 3, 77, 12, 1, 8], [40, 2, 33], [7] * 13 + [99, 100]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("qwen3"), architecture="qwen3")


def transformers_greedy(folder, prompt: list[int]) -> list[int]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("compiled", [False, True])
def test_greedy_output_equals_transformers(qwen3_folder, compiled):
    engine = make_tiny_engine(qwen3_folder, cpu_compile_decode=compiled)
    try:
        assert engine.model_config.qk_norm and engine.model_config.head_dim == 32
        assert (engine.runner.compiled_decode is not None) == compiled
        got = [out.token_ids for out in engine.generate(PROMPTS, GREEDY)]
    finally:
        engine.shutdown()
    assert got == [transformers_greedy(qwen3_folder, p) for p in PROMPTS]


def test_int4_weights_serve_it_in_the_cpu_one_call_layers_as_eagerly(qwen3_folder):
    """The one-call C++ decode layers normalise q and k as the eager layers do: the same greedy tokens."""
    outputs = []
    for compiled in (False, True):
        engine = make_tiny_engine(qwen3_folder, quantization="int4", cpu_compile_decode=compiled)
        try:
            if compiled and torch.cpu._is_avx512_bf16_supported():
                assert why_not_native(engine.runner.model, engine.runner.kv) is None
            outputs.append([out.token_ids for out in engine.generate(PROMPTS, GREEDY)])
        finally:
            engine.shutdown()
    assert outputs[0] == outputs[1] and all(len(ids) == GREEDY.max_tokens for ids in outputs[0])


def test_the_fused_gpu_decode_kernels_take_it(qwen3_folder):
    """The attention kernel normalises q and k itself (its logits: tests/test_kernels.py, form qk-norm)."""
    pytest.importorskip("triton")
    from kvtriton.backend.models.llama_decode import fusable
    from kvtriton.backend.models.loader import load_model

    assert fusable(load_model(qwen3_folder)) is None
