"""Multi-LoRA through a real tritonserver: the `llm` model serves `test-lora` (a random adapter of the default
model) beside the base model; a request picks it with `lora_name` (sampling_parameters or the generate endpoint's
parameters, as Triton's vllm_backend takes it), over HTTP and gRPC."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest

from tests.test_triton_llm import CAPITAL, grpc_stream, post

pytestmark = [pytest.mark.server, pytest.mark.slow]


def http_text(server, **parameters) -> str:
    status, body = post(server, "/v2/models/llm/generate", {"text_input": CAPITAL, "exclude_input_in_output": True,
                                                            "parameters": {"max_tokens": 16, "temperature": 0,
                                                                           "ignore_eos": True, **parameters}})
    assert status == 200, body
    return body["text_output"]


def grpc_text(server, lora_name=None) -> str:
    sampling = {"max_tokens": 16, "temperature": 0, "ignore_eos": True, "lora_name": lora_name}
    chunks, error = grpc_stream(server, text_input=CAPITAL, stream=True, exclude_input_in_output=True,
                                sampling_parameters=json.dumps(sampling))
    assert error is None, error
    return "".join(c["text"] for c in chunks)


def test_the_adapter_changes_the_answer_the_same_way_over_http_and_grpc(llm_server):
    base, adapted = http_text(llm_server), http_text(llm_server, lora_name="test-lora")
    assert "Paris" in base and adapted != base
    assert grpc_text(llm_server, "test-lora") == adapted and grpc_text(llm_server) == base


def test_adapter_and_base_requests_in_flight_together_each_answer_as_alone(llm_server):
    alone = {None: http_text(llm_server), "test-lora": http_text(llm_server, lora_name="test-lora")}
    names = [None, "test-lora"] * 3
    got: list[str | None] = [None] * len(names)

    def run(i):
        got[i] = grpc_text(llm_server, names[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(names))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == [alone[name] for name in names]


def test_an_unknown_adapter_is_refused_by_name_and_the_server_keeps_serving(llm_server):
    status, body = post(llm_server, "/v2/models/llm/generate",
                        {"text_input": "Hi", "parameters": {"max_tokens": 2, "lora_name": "sql"}})
    assert status == 400 and "lora_name 'sql'" in body["error"] and "test-lora" in body["error"], body
    _, error = grpc_stream(llm_server, text_input="Hi", sampling_parameters=json.dumps({"lora_name": ""}))
    assert error is not None and "lora_name" in str(error)
    assert http_text(llm_server)


def lora_metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    found = re.search(rf'^{name}{{[^}}]*lora_name="test-lora"[^}}]*}} ([0-9.e+-]+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def settled(server, name: str) -> float:
    """The metric once earlier requests' counts are flushed (every 0.25 s from the engine loop): two reads agree."""
    last, value = -1.0, lora_metric(server, name)
    while value != last:
        time.sleep(0.6)
        last, value = value, lora_metric(server, name)
    return value


def test_finished_requests_and_their_tokens_are_counted_per_adapter(llm_server):
    requests = settled(llm_server, "kvtriton_lora_request_success_total")
    tokens = settled(llm_server, "kvtriton_lora_generation_tokens_total")
    http_text(llm_server, lora_name="test-lora")
    http_text(llm_server)  # the base model's request: not the adapter's
    deadline = time.monotonic() + 10  # counters are flushed from the step loop
    while lora_metric(llm_server, "kvtriton_lora_request_success_total") < requests + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lora_metric(llm_server, "kvtriton_lora_request_success_total") == requests + 1
    assert lora_metric(llm_server, "kvtriton_lora_generation_tokens_total") == tokens + 16
