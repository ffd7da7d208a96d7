"""Speculative decoding behind a real tritonserver: the shipped `llm` model with prompt lookup switched on in
config.pbtxt; a request with speculation gives the same greedy text as the same request with it off
(num_speculative_tokens 0), and the speculative metrics count; many streams at once with random keys, some
dropped, fail no step. Default model, CPU."""

from __future__ import annotations

import json
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvtriton.backend.entrypoints.pbtxt_parameters import set_parameters

from tests.conftest import MODEL_REPOSITORY
from tests.fuzz_values import valid_combination
from tests.http_generate import http_request
from tests.test_triton_llm import grpc_stream, metric, post
from tests.triton_fixture import start_server

pytestmark = [pytest.mark.server, pytest.mark.slow]

QUOTE = ("<|im_start|>user\nRepeat this paragraph with one word changed: The river runs past the old mill, under "
         "the stone bridge, and on to the sea, where the fishing boats wait for the morning tide.<|im_end|>\n"
         "<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory, default_model_folder):
    repo = tmp_path_factory.mktemp("spec_repository")
    shutil.copytree(MODEL_REPOSITORY / "llm", repo / "llm")
    # Eight sequences at most, speculating at any batch size: more streams than that queue, and a step speculates
    # or not by its rows' requests alone (guided_*, prompt logprobs), not by the batch's size.
    set_parameters(repo / "llm" / "config.pbtxt", {"speculative_method": "ngram", "num_speculative_tokens": "4",
                                                    "max_num_seqs": "8", "speculative_disable_by_batch_size": "0"})
    server = start_server(repo, timeout_s=300)
    yield server
    server.stop()


def test_speculation_gives_the_same_greedy_text(spec_server):
    texts = []
    for k in (None, 0, 2):
        body = {"text_input": QUOTE, "max_tokens": 64, "temperature": 0, "exclude_input_in_output": True}
        if k is not None:
            body["num_speculative_tokens"] = k
        status, out = post(spec_server, "/v2/models/llm/generate", body)
        assert status == 200, out
        texts.append(out["text_output"])
    assert texts[0] == texts[1] == texts[2] and texts[0]
    # Streamed over gRPC, the tensor input: the same text.
    chunks, error = grpc_stream(spec_server, text_input=QUOTE, max_tokens=64, temperature=0.0, stream=True,
                                num_speculative_tokens=4)
    assert error is None and "".join(c["text"] for c in chunks) == texts[0]
    proposed = metric(spec_server, "kvtriton_spec_decode_proposed_tokens_total")
    accepted = metric(spec_server, "kvtriton_spec_decode_accepted_tokens_total")
    assert proposed and 0 < accepted <= proposed


def test_too_many_speculative_tokens_is_a_clear_error(spec_server):
    status, out = post(spec_server, "/v2/models/llm/generate",
                       {"text_input": "Hi", "max_tokens": 4, "num_speculative_tokens": 9})
    assert status == 400 and "num_speculative_tokens 9 is more than this model allows" in out["error"]


def test_many_streams_with_random_keys_and_drops_fail_no_step(spec_server):
    """Twelve streams at once on eight sequence slots, so that requests queue and steps go between verify steps
    and overlapped plain decodes (a queued request with prompt logprobs holds speculation off until it is
    scheduled or dropped). Each request combines valid sampling and constraint keys (no grammar) with its own
    num_speculative_tokens; two in five are dropped, before any answer or after 1-3 events. No request may end in
    an internal error (a failed step), and no KV block stays in use. (Stop 60's verify-step fault, found by a
    longer fuzz, has its own test: tests/test_decode_inputs.py; this one did not meet it in a few runs.)"""
    rng = random.Random(61)
    requests = []
    for _ in range(96):
        # No guided_* key: a step with one does not speculate. Prompt logprobs stay: a step that prefills such a
        # prompt does not either, and the step after it, the same rows, does.
        keys = {k: v for k, v in valid_combination(rng).items() if not k.startswith("guided_")}
        sampling = {**keys, "max_tokens": rng.choice([4, 16, 48]), "num_speculative_tokens": rng.choice([0, 2, 4])}
        body = {"text_input": rng.choice([QUOTE, QUOTE * 2, "Hi"]), "sampling_parameters": json.dumps(sampling)}
        requests.append((body, rng.choice([None, None, 0, 1, 3])))
    with ThreadPoolExecutor(12) as pool:
        results = pool.map(lambda r: http_request(spec_server, r[0], stream=True, disconnect_after=r[1]), requests)
        errors = [r["error"] for r in results if r["error"] is not None]
    assert not [e for e in errors if "internal error" in e or e.startswith("LOST")], errors
    deadline = time.monotonic() + 30  # dropped streams end at their next token
    while metric(spec_server, "kvtriton_kv_cache_usage_ratio") != 0.0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(spec_server, "kvtriton_kv_cache_usage_ratio") == 0.0
    assert metric(spec_server, "kvtriton_spec_decode_proposed_tokens_total")
