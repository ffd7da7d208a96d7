"""The llm model behind `kvtriton serve` (default model, CPU) against careless clients and faults: a soak with
random cancels and disconnects, a randomized fuzz of the request contract, a full queue, the oversize HTTP
body, an engine that fails, and a killed stub. Each test ends with a good request answered; the figures
(requests, cancels, errors, leaks, recovery times) are printed at the end of the module.

One server for the module; the last two tests restart it. The model's model.py is the shipped adapter plus
a test-only fault hook (tests/assets/faulty_llm/model.py).
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from kvtriton.backend.entrypoints.pbtxt_parameters import set_parameters
from kvtriton.client import health_cmd
from kvtriton.client.grpc_client import input_tensors

from tests.fuzz_values import valid_combination
from tests.http_generate import http_request
from tests.reliability_figures import figures  # noqa: F401 (a fixture)
from tests.serve_process import ServeProcess
from tests.test_triton_llm import metric

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.reliability]

ROOT = Path(__file__).resolve().parent.parent
FAULT_PROMPT = "kvtriton test: break the engine"
MAX_NUM_SEQS, MAX_NUM_WAITING = 8, 16
# What no error message may show a client: Python's own words for a bug.
INTERNALS = re.compile(r"Traceback|File \"|\.py\b|object has no attribute|can only concatenate|NoneType|"
                       r"maximum recursion|unsupported operand|not subscriptable|\b[A-Z]\w+Error\b")


@pytest.fixture(scope="module")
def serve(tmp_path_factory, default_model_folder):
    repo = tmp_path_factory.mktemp("reliability_repository")
    shutil.copytree(ROOT / "model_repository" / "llm", repo / "llm")
    shutil.copy(ROOT / "tests" / "assets" / "faulty_llm" / "model.py", repo / "llm" / "1" / "model.py")
    set_parameters(repo / "llm" / "config.pbtxt", {
        "max_num_seqs": str(MAX_NUM_SEQS), "max_num_waiting": str(MAX_NUM_WAITING), "max_model_len": "1024",
        "kv_cache_memory_gb": "0.25"})
    with ServeProcess(repo, tmp_path_factory.mktemp("logs"), timeout_s=300) as process:
        yield process


# ---- clients -------------------------------------------------------------------------------------------
def grpc_request(serve, inputs, timeout=120.0, cancel_after=None) -> dict:
    """One streamed gRPC request: {"chunks", "finish_reason", "error", "cancelled", "seconds_to_error"}."""
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(serve.grpc_url)
    result = {"chunks": 0, "tokens": 0, "finish_reason": None, "error": None, "cancelled": False}
    started = time.monotonic()
    try:
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        client.async_stream_infer("llm", inputs, enable_empty_final_response=True)
        while True:
            try:
                response, error = got.get(timeout=timeout)
            except queue.Empty:
                result["error"] = "LOST: no response"
                break
            if error is not None:
                result["error"], result["seconds_to_error"] = str(error), time.monotonic() - started
                break
            reason = response.as_numpy("finish_reason")
            if reason is not None:
                result["chunks"] += 1
                result["tokens"] += int(response.as_numpy("num_output_tokens")[0])
                if reason[0]:
                    result["finish_reason"] = reason[0].decode()
            if response.get_response().parameters["triton_final_response"].bool_param:
                break
            if cancel_after is not None and result["chunks"] >= cancel_after:
                client.stop_stream(cancel_requests=True)
                result["cancelled"] = True
                break
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return result


def settled(serve, timeout=30.0) -> dict:
    """The engine gauges once they are back at idle (or after `timeout`)."""
    names = ("kvtriton_kv_cache_usage_ratio", "kvtriton_num_requests_running", "kvtriton_num_requests_waiting")
    deadline = time.monotonic() + timeout
    while True:
        values = {name: metric(serve, name) for name in names}
        if all(v == 0 for v in values.values()) or time.monotonic() > deadline:
            return values
        time.sleep(0.2)


def good_request(serve) -> None:
    result = grpc_request(serve, input_tensors(text_input="What is the capital of France?", max_tokens=4,
                                               temperature=0.0), timeout=60)
    assert result["error"] is None and result["finish_reason"] in ("stop", "length"), result


# ---- the tests -----------------------------------------------------------------------------------------
def test_soak_with_random_cancels_and_disconnects_loses_nothing_and_leaks_no_kv(serve, figures):
    rng = random.Random(16)
    prompts = ["Tell me a story about a fox.", "List the planets.", "Write a haiku about rain.",
               "What is 2 + 2?", "Explain paged attention in one sentence."]
    kinds = ["grpc", "grpc_cancel", "sse", "sse_disconnect", "http", "http_disconnect"]
    jobs = [(rng.choice(kinds), rng.choice(prompts), rng.randint(4, 24), rng.randint(1, 3)) for _ in range(48)]

    def run(job):
        kind, prompt, max_tokens, k = job
        if kind.startswith("grpc"):
            request = input_tensors(text_input=prompt, stream=True, max_tokens=max_tokens, ignore_eos=True)
            return kind, grpc_request(serve, request, cancel_after=k if kind == "grpc_cancel" else None)
        body = {"text_input": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": kind.startswith("sse")}
        disconnect = {"sse_disconnect": k, "http_disconnect": 0}.get(kind)
        return kind, http_request(serve, body, stream=kind.startswith("sse"), disconnect_after=disconnect)

    def ran_to_max_tokens(job, result):
        return result["cancelled"] or result["tokens"] == job[2]

    started = time.monotonic()
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run, jobs))
    seconds = time.monotonic() - started
    gauges = settled(serve)
    completed = [r for kind, r in results if not r["cancelled"] and r["error"] is None]
    lost = [(kind, r) for kind, r in results if not r["cancelled"] and (r["error"] is not None
                                                                          or r["finish_reason"] != "length")]
    figures.update({
        "soak: requests": len(results), "soak: completed": len(completed),
        "soak: client cancels": sum(1 for kind, r in results if r["cancelled"] and kind == "grpc_cancel"),
        "soak: client disconnects": sum(1 for kind, r in results if r["cancelled"] and kind != "grpc_cancel"),
        "soak: errors or lost": len(lost), "soak: seconds": round(seconds, 1),
        "soak: KV usage / running / waiting after": list(gauges.values()),
    })
    assert lost == []
    assert all(ran_to_max_tokens(job, r) for job, (_, r) in zip(jobs, results))  # ignore_eos: all of them
    assert gauges == {"kvtriton_kv_cache_usage_ratio": 0.0, "kvtriton_num_requests_running": 0.0,
                      "kvtriton_num_requests_waiting": 0.0}
    good_request(serve)


def _fuzz_value(rng: random.Random):
    return rng.choice([
        None, 0, -1, 1, 3, 2**31, 2**40, -2**63, 1.5, -0.5, float("nan"), "", "x", "true", True, False,
        [], [1, 2], ["a", "b"], {}, {"a": 1}, "é" * 300, "q" * 300, [[[[[]]]]],
    ])


def _fuzz_request(rng: random.Random) -> tuple[str, object, str | None]:
    """A random request: mostly one thing wrong with an otherwise small, valid one; 40% valid keys
    combined. (transport, payload, its task input or None)."""
    if rng.random() < 0.4:  # as a JSON sampling_parameters (HTTP's parameters take scalars only)
        sampling_json = json.dumps({**valid_combination(rng), "max_tokens": rng.choice([3, 8])})
        prompt = rng.choice(["Hi", "word " * 50])
        if rng.random() < 0.5:
            return "http", {"text_input": prompt, "sampling_parameters": sampling_json}, None
        return "grpc", input_tensors(text_input=prompt, sampling_parameters=sampling_json), None
    sampling = {"max_tokens": rng.choice([1, 2, 3])}
    for key in rng.sample(["temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
                           "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty",
                           "logprobs", "skip_special_tokens", "max_tokens", "bogus_key", "stream"],
                          rng.randint(0, 3)):
        sampling[key] = _fuzz_value(rng)
    shape = rng.random()
    if shape < 0.15:
        sampling["stop"] = ["z" * rng.choice([10, 300])] * rng.choice([1, 20])
    prompt: dict = {"text_input": rng.choice(["Hi", "", "é", "<|im_end|>", "word " * 50])}
    if rng.random() < 0.1:  # the model's other tasks, or one it does not know
        prompt["task"] = rng.choice(["tokenize", "detokenize", "generate", "bogus", ""])
    task = prompt.get("task")
    if shape > 0.85:
        prompt = {**({"task": task} if task is not None else {}), "messages": json.dumps(rng.choice([
            [{"role": "user", "content": "Hi"}], [{"role": "user", "content": ["Hi"]}], [{"role": 3, "content": "x"}],
            [{"role": "user"}], "not a list", [], [{"role": "user", "content": {"a": [1]}}]]))}
    elif 0.7 < shape <= 0.85:
        nested = "[" * rng.choice([10, 5000]) + "]" * rng.choice([0, 10])
        sampling_json = '{"stop": ' + nested + "}"
        return "grpc", input_tensors(**prompt, sampling_parameters=sampling_json), task
    transport = rng.choice(["grpc", "http"])
    if transport == "http":
        return "http", {**prompt, "parameters": sampling}, task
    return "grpc", input_tensors(**prompt, sampling_parameters=json.dumps(sampling, allow_nan=True)), task


def test_fuzzed_requests_get_an_answer_or_an_error_naming_no_internals(serve, figures):
    rng = random.Random(1616)
    requests = [_fuzz_request(rng) for _ in range(480)]

    def run(item):
        transport, payload, _ = item
        if transport == "grpc":
            return grpc_request(serve, payload, timeout=60)
        return http_request(serve, payload, stream=False, timeout=60)

    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, requests))
    errors = [r["error"] for r in results if r["error"] is not None]
    lost = [e for e in errors if e.startswith("LOST")]
    internal = [e for e in errors if "internal error" in e]
    leaking = [e for e in errors if INTERNALS.search(e)]
    figures.update({
        "fuzz: requests": len(results), "fuzz: answered": len(results) - len(errors),
        "fuzz: refused with an error": len(errors), "fuzz: internal errors": len(internal),
        "fuzz: errors showing internals": len(leaking), "fuzz: lost": len(lost),
        "fuzz: seconds": round(time.monotonic() - started, 1),
    })
    assert lost == [] and internal == [] and leaking == [], (lost, internal, leaking, sorted(set(errors)))
    # a tokenize task's one response has token ids and no finish_reason (nothing was generated)
    assert all(r["finish_reason"] in ("stop", "length") or (task == "tokenize" and not r["finish_reason"])
               for r, (_, _, task) in zip(results, requests) if r["error"] is None)
    assert settled(serve)["kvtriton_kv_cache_usage_ratio"] == 0.0
    good_request(serve)


def test_a_full_queue_refuses_at_once_with_server_busy(serve, figures):
    # Long enough that the first 24 are still running or waiting when the last of the 40 arrive (with 12 tokens a
    # fast CPU finished some before then, and more slipped in than the bound allows).
    inputs = [input_tensors(text_input=f"Count to {i}.", max_tokens=48, ignore_eos=True, stream=True)
              for i in range(40)]
    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda x: grpc_request(serve, x), inputs))
    busy = [r for r in results if r["error"] is not None and "server busy" in r["error"]]
    done = [r for r in results if r["error"] is None and r["finish_reason"] == "length"]
    figures.update({"busy (40 at once, max_num_seqs 8, max_num_waiting 16): refused": len(busy),
                    "busy: completed": len(done),
                    "busy: slowest refusal s": round(max((r["seconds_to_error"] for r in busy), default=0), 2)})
    assert len(busy) + len(done) == 40
    assert len(busy) >= 40 - MAX_NUM_SEQS - MAX_NUM_WAITING - 4  # a few may slip in as others finish
    assert all("max_num_waiting" in r["error"] for r in busy)
    assert all(r["seconds_to_error"] < 5 for r in busy)
    status, body = serve.http("/v2/models/llm/generate", json.dumps({"text_input": "Hi", "max_tokens": 2}).encode())
    assert status == 200, body
    good_request(serve)


def test_an_oversize_form_encoded_body_is_refused_by_the_model_not_fatal(serve, figures):
    body = json.dumps({"text_input": "hello " * 700_000, "max_tokens": 4}).encode()  # 4.2 MB, curl's content type
    started = time.monotonic()
    status, answer = serve.http("/v2/models/llm/generate", body,
                                {"Content-Type": "application/x-www-form-urlencoded"})
    figures["llm oversize body: answered in s"] = round(time.monotonic() - started, 2)
    assert status == 400 and answer["error"].startswith("text_input must be at most 65536 bytes (max_prompt_bytes)")
    good_request(serve)


def test_a_body_triton_cannot_convert_is_a_400_not_a_server_fault(serve):
    """Triton 2.51 answers these with 500 (upstream issue #8762); through kvtriton serve's HTTP port, 400 with
    Triton's own message. A stream's request too; and the server serves on."""
    for body, message in [(b"{", "failed to parse the request JSON buffer"),
                          (b"[]", "attempt to get members for non-object"),
                          (b'{"text_input": "hi", "max_tokens": "x"}', "Unable to parse 'data'"),
                          (b'{"text_input": "hi", "parameters": null}', "Expected JSON object for keyword"),
                          (b'{"text_input": "\\ud800"}', "failed to parse the request JSON buffer")]:
        for endpoint in ("generate", "generate_stream"):
            status, answer = serve.http(f"/v2/models/llm/{endpoint}", body, {"Content-Type": "application/json"})
            assert status == 400 and answer["error"].startswith(message), (body, endpoint, status, answer)
    good_request(serve)


def test_an_engine_failure_fails_every_request_and_the_model_comes_back(serve, figures):
    lines = len(serve.lines)
    in_flight = {}
    stream = threading.Thread(target=lambda: in_flight.update(grpc_request(
        serve, input_tensors(text_input="Tell me a long story.", stream=True, max_tokens=600, ignore_eos=True))))
    stream.start()
    deadline = time.monotonic() + 60
    while (metric(serve, "kvtriton_num_requests_running") or 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    failed_at = time.monotonic()
    poison = grpc_request(serve, input_tensors(text_input=FAULT_PROMPT, max_tokens=2), timeout=30)
    stream.join(timeout=30)
    error_after = time.monotonic() - failed_at
    assert in_flight["error"] is not None and in_flight["error"].count("internal error (request ") == 1, in_flight
    assert "injected" not in in_flight["error"] and poison["error"] is not None
    serve.wait_for_output("the Python stub of model llm", after=lines)
    serve.wait_for_output("tritonserver is ready again", timeout_s=300, after=lines)
    figures["engine failure: in-flight stream got its error in s"] = round(error_after, 2)
    figures["engine failure: model back in s"] = round(time.monotonic() - failed_at, 1)
    good_request(serve)


def test_a_killed_stub_ends_in_flight_requests_and_the_model_comes_back(serve, figures):
    lines = len(serve.lines)
    [(pid, (model, _))] = serve.stub_pids().items()
    assert model == "llm"
    results = {}
    clients = {
        "grpc stream": lambda: grpc_request(serve, input_tensors(text_input="Tell me a long story.", stream=True,
                                                                 max_tokens=600, ignore_eos=True), timeout=120),
        "http sse": lambda: http_request(serve, {"text_input": "Tell me a long story.", "max_tokens": 600,
                                                 "ignore_eos": True, "stream": True}, stream=True),
        "http generate": lambda: http_request(serve, {"text_input": "Tell me a long story.", "max_tokens": 600,
                                                      "ignore_eos": True}, stream=False),
    }
    threads = [threading.Thread(target=lambda k=k, f=f: results.update({k: f()})) for k, f in clients.items()]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while (metric(serve, "kvtriton_num_requests_running") or 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    assert health_cmd.main(["--url", serve.grpc_url]) == 1  # down (the stub, or the server restarting)
    for t in threads:
        t.join(timeout=120)
    errors_within = time.monotonic() - killed
    serve.wait_for_output("tritonserver is ready again", timeout_s=300, after=lines)
    recovered = time.monotonic() - killed
    assert health_cmd.main(["--url", serve.grpc_url]) == 0
    figures["killed stub: in-flight clients (grpc, sse, http) all got an error in s"] = round(errors_within, 2)
    figures["killed stub: model back in s"] = round(recovered, 1)
    for name, r in results.items():
        assert r["error"] is not None and r["finish_reason"] is None, (name, r)
    assert errors_within < 10
    good_request(serve)
