"""A real tritonserver serving a tiny model at tensor_parallel_size 2 (gloo on the CPU, the engine and its
worker in processes of their own): greedy output identical to the engine in one process; a killed worker
ends the in-flight request with an error and the model turns unhealthy (the module's last test)."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.entrypoints.pbtxt_parameters import set_parameters
from kvtriton.client import health_cmd
from kvtriton.client.grpc_client import input_tensors

from tests.process_tree import cmdline, descendants
from tests.tiny_model import make_tiny_model
from tests.triton_fixture import start_server

pytestmark = [pytest.mark.server]
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["the quick brown fox", "paris is the capital of", "blocks of keys and values"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory, tiny):
    repo = tmp_path_factory.mktemp("tp_repository")
    shutil.copytree(ROOT / "model_repository" / "llm", repo / "llm")
    set_parameters(repo / "llm" / "config.pbtxt", {
        "model": str(tiny), "device": "cpu", "quantization": "none", "tensor_parallel_size": "2",
        "max_model_len": "256", "kv_cache_memory_gb": "0.05", "max_num_seqs": "8"})
    server = start_server(repo, timeout_s=300)
    yield server
    server.stop()


def generate(server, prompt: str) -> dict:
    body = {"text_input": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "exclude_input_in_output": True}
    request = urllib.request.Request(f"{server.http_url}/v2/models/llm/generate", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=120).read())


def test_greedy_text_through_tritonserver_at_tp2_equals_one_process(tiny, tp_server):
    engine = LLMEngine(EngineConfig(model=str(tiny), device="cpu", quantization="none", max_model_len=256))
    expected = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    engine.shutdown()
    got = [generate(tp_server, p) for p in PROMPTS]
    assert "tensor parallel: 2 ranks (gloo)" in tp_server.log_path.read_text()  # the engine's rank 0 said so
    assert [g["text_output"] for g in got] == [e.text for e in expected]
    assert all(g["num_output_tokens"] == MAX_TOKENS and g["finish_reason"] == "length" for g in got)


def tp_workers(server_pid: int) -> list[int]:
    """The tensor-parallel workers: spawned processes whose parent (the engine process) was spawned too."""
    spawned = {pid for pid in descendants(server_pid) if "spawn_main" in cmdline(pid)}
    return [pid for pid in spawned if int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]) in spawned]


def test_a_killed_worker_ends_the_request_in_flight_with_an_error_and_the_model_turns_unhealthy(tp_server):
    [worker] = tp_workers(tp_server.process.pid)
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(tp_server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("llm", input_tensors(text_input="the quick", max_tokens=240, ignore_eos=True,
                                                   stream=True))
    assert results.get(timeout=60)[1] is None  # generating
    os.kill(worker, signal.SIGKILL)
    while True:
        result, error = results.get(timeout=60)
        if error is not None:
            break
        assert not result.get_response().parameters["triton_final_response"].bool_param, "finished unharmed"
    client.stop_stream()
    client.close()
    assert "the engine failed" in str(error)
    assert health_cmd.main(["--url", tp_server.grpc_url]) == 1  # a real 1-token request fails: unhealthy
