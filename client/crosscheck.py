"""Cross-check `kvtriton bench` against perf_analyzer on the same server and workload.

    python -m kvtriton.client.crosscheck --url localhost:8001 --concurrency 1,4

For each concurrency, prompts of the same lengths (prompts.py) go through our
asyncio load generator and then through perf_analyzer (gRPC streaming,
`--request-count` = the number of prompts, `--profile-export-file`). Each run
gets prompts of its own seed: the server's prefix cache would otherwise give
the second tool's requests a free prefill (a 1.5x lower TTFT seen here). Every
response timestamp perf_analyzer exported becomes a RequestRecord, and both
sides go through the same bench_report.summarize, so only the load generators
differ. perf_analyzer's own summary (throughput, average first-response latency)
is printed beside them. Exit status 1 if request throughput, output-token
throughput or mean TTFT differ by more than --tolerance.

perf_analyzer is the one bundled with tritonclient 2.51, with the libraries it
needs linked from the nvidia-pytriton wheel (kvtriton.client.perf_analyzer).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from kvtriton.client.api import AsyncLLMClient
from kvtriton.client.bench_report import distribution, summarize
from kvtriton.client.loadgen import LoadPoint, PointRun, RequestRecord, run_point
from kvtriton.client.perf_analyzer import find_perf_analyzer, perf_analyzer_env, perf_analyzer_libs
from kvtriton.client.prompts import BenchPrompt, make_prompts

COMPARED = (("request_throughput", "req/s"), ("output_token_throughput", "out tok/s"), ("ttft_mean", "TTFT mean s"),
            ("ttft_p50", "TTFT p50 s"))
CHECKED = ("request_throughput", "output_token_throughput", "ttft_mean")
_PA_SUMMARY = re.compile(r"Concurrency: (\d+), throughput: ([0-9.]+) infer/sec, latency (\d+) usec")

# The names `kvtriton serve` uses (kvtriton.backend.entrypoints); repeated here because the client
# library imports nothing of the backend.
ADMIN_KEY_ENV = "KVTRITON_ADMIN_KEY"
ADMIN_KEY_HEADER = "kvtriton-admin-key"

def input_data(prompts: Sequence[BenchPrompt], sampling: dict[str, Any]) -> dict[str, Any]:
    """perf_analyzer's --input-data: one entry per prompt, the inputs our client sends."""
    return {"data": [{"text_input": [p.text], "stream": [True], "exclude_input_in_output": [True],
                      "sampling_parameters": [json.dumps({**sampling, "max_tokens": p.max_tokens})]}
                     for p in prompts]}


def records_from_export(export: dict[str, Any]) -> list[RequestRecord]:
    records = []
    for experiment in export["experiments"]:
        for r in experiment["requests"]:
            times = [t / 1e9 for t in r["response_timestamps"]]
            outputs = r.get("response_outputs", [{}] * len(times))
            tokens = [(t, int(o.get("num_output_tokens", 0))) for t, o in zip(times, outputs)]
            token_times = [t for t, n in tokens if n]
            records.append(RequestRecord.from_chunks(
                r["timestamp"] / 1e9, times[-1] if times else r["timestamp"] / 1e9, token_times,
                [n for _, n in tokens if n], int(outputs[0].get("num_input_tokens", 0)) if outputs else 0,
                None if times else "no response"))
    return records


def run_perf_analyzer(binary: Path, libs: Path, args: argparse.Namespace, concurrency: int, data: Path,
                      export: Path) -> tuple[list[RequestRecord], dict[str, float]]:
    command = [str(binary), "-m", args.model, "-u", args.url, "-i", "grpc", "--streaming",
               "--input-data", str(data), "--concurrency-range", str(concurrency),
               "--request-count", str(args.num_prompts), "--profile-export-file", str(export)]
    if admin_key := os.environ.get(ADMIN_KEY_ENV):
        # `kvtriton serve` keeps the statistics API (which perf_analyzer reads) behind its admin key.
        command += ["-H", f"triton-grpc-protocol-{ADMIN_KEY_HEADER}:{admin_key}"]
    done = subprocess.run(command, capture_output=True, text=True, env=perf_analyzer_env(libs), timeout=args.pa_timeout)
    if done.returncode != 0:
        raise SystemExit(f"perf_analyzer failed ({done.returncode}): {' '.join(command)}\n{done.stdout[:2000]}"
                         f"\n{done.stderr[-2000:]}")
    m = _PA_SUMMARY.search(done.stdout)
    own = {"request_throughput": float(m.group(2))} if m else {}
    print(f"$ LD_LIBRARY_PATH={libs} {' '.join(command)}", file=sys.stderr)
    return records_from_export(json.loads(export.read_text())), own


