"""`kvtriton bench` against a real tritonserver: a small sweep writes every metric and the plot."""

from __future__ import annotations

import json

import pytest

from kvtriton.backend.entrypoints.tritonserver import free_ports
from kvtriton.client import bench_cmd
from kvtriton.client.bench_report import LATENCY_METRICS
from kvtriton.client.prompts import make_prompts

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_small_concurrency_sweep_reports_every_metric(llm_server, default_model_folder, protocol, tmp_path, capsys):
    from kvtriton.backend.engine.tokenizer import Tokenizer

    # By default each prompt goes as one user message: the server's count includes the chat template.
    tokenizer = Tokenizer.from_pretrained(default_model_folder)
    expected_input = [len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p.text}])))
                      for p in make_prompts(4, 16, 4, seed=0)]  # the prompts bench makes (--seed 0)
    url = llm_server.grpc_url if protocol == "grpc" else llm_server.http_url
    out, png = tmp_path / "results.json", tmp_path / "results.png"
    code = bench_cmd.main(["--url", url, "--protocol", protocol, "--input-len", "16", "--output-len", "4",
                           "--num-prompts", "4", "--concurrency", "1,2", "--warmup", "1", "--ignore-eos",
                           "--out", str(out), "--plot", str(png), "--no-progress"])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["setup"]["server"]["version"] and results["setup"]["protocol"] == protocol
    assert results["setup"]["chat_template"] is True
    assert [p["concurrency"] for p in results["points"]] == [1, 2]
    for p in results["points"]:
        assert (p["num_requests"], p["completed"], p["errors"]) == (4, 4, 0)
        assert p["output_tokens"] == {"mean": 4.0, "min": 4, "max": 4}  # --ignore-eos: exactly max_tokens
        assert (p["input_tokens"]["min"], p["input_tokens"]["max"]) == (min(expected_input), max(expected_input))
        assert p["request_throughput"] > 0 and p["output_token_throughput"] == pytest.approx(
            4 * p["request_throughput"])
        for metric in LATENCY_METRICS:
            d = p[metric]
            assert set(d) == {"mean", "p50", "p90", "p99"} and 0 < d["p50"] <= d["p90"] <= d["p99"], (metric, d)
        assert p["ttft_s"]["p50"] <= p["e2e_latency_s"]["p50"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "c=1" in table and "c=2" in table


def test_poisson_rate_with_random_lengths_raw(llm_server, tmp_path):
    out = tmp_path / "rate.json"
    code = bench_cmd.main(["--url", llm_server.grpc_url, "--raw", "--input-len", "20", "--output-len", "4",
                           "--random-range", "0.5", "--num-prompts", "4", "--request-rate", "inf", "--warmup", "0",
                           "--ignore-eos", "--out", str(out), "--no-progress"])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["setup"]["chat_template"] is False
    (point,) = results["points"]
    assert point["request_rate"] == "inf" and point["concurrency"] is None and point["completed"] == 4
    assert 10 <= point["input_tokens"]["min"] <= point["input_tokens"]["max"] <= 30  # one token per word for SmolLM2
    assert 2 <= point["output_tokens"]["min"] <= point["output_tokens"]["max"] <= 6


def test_bench_without_a_server_fails_with_one_line(capsys):
    port = free_ports(1)[0]
    assert bench_cmd.main(["--url", f"127.0.0.1:{port}", "--connect-retries", "0", "--no-progress"]) == 1
    assert f"127.0.0.1:{port}" in capsys.readouterr().err
