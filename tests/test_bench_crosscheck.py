"""The perf_analyzer cross-check: its profile export becomes the same records our load generator makes,
and the script runs both tools on one server."""

from __future__ import annotations

import json

import pytest

from kvtriton.client import crosscheck
from kvtriton.client.loadgen import LoadPoint, PointRun
from kvtriton.client.prompts import make_prompts

# The shape perf_analyzer 2.51 writes with --profile-export-file (a decoupled model, --streaming).
EXPORT = {"version": "2.51.0", "service_kind": "triton", "endpoint": "", "experiments": [{
    "experiment": {"mode": "concurrency", "value": 1},
    "window_boundaries": [0, 4_000_000_000],
    "requests": [
        {"timestamp": 1_000_000_000, "request_inputs": {},
         "response_timestamps": [1_200_000_000, 1_300_000_000, 1_500_000_000],
         "response_outputs": [{"text_output": "a", "num_output_tokens": 1, "num_input_tokens": 6, "finish_reason": ""},
                              {"text_output": "bc", "num_output_tokens": 2, "num_input_tokens": 6, "finish_reason": ""},
                              {"text_output": "", "num_output_tokens": 0, "num_input_tokens": 6,
                               "finish_reason": "length"}]},
        {"timestamp": 2_000_000_000, "request_inputs": {},
         "response_timestamps": [2_500_000_000],
         "response_outputs": [{"text_output": "x", "num_output_tokens": 1, "num_input_tokens": 4,
                               "finish_reason": "stop"}]},
    ]}]}


def test_export_becomes_request_records():
    first, second = crosscheck.records_from_export(EXPORT)
    assert (first.start, first.first_token, first.end) == pytest.approx((1.0, 1.2, 1.5))
    assert first.num_output_tokens == 3 and first.num_input_tokens == 6
    assert first.itl_s == pytest.approx([0.05, 0.05])  # the two-token response's 0.1 s gap, per token
    assert (second.num_output_tokens, second.end, second.ok) == (1, 2.5, True)
    pooled = crosscheck.pooled([PointRun(LoadPoint(concurrency=1), [first, second])])
    assert pooled["request_throughput"] == pytest.approx(2 / 1.5)
    assert pooled["output_token_throughput"] == pytest.approx(4 / 1.5)
    assert pooled["ttft_mean"] == pytest.approx((0.2 + 0.5) / 2)


def test_input_data_sends_what_our_client_sends():
    prompts = make_prompts(2, 8, 3)
    data = crosscheck.input_data(prompts, {"temperature": 0.0, "ignore_eos": True})["data"]
    assert [d["text_input"] for d in data] == [[p.text] for p in prompts]
    assert data[0]["stream"] == [True] and data[0]["exclude_input_in_output"] == [True]
    assert json.loads(data[0]["sampling_parameters"][0]) == {"temperature": 0.0, "ignore_eos": True, "max_tokens": 3}


@pytest.mark.server
@pytest.mark.slow
def test_crosscheck_runs_both_tools_on_one_server(llm_server, tmp_path):
    out = tmp_path / "crosscheck.json"
    # Too small a run for the 10% agreement on a shared 2-core box: this checks the plumbing.
    crosscheck.main(["--url", llm_server.grpc_url, "--concurrency", "2", "--input-len", "8", "--output-len", "3",
                     "--num-prompts", "4", "--rounds", "1", "--warmup", "0", "--out", str(out)])
    (point,) = json.loads(out.read_text())
    assert point["concurrency"] == 2
    for side in ("kvtriton_bench", "perf_analyzer"):
        assert point[side]["errors"] == 0
        assert point[side]["output_token_throughput"] == pytest.approx(3 * point[side]["request_throughput"])
        assert 0 < point[side]["ttft_mean"] < 30
    assert point["perf_analyzer_summary_request_throughput"] > 0
