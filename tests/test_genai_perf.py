"""genai-perf, unchanged, against the `llm` model of a real tritonserver (through the perf_analyzer that
tritonclient 2.51 bundles, run by kvtriton.client.perf_analyzer). genai-perf is an optional extra
(`pip install -e '.[genai-perf]'`), which setup does not install: without it this test skips."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_genai_perf_profiles_the_llm_model(llm_server, default_model_folder, tmp_path):
    pytest.importorskip("genai_perf", reason="genai-perf not installed: pip install -e '.[genai-perf]'")
    input_tokens, output_tokens, prompts = 16, 4, 4
    done = subprocess.run(
        [sys.executable, "-m", "kvtriton.client.perf_analyzer",
         "genai-perf", "profile", "-m", "llm", "--service-kind", "triton", "--backend", "vllm",
         "-u", llm_server.grpc_url, "--streaming", "--tokenizer", str(default_model_folder),
         "--synthetic-input-tokens-mean", str(input_tokens), "--synthetic-input-tokens-stddev", "0",
         "--output-tokens-mean", str(output_tokens), "--output-tokens-mean-deterministic",
         "--concurrency", "1", "--num-prompts", str(prompts), "--measurement-interval", "4000",
         "--artifact-dir", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = tmp_path / "profile_export_genai_perf.json"
    figures = json.loads(summary.read_text())
    assert figures["request_throughput"]["avg"] > 0 and figures["output_token_throughput"]["avg"] > 0
    assert 0 < figures["time_to_first_token"]["avg"] <= figures["request_latency"]["avg"]
    # genai-perf counts tokens by tokenizing the prompts it made and the text streamed back; the server's own
    # counts are in perf_analyzer's export.
    assert abs(figures["input_sequence_length"]["avg"] - input_tokens) <= 1
    requests = [r for e in json.loads((summary.parent / "profile_export.json").read_text())["experiments"]
                for r in e["requests"]]
    assert requests
    for request in requests:
        outputs = request["response_outputs"]
        assert sum(int(o["num_output_tokens"]) for o in outputs) == output_tokens  # min_tokens = max_tokens
        assert outputs[-1]["finish_reason"] == "length"
