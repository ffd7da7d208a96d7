"""Benchmark statistics, the results file, the table and the plot.

Definitions (those of vLLM's benchmark_serving and genai-perf):
- TTFT: request sent -> first response holding a token.
- ITL: gap between consecutive tokens of a request (a response with k tokens counts
  its gap k times, divided by k).
- TPOT: per request, (e2e latency - TTFT) / (output tokens - 1).
- e2e latency: request sent -> last response.
- throughputs: completed requests (output tokens) / the point's duration, from the
  first request sent to the last response.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kvtriton.client.loadgen import PointRun, RequestRecord

LATENCY_METRICS = ("ttft_s", "itl_s", "tpot_s", "e2e_latency_s")
_MAX_ERRORS_KEPT = 5


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p90, p99 (None for all when there are no values)."""
    if len(values) == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(values, dtype=np.float64)  # (n,)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def _range(values: Sequence[int]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "min": None, "max": None}
    return {"mean": float(np.mean(values)), "min": int(min(values)), "max": int(max(values))}


def summarize(run: PointRun) -> dict[str, Any]:
    records = run.records
    ok: list[RequestRecord] = [r for r in records if r.ok]
    duration = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    tpot = [(r.end - r.first_token) / (r.num_output_tokens - 1) for r in ok
            if r.first_token is not None and r.num_output_tokens > 1]
    errors = [r.error for r in records if not r.ok]
    output_tokens = sum(r.num_output_tokens for r in ok)
    return {
        **run.point.to_dict(),
        "num_requests": len(records),
        "completed": len(ok),
        "errors": len(errors),
        "error_messages": sorted(set(errors))[:_MAX_ERRORS_KEPT],
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration > 0 else None,  # requests/s
        "output_token_throughput": output_tokens / duration if duration > 0 else None,  # tokens/s
        "total_output_tokens": output_tokens,
        "input_tokens": _range([r.num_input_tokens for r in ok]),
        "output_tokens": _range([r.num_output_tokens for r in ok]),
        "ttft_s": distribution([r.first_token - r.start for r in ok if r.first_token is not None]),
        "itl_s": distribution([gap for r in ok for gap in r.itl_s]),
        "tpot_s": distribution(tpot),
        "e2e_latency_s": distribution([r.end - r.start for r in ok]),
    }


def write_json(path: str | Path, setup: dict[str, Any], points: list[dict[str, Any]]) -> None:
    Path(path).write_text(json.dumps({"setup": setup, "points": points}, indent=2) + "\n")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def format_table(points: list[dict[str, Any]]) -> str:
    head = (f"{'load':>16} {'ok':>5} {'err':>4} {'req/s':>7} {'out tok/s':>9} "
            f"{'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>17} {'ITL p50 ms':>10} {'e2e p50/p99 ms':>17}")
    lines = [head]
    for p in points:
        load = f"c={p['concurrency']}" if p["concurrency"] is not None else f"rate={p['request_rate']}/s"
        rps = "-" if p["request_throughput"] is None else f"{p['request_throughput']:.2f}"
        tps = "-" if p["output_token_throughput"] is None else f"{p['output_token_throughput']:.1f}"
        pair = lambda m: f"{_ms(p[m]['p50'])}/{_ms(p[m]['p99'])}"  # noqa: E731
        lines.append(f"{load:>16} {p['completed']:>5} {p['errors']:>4} {rps:>7} {tps:>9} {pair('ttft_s'):>17} "
                     f"{pair('tpot_s'):>17} {_ms(p['itl_s']['p50']):>10} {pair('e2e_latency_s'):>17}")
    return "\n".join(lines)


def plot(path: str | Path, points: list[dict[str, Any]], title: str) -> None:
    """Output throughput against p50 TPOT and p50 TTFT, one marker per sweep point."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, name in ((axes[0], "tpot_s", "time per output token, p50 (ms)"),
                             (axes[1], "ttft_s", "time to first token, p50 (ms)")):
        shown = [p for p in points if p[metric]["p50"] is not None and p["output_token_throughput"] is not None]
        xs = [p[metric]["p50"] * 1e3 for p in shown]
        ys = [p["output_token_throughput"] for p in shown]
        ax.plot(xs, ys, marker="o")
        for p, x, y in zip(shown, xs, ys):
            label = f"c={p['concurrency']}" if p["concurrency"] is not None else f"{p['request_rate']}/s"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(name)
        ax.set_ylabel("output throughput (tokens/s)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
