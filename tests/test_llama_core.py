"""The Llama core against HF transformers: tiny random configs (fast) for every feature."""

import json

import pytest
import torch

from kvtriton.backend.models.loader import load_model
from kvtriton.backend.models.model_config import ModelConfig

from tests.llama_reference import prefill_logits

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
)
VARIANTS = {
    "llama-tied": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True),
    "llama3-rope": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32)),
    "linear-rope": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                        rope_scaling=dict(type="linear", factor=2.0)),
    "qwen2-bias": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None),
    # QK-norm, and a head_dim that is not hidden / heads (Qwen3-0.6B: 1024 / 16 heads of 128)
    "qwen3-qk-norm": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", tie_word_embeddings=True,
                          head_dim=32),
}


def _save_hf(tmp_path, extra):
    cfg = transformers.AutoConfig.for_model(**{**TINY, **extra})
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    return hf


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(tmp_path, variant):
    hf = _save_hf(tmp_path, VARIANTS[variant])
    ours = load_model(tmp_path)
    prompts = [[5, 9, 3, 77, 12, 1, 8], [40, 2], [7] * 13 + [99, 100]]
    got = prefill_logits(ours, prompts)
    for p, g in zip(prompts, got):
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0]
        torch.testing.assert_close(g, want, atol=1e-4, rtol=1e-4)


def test_dummy_weights_from_bare_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, **VARIANTS["llama-tied"]}))
    model = load_model(tmp_path, dummy=True)
    (logits,) = prefill_logits(model, [[1, 2, 3]])
    assert logits.shape == (3, TINY["vocab_size"]) and torch.isfinite(logits).all()


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen2ForCausalLM"):
        ModelConfig.from_dict({**TINY, "architectures": ["GPT2LMHeadModel"]})


def test_sliding_window_is_refused():
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig.from_dict({**TINY, "architectures": ["MistralForCausalLM"], "sliding_window": 64})


@pytest.mark.slow
def test_default_model_logits_match_transformers(default_model_folder):
    """SmolLM2-135M-Instruct, fp32: a packed batch of prompts of different lengths, within fp32 tolerance."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_model_folder, dtype=torch.float32).eval()
    ours = load_model(default_model_folder)
    prompts = [[1, 504, 3458, 282, 4649, 314, 15632, 47], [28, 7343], list(range(100, 160))]
    for p, got in zip(prompts, prefill_logits(ours, prompts, block_size=16)):
        with torch.no_grad():
            want = hf(torch.tensor([p])).logits[0]
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.slow
def test_default_model_answers_paris(default_model_folder):
    from kvtriton.backend.config import EngineConfig
    from kvtriton.backend.engine.llm_engine import LLMEngine
    from kvtriton.backend.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=str(default_model_folder), device="cpu")).start()
    try:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
        out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32))[0]
        assert "Paris" in out.text and out.finish_reason == "stop"
    finally:
        engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["qwen2-bias", "qwen3-qk-norm"])
def test_compiled_layers_match_eager(tmp_path, variant):
    """compile_layers (the CUDA-graph path's regional torch.compile) changes no result."""
    _save_hf(tmp_path, VARIANTS[variant])
    model = load_model(tmp_path)
    prompts = [[5, 9, 3, 77, 12, 1, 8], [40, 2], [7]]
    eager = prefill_logits(model, prompts)
    model.compile_layers()
    for want, got in zip(eager, prefill_logits(model, prompts)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
