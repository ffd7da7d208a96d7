"""Structured output on a CUDA GPU (default model, bf16, CUDA graphs, the overlapped loop): the bitmask travels to
the device while the forward pass runs, and every guided output still parses and validates; the bitmask op on
the device masks exactly what it masks on the CPU."""

import json

import jsonschema
import pytest
import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.token_bitmask import apply_token_bitmask_

from tests.city_schema import CITIES, CITY_SCHEMA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_bitmask_op_on_the_device_matches_the_cpu():
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (64, 1536), generator=gen, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(64, 49152, generator=gen)
    expected = apply_token_bitmask_(logits.clone(), bitmask)
    got = apply_token_bitmask_(logits.cuda(), bitmask.cuda()).cpu()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_schema_outputs_validate_on_the_gpu(default_model_folder, async_scheduling):
    engine = LLMEngine(EngineConfig(model=str(default_model_folder), device="cuda", dtype="bfloat16",
                                    enable_async_scheduling=async_scheduling)).start()
    try:
        tokenizer = engine.tokenizer
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"Describe the city of {city} as a "
                                                   "JSON object with its name, country, population in millions and "
                                                   "up to three landmarks."}]) for city in CITIES]
        plain = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
        streams = [engine.add_request(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=200,
                                                                 guided_json=CITY_SCHEMA))
                   for i, p in enumerate(prompts)]
        streams += [engine.add_request(f"p{i}", p, plain) for i, p in enumerate(prompts)]  # unguided neighbours
        outs = [s.result() for s in streams]
        for out in outs[:len(prompts)]:
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), CITY_SCHEMA)
        assert all(o.finish_reason == "length" and o.num_output_tokens == 32 for o in outs[len(prompts):])
        assert engine.stats().kv_usage == 0.0
    finally:
        engine.shutdown()
