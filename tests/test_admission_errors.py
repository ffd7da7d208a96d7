"""Every refusal of admission reaches a client as an invalid request (an OpenAI 400), not a server fault (500).

The message is all that crosses Triton's gRPC stream, so kvtriton.client types an error by its phrasing
(client/errors.py); this keeps that list and admission's messages in step.
"""

from __future__ import annotations

import pytest

from kvtriton.backend.engine.admission import Admission, AdmissionLimits
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.client.errors import InvalidRequestError, server_error

LIMITS = AdmissionLimits(max_model_len=64, vocab_size=100, num_kv_blocks=2, block_size=16, max_prompt_bytes=4096,
                         num_speculative_tokens=2, prompt_logprobs_refusal="the onnxruntime runner gives one row",
                         scheduling_policy="fcfs", lora_names=("sql",))


ONE = dict(max_tokens=1)


@pytest.mark.parametrize("ids,params,refusal", [
    ([], SamplingParams(**ONE), "empty"),
    ([1] * 64, SamplingParams(**ONE), "context"),
    ([1] * 10, SamplingParams(max_tokens=60), "context"),
    ([1] * 10, SamplingParams(max_tokens=30), "KV blocks"),  # 40 tokens: more than the pool's 2 x 16
    ([1], SamplingParams(stop_token_ids=[100], **ONE), "stop_token_ids"),
    ([1], SamplingParams(logit_bias={100: 1.0}, **ONE), "logit_bias"),
    ([1], SamplingParams(allowed_token_ids=[5, 100], **ONE), "allowed_token_ids"),
    ([1], SamplingParams(prompt_logprobs=1, **ONE), "prompt_logprobs"),
    ([1], SamplingParams(priority=3, **ONE), "priority"),
    ([1], SamplingParams(lora_name="chat", **ONE), "lora_name"),
    ([1], SamplingParams(num_speculative_tokens=5, **ONE), "num_speculative_tokens"),
])
def test_admission_refusals_are_invalid_requests(ids, params, refusal):
    with pytest.raises(ValueError, match=refusal) as refused:
        Admission(tokenizer=None, limits=LIMITS).check_ids(ids, params)
    assert isinstance(server_error(str(refused.value)), InvalidRequestError), str(refused.value)
