"""`kvtriton bench --url ...`: serving benchmark over a concurrency or request-rate sweep.

Per sweep point: TTFT, ITL, TPOT and end-to-end latency (mean, p50, p90, p99),
request and output-token throughput, errors (definitions in bench_report).
Prompts are random common words of a known length (prompts.py), each sent as
one user message that the server wraps in the model's chat template, as a chat
application's requests are (--raw: the words alone); the lengths reported are
the server's token counts, template included. Greedy by default; --ignore-eos
makes every request produce exactly its max_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import os
import platform
import sys
from typing import Any, Sequence

import tqdm

from kvtriton.client.api import AsyncLLMClient
from kvtriton.client.bench_report import format_table, plot, summarize, write_json
from kvtriton.client.cli_args import (
    add_connection_arguments,
    add_template_arguments,
    async_client_from_args,
    run_command,
    template_hint,
)
from kvtriton.client.errors import LLMClientError
from kvtriton.client.generate_cmd import fail
from kvtriton.client.loadgen import LoadPoint, run_point
from kvtriton.client.prompts import make_prompts

PROG = "kvtriton bench"
EXAMPLES = """examples:
  kvtriton bench --url localhost:8001 --concurrency 1,4,16 --out bench.json --plot bench.png
  kvtriton bench --url localhost:8001 --request-rate 1,2,inf --input-len 256 --output-len 64 --random-range 0.5
  kvtriton bench --url http://localhost:8000 --raw --ignore-eos --num-prompts 32   # prompts without the template"""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (e.g. 1,4,16)") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrencies must be integers >= 1, got {text!r}")
    return values


def _rate_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]  # float("inf") parses
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of rates (e.g. 1,2,inf)") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"request rates must be > 0 (inf: all at once), got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    g = parser.add_argument_group("workload")
    g.add_argument("--input-len", type=int, default=128, help="prompt length in words, about one token each (128)")
    g.add_argument("--output-len", type=int, default=128, help="max_tokens per request (128)")
    g.add_argument("--random-range", type=float, default=0.0, metavar="R",
                   help="draw each length uniformly from len * [1 - R, 1 + R] (default 0: fixed)")
    g.add_argument("--num-prompts", type=int, default=64, help="requests per sweep point (64)")
    load = g.add_mutually_exclusive_group()
    load.add_argument("--concurrency", type=_int_list, default=None, metavar="C[,C...]",
                      help="closed loop: this many requests always in flight; a list sweeps (default 1)")
    load.add_argument("--request-rate", type=_rate_list, default=None, metavar="R[,R...]",
                      help="open loop: Poisson arrivals at R requests/s (inf: all at once); a list sweeps")
    g.add_argument("--warmup", type=int, default=2, metavar="K", help="unmeasured requests before the sweep (2)")
    add_template_arguments(g, "each prompt")
    g.add_argument("--ignore-eos", action="store_true", help="always generate max_tokens tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--seed", type=int, default=0, help="prompts and arrival times")
    o = parser.add_argument_group("output")
    o.add_argument("--out", metavar="FILE.json", help="write setup and per-point results as JSON")
    o.add_argument("--plot", metavar="FILE.png", help="plot output throughput against p50 TPOT and TTFT")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_points(args: argparse.Namespace) -> list[LoadPoint]:
    if args.request_rate is not None:
        return [LoadPoint(request_rate=r) for r in args.request_rate]
    return [LoadPoint(concurrency=c) for c in (args.concurrency or [1])]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _setup(args: argparse.Namespace, client: AsyncLLMClient, server: dict[str, Any]) -> dict[str, Any]:
    return {
        "url": client.endpoint.url, "protocol": client.endpoint.protocol, "model": args.model,
        "input_len": args.input_len, "output_len": args.output_len, "random_range": args.random_range,
        "num_prompts": args.num_prompts, "warmup": args.warmup, "ignore_eos": args.ignore_eos,
        "chat_template": not args.raw,
        "temperature": args.temperature, "seed": args.seed,
        "server": {"name": server.get("name"), "version": server.get("version")},
        "client": {"kvtriton": _version("kvtriton"), "tritonclient": _version("tritonclient"),
                   "python": platform.python_version(),
                   "host": platform.node(), "cpus": os.cpu_count()},
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


async def benchmark(args: argparse.Namespace, client: AsyncLLMClient) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    points = load_points(args)
    prompts = make_prompts(args.num_prompts, args.input_len, args.output_len, args.random_range, args.seed)
    sampling = {"temperature": args.temperature, "ignore_eos": True if args.ignore_eos else None}
    setup = _setup(args, client, await client.server_metadata())
    if args.warmup:
        warm = make_prompts(args.warmup, args.input_len, args.output_len, args.random_range, args.seed + 1)
        await run_point(client, warm, LoadPoint(concurrency=min(args.warmup, points[0].concurrency or 1)), sampling,
                        raw=args.raw)
    results = []
    for point in points:
        with tqdm.tqdm(total=len(prompts), desc=point.label, unit="req", file=sys.stderr,
                       disable=True if args.no_progress else None, leave=False) as bar:  # None: off when not a TTY
            run = await run_point(client, prompts, point, sampling, args.seed, on_done=lambda _: bar.update(1),
                                  raw=args.raw)
        results.append(summarize(run))
    return setup, results


async def _run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    async with async_client_from_args(args) as client:
        return await benchmark(args, client)


def run(args: argparse.Namespace) -> int:
    try:
        make_prompts(args.num_prompts, args.input_len, args.output_len, args.random_range)  # validates the workload
        if args.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
        async_client_from_args(args)  # validates --url/--protocol before any I/O
    except ValueError as e:
        return fail(PROG, str(e), 2)
    try:
        setup, results = asyncio.run(_run(args))
    except LLMClientError as e:
        return fail(PROG, f"{type(e).__name__}: {e}")
    except KeyboardInterrupt:
        return 130
    print(f"{setup['model']} at {setup['url']} (Triton {setup['server']['version']}): input {args.input_len} "
          f"output {args.output_len} words/tokens{'' if args.raw else ' (chat template around the input)'}, "
          f"{args.num_prompts} requests per point")
    print(format_table(results))
    if args.out:
        write_json(args.out, setup, results)
    if args.plot:
        title = f"{setup['model']} via {setup['protocol']}, in {args.input_len} / out {args.output_len}"
        plot(args.plot, results, title)
    if all(p["completed"] == 0 for p in results):
        first = results[0]["error_messages"][:1]
        return fail(PROG, f"every request failed, e.g. {first}{template_hint(str(first), args.raw)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(PROG, "Benchmark a running kvtriton server.", add_arguments, run, argv, EXAMPLES)


if __name__ == "__main__":
    sys.exit(main())
