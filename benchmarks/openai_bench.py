"""OpenAI frontend overhead: the same streamed chat requests through `kvtriton openai` (official `openai`
client, SSE) and straight to Triton (kvtriton's AsyncLLMClient, gRPC streaming), in the same run.

Closed loop: C clients, each sending requests one after another (a chat turn, --output-len tokens, EOS
ignored, greedy). The frontend runs as its own process (`kvtriton openai`), as it would in production;
the two paths alternate for --rounds rounds so that a noisy shared CPU hits both alike. Prints output
tok/s, mean TTFT and mean end-to-end latency per path, and the frontend's ratio to the direct path.

  python benchmarks/openai_bench.py --concurrency 1,8 --output-len 32          # CPU, default model
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from importlib.metadata import version
from pathlib import Path

import openai

from kvtriton.backend.entrypoints.tritonserver import TritonServer, free_ports
from kvtriton.client.api import AsyncLLMClient

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a lighthouse", "a robot", "the sea", "a violin", "a forest", "a city at night", "a comet", "a bakery"]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Tell me a story about {TOPICS[i % len(TOPICS)]}."}]


async def direct_request(client: AsyncLLMClient, i: int, output_len: int) -> tuple[float, float, int]:
    sent = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream(messages=messages(i), max_tokens=output_len, ignore_eos=True, temperature=0) as s:
        async for chunk in s:
            if chunk.num_output_tokens and first is None:
                first = time.perf_counter()
            tokens += chunk.num_output_tokens
    return first - sent, time.perf_counter() - sent, tokens


async def openai_request(client: openai.AsyncOpenAI, i: int, output_len: int) -> tuple[float, float, int]:
    sent = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model="llm", messages=messages(i), max_tokens=output_len, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first - sent, time.perf_counter() - sent, tokens


async def closed_loop(send, concurrency: int, requests_per_client: int) -> dict:
    results = []

    async def one_client(c: int) -> None:
        for r in range(requests_per_client):
            results.append(await send(c * requests_per_client + r))

    started = time.perf_counter()
    await asyncio.gather(*(one_client(c) for c in range(concurrency)))
    wall = time.perf_counter() - started
    return {"tok_s": sum(t for _, _, t in results) / wall, "ttft_ms": 1e3 * sum(r[0] for r in results) / len(results),
            "latency_ms": 1e3 * sum(r[1] for r in results) / len(results)}


async def measure(grpc_url: str, openai_url: str, args) -> None:
    direct = AsyncLLMClient(grpc_url)
    via = openai.AsyncOpenAI(base_url=openai_url, api_key="unused", max_retries=0, timeout=600)
    paths = {"direct gRPC (AsyncLLMClient)": lambda i: direct_request(direct, i, args.output_len),
             "OpenAI frontend (openai SSE)": lambda i: openai_request(via, i, args.output_len)}
    for send in paths.values():  # warm-up: first requests pay for connections and the prefix cache
        await closed_loop(send, 2, 1)
    for concurrency in args.concurrency:
        totals = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, send in paths.items():
                totals[name].append(await closed_loop(send, concurrency, args.requests_per_client))
        print(f"\nconcurrency {concurrency}, {args.requests_per_client} requests per client, {args.rounds} rounds, "
              f"{args.output_len} output tokens; load average {os.getloadavg()}")
        means = {name: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0]} for name, rs in totals.items()}
        for name, m in means.items():
            print(f"  {name:30} {m['tok_s']:8.1f} tok/s  TTFT {m['ttft_ms']:7.1f} ms  "
                  f"latency {m['latency_ms']:8.1f} ms")
        base, front = means.values()
        print(f"  frontend / direct: throughput {front['tok_s'] / base['tok_s']:.3f}x, "
              f"TTFT +{front['ttft_ms'] - base['ttft_ms']:.1f} ms, "
              f"latency +{front['latency_ms'] - base['latency_ms']:.1f} ms")
    await direct.aclose()
    await via.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,8", help="comma-separated client counts")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    print(f"openai_bench: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"tritonclient {version('tritonclient')}, openai {version('openai')}, fastapi {version('fastapi')}, "
          f"uvicorn {version('uvicorn')}; load average {os.getloadavg()} (a shared machine: figures are noisy)")
    log_dir = Path(tempfile.mkdtemp(prefix="openai-bench-"))
    server = TritonServer(args.model_repository, ready_timeout_s=600, log_path=log_dir / "tritonserver.log")
    server.start()
    frontend = None
    try:
        server.wait_ready()
        port = free_ports(1)[0]
        kvtriton = shutil.which("kvtriton") or str(Path(sys.executable).parent / "kvtriton")
        frontend = subprocess.Popen([kvtriton, "openai", "--url", server.grpc_url, "--port", str(port)],
                                    stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        asyncio.run(measure(server.grpc_url, f"http://127.0.0.1:{port}/v1", args))
    finally:
        if frontend is not None:
            frontend.terminate()
            frontend.wait(timeout=30)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
