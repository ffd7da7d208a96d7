"""A GGUF's rope_freqs.weight (Llama 3.1-style scaling) back to HF's llama3 rope_scaling: the divisors of
transformers' own computation recovered as its parameters, a tiny GGUF converted and served as transformers
serves the folder, and divisors no llama3 parameters give refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import _compute_llama3_parameters

from kvtriton.backend.models.gguf_checkpoint import convert_gguf
from kvtriton.backend.models.gguf_rope import llama3_divisors, llama3_rope_scaling

from tests.test_gguf_checkpoint import HEAD_DIM, write_tiny_gguf


def transformers_divisors(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """What llama.cpp's converter writes: the default inverse frequencies over transformers' llama3 ones."""
    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
                         rope_scaling={"rope_type": "llama3", **scaling}, max_position_embeddings=131072)
    inv_freq, _ = _compute_llama3_parameters(config)
    default = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    return (default / inv_freq.double().numpy()).astype(np.float32)


@pytest.mark.parametrize("theta, head_dim, factor", [(500000.0, 64, 32.0), (500000.0, 128, 8.0)])
def test_llama_3_1_and_3_2_divisors_give_their_configs_back(theta, head_dim, factor):
    """Llama 3.2 1B/3B (head 64, factor 32) and Llama 3.1 / 3.3 (head 128, factor 8)."""
    scaling = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    assert llama3_rope_scaling(transformers_divisors(theta, head_dim, scaling), theta, head_dim) == {
        "rope_type": "llama3", **scaling}


def test_other_parameters_are_solved_from_the_smooth_band():
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 32.0,
               "original_max_position_embeddings": 2048}
    divisors = transformers_divisors(100000.0, 8, scaling)
    assert 1 < divisors[1] < divisors[2] < 8  # two frequencies in the band
    assert llama3_rope_scaling(divisors, 100000.0, 8) == {"rope_type": "llama3", **scaling}


def test_divisors_no_llama3_scaling_gives_are_refused():
    divisors = np.array([1.0, 3.0, 2.0, 8.0], dtype=np.float32)  # not monotonic in the band
    with pytest.raises(ValueError, match="matches no llama3 rope scaling"):
        llama3_rope_scaling(divisors, 100000.0, 8)
    with pytest.raises(ValueError, match="has 3 values; a head of 8 has 4"):
        llama3_rope_scaling(divisors[:3], 100000.0, 8)


def test_a_gguf_with_rope_freqs_converts_and_serves_as_transformers_serves_its_folder(tmp_path):
    import transformers

    from kvtriton.backend.models.loader import load_model

    from tests.llama_reference import prefill_logits

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 32.0,
               "original_max_position_embeddings": 2048}
    inv_freq = 100000.0 ** -(np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    divisors = llama3_divisors(inv_freq, **scaling).astype(np.float32)
    assert (divisors != 1).any()
    write_tiny_gguf(tmp_path / "l3.gguf", quantize_q8=False, extra_tensors=[("rope_freqs.weight", divisors)])
    folder = convert_gguf(tmp_path / "l3.gguf", tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", **scaling}
    assert llama3_divisors(inv_freq, **{k: v for k, v in config["rope_scaling"].items() if k != "rope_type"}
                           ) == pytest.approx(divisors, rel=1e-5)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = list(range(5, 5 + 40))  # the divisors apply at every position
    with torch.no_grad():
        want = reference(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(prefill_logits(load_model(folder), [prompt])[0], want, atol=1e-4, rtol=1e-4)