def pooled(runs: Sequence[PointRun]) -> dict[str, float]:
    """Both throughputs over the runs' summed durations; TTFT over all their requests."""
    summaries = [summarize(run) for run in runs]
    duration = sum(s["duration_s"] for s in summaries)
    ttft = distribution([r.first_token - r.start for run in runs for r in run.records
                         if r.ok and r.first_token is not None])
    return {"request_throughput": sum(s["completed"] for s in summaries) / duration,
            "output_token_throughput": sum(s["total_output_tokens"] for s in summaries) / duration,
            "ttft_mean": ttft["mean"], "ttft_p50": ttft["p50"],
            "errors": sum(s["errors"] for s in summaries)}


async def run_ours(args: argparse.Namespace, prompts, sampling, concurrency: int, warmup) -> PointRun:
    async with AsyncLLMClient(args.url, protocol="grpc", model=args.model) as client:
        await run_point(client, warmup, LoadPoint(concurrency=1), sampling)
        return await run_point(client, prompts, LoadPoint(concurrency=concurrency), sampling)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvtriton.client.crosscheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="gRPC host:port (perf_analyzer streams over gRPC only)")
    parser.add_argument("--model", default="llm")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated (default 1,4)")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--num-prompts", type=int, default=16, help="requests per run (16)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs per tool and point, in alternating order, so drift on a shared host hits both (2)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests before each of our runs (2)")
    parser.add_argument("--tolerance", type=float, default=0.10, help="largest relative difference (0.10)")
    parser.add_argument("--pa-timeout", type=float, default=600, help="seconds per perf_analyzer run")
    parser.add_argument("--out", help="write the compared figures as JSON")
    args = parser.parse_args(argv)

    sampling = {"temperature": 0.0, "ignore_eos": True}  # every request makes exactly max_tokens tokens
    binary = find_perf_analyzer()
    seeds = iter(range(1000, 10**6, 1000))  # fresh prompts for every run: no prefix-cache hits across runs
    failed, results = False, []
    with tempfile.TemporaryDirectory(prefix="kvtriton-crosscheck-") as tmp:
        tmp = Path(tmp)
        libs = perf_analyzer_libs(tmp)
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            point = LoadPoint(concurrency=concurrency)
            ours, theirs, pa_own = [], [], []
            for round_ in range(args.rounds):
                warmup = (make_prompts(args.warmup, args.input_len, args.output_len, seed=next(seeds))
                          if args.warmup else [])
                our_prompts = make_prompts(args.num_prompts, args.input_len, args.output_len, seed=next(seeds))
                data = tmp / f"input-c{concurrency}-{round_}.json"
                data.write_text(json.dumps(input_data(
                    make_prompts(args.num_prompts, args.input_len, args.output_len, seed=next(seeds)), sampling)))
                export = tmp / f"export-c{concurrency}-{round_}.json"
                # Odd rounds run perf_analyzer first: a drift in the host's load hits both tools alike.
                for tool in (("ours", "pa") if round_ % 2 == 0 else ("pa", "ours")):
                    if tool == "ours":
                        ours.append(asyncio.run(run_ours(args, our_prompts, sampling, concurrency, warmup)))
                    else:
                        records, own = run_perf_analyzer(binary, libs, args, concurrency, data, export)
                        theirs.append(PointRun(point, records))
                        pa_own.append(own.get("request_throughput"))
            a, b = pooled(ours), pooled(theirs)
            own_rps = sum(pa_own) / len(pa_own) if None not in pa_own else None
            print(f"\nconcurrency {concurrency}: {args.rounds} x {args.num_prompts} requests per tool, "
                  f"in {args.input_len} / out {args.output_len} tokens")
            print(f"{'metric':>14} {'kvtriton bench':>15} {'perf_analyzer':>14} {'ratio':>7} {'PA summary':>11}")
            for key, name in COMPARED:
                ratio = a[key] / b[key] if b[key] else float("nan")
                bad = key in CHECKED and not abs(ratio - 1) <= args.tolerance
                failed |= bad
                own = f"{own_rps:.4g}" if key == "request_throughput" and own_rps is not None else "-"
                flag = "  <-- differs" if bad else ""
                print(f"{name:>14} {a[key]:>15.4g} {b[key]:>14.4g} {ratio:>7.3f} {own:>11}{flag}")
            failed |= a["errors"] + b["errors"] > 0
            results.append({"concurrency": concurrency, "kvtriton_bench": a, "perf_analyzer": b,
                            "perf_analyzer_summary_request_throughput": own_rps})
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'FAIL' if failed else 'OK'}: tolerance {args.tolerance:.0%} on {', '.join(CHECKED)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
