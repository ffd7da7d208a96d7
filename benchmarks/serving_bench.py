"""Serving benchmark: streamed output tok/s through tritonserver vs the same engine in-process.

Closed loop: C clients, each sending requests one after another (prompt ~100
tokens, 128 output tokens, EOS ignored). The server path is HTTP SSE
(`generate_stream`, a thread and a connection per client) or gRPC streaming
(--protocol grpc: the kvtriton asyncio client, every client a task on one
event loop; or --load-generator perf_analyzer: NVIDIA's C++ perf_analyzer,
which takes about half the asyncio client's CPU); the CPU cores the server's
processes and the clients used while generating are printed beside it, and
the server's CPU per output token by process (the engine process, Triton's
Python stub, tritonserver). Also
measures the cost of one streamed response: the same saturated load with
stream_interval 1 and 16; the time saved divided by the responses saved.

  python benchmarks/serving_bench.py --config llama-1b --concurrency 1,16,64     # GPU host
  python benchmarks/serving_bench.py --concurrency 1,4 --output-len 32          # CPU, default model
  python benchmarks/serving_bench.py --concurrency 1,32 --protocol grpc --load-generator perf_analyzer --hf

--llama-server BIN (CPU, default model) also serves the default model's own GGUF file with llama.cpp's
`llama-server` (started for each concurrency with a slot per client, -np, continuous batching), driven by
the same closed loop over its streaming /completion endpoint (the same prompts, greedy, EOS ignored), with
its cores measured the same way. The benchmark does not build llama.cpp: pass a binary you built (README: Benchmarks).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import http.client
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import LLAMA_1B  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402
from kvtriton.backend.engine.sampling_params import SamplingParams  # noqa: E402
from kvtriton.backend.entrypoints.pbtxt_parameters import set_parameters  # noqa: E402
from kvtriton.backend.entrypoints.tritonserver import TritonServer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORDS = "the engine schedules tokens not phases and every step hands out one budget".split()


def prompt(i: int) -> str:
    return f"Request {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(90))


def closed_loop(concurrency: int, requests_per_client: int, one_request) -> dict:
    tokens, responses, lock = [0], [0], threading.Lock()

    def client(c):
        for r in range(requests_per_client):
            n, k = one_request(c * 1000 + r)
            with lock:
                tokens[0] += n
                responses[0] += k
    threads = [threading.Thread(target=client, args=(c,)) for c in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return dict(tok_s=tokens[0] / wall, wall_s=wall, tokens=tokens[0], responses=responses[0])


def engine_request(engine, output_len):
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)

    def one(i):
        n = k = 0
        for out in engine.add_request(f"r{i}-{time.monotonic_ns()}", prompt(i), params):
            n += len(out.token_ids)
            k += 1
        return n, k
    return one


def sse_request(port, output_len):
    body = json.dumps({"text_input": prompt(0), "stream": True, "max_tokens": output_len, "ignore_eos": True,
                       "temperature": 0.0})

    def one(i):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/v2/models/llm/generate_stream", body.replace("Request 0", f"Request {i}"),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        n = k = 0
        for line in resp:
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                n += event["num_output_tokens"]
                k += 1
        conn.close()
        return n, k
    return one


def grpc_load(url, output_len):
    """Closed loop through the kvtriton asyncio client over gRPC streaming: every client a task on one event
    loop, as `kvtriton bench` runs them. A thread per client, each with its own gRPC stream thread, used 0.08
    of this 2-core machine's cores at 32 clients: CPU the server being measured then does not get."""
    from kvtriton.client.api import AsyncLLMClient

    def load(concurrency: int, requests_per_client: int) -> dict:
        async def run() -> dict:
            counts = [0, 0]
            async with AsyncLLMClient(url, protocol="grpc") as client:
                async def one_client(c):
                    for r in range(requests_per_client):
                        async with client.stream(prompt(c * 1000 + r), max_tokens=output_len, ignore_eos=True,
                                                 temperature=0.0) as stream:
                            async for chunk in stream:
                                counts[0] += chunk.num_output_tokens
                                counts[1] += 1
                await client.wait_ready()
                t0 = time.perf_counter()
                await asyncio.gather(*(one_client(c) for c in range(concurrency)))
                wall = time.perf_counter() - t0
            return dict(tok_s=counts[0] / wall, wall_s=wall, tokens=counts[0], responses=counts[1])
        return asyncio.run(run())
    return load


def perf_analyzer_load(url, output_len):
    """Closed loop through perf_analyzer (tritonclient's C++ load generator, `python -m
    kvtriton.client.perf_analyzer`) over gRPC streaming: C concurrent requests, C x requests-per-client in
    all, the same prompts and sampling. Its profile export times every response; the figures span the first
    request to the last response (span_s), so its own start-up is not counted as serving time."""
    def load(concurrency: int, requests_per_client: int) -> dict:
        count = concurrency * requests_per_client
        sampling = json.dumps({"max_tokens": output_len, "ignore_eos": True, "temperature": 0.0})
        data = {"data": [{"text_input": [prompt(c * 1000 + r)], "stream": [True], "exclude_input_in_output": [True],
                          "sampling_parameters": [sampling]}
                         for c in range(concurrency) for r in range(requests_per_client)]}
        folder = Path(tempfile.mkdtemp())
        (folder / "input.json").write_text(json.dumps(data))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kvtriton.client.perf_analyzer", "perf_analyzer", "-m", "llm", "-i",
                        "grpc", "-u", url, "--streaming", "--concurrency-range", str(concurrency), "--request-count",
                        str(count), "--input-data", str(folder / "input.json"), "--profile-export-file",
                        str(folder / "export.json")], check=True, capture_output=True)
        wall = time.perf_counter() - t0
        requests = json.loads((folder / "export.json").read_text())["experiments"][0]["requests"]
        shutil.rmtree(folder)
        tokens = sum(int(r.get("num_output_tokens", 0)) for q in requests for r in q["response_outputs"])
        span = (max(q["response_timestamps"][-1] for q in requests) - min(q["timestamp"] for q in requests)) / 1e9
        return dict(tok_s=tokens / span, wall_s=wall, span_s=span, tokens=tokens,
                    responses=sum(len(q["response_timestamps"]) for q in requests))
    return load


def llama_server_request(port, output_len):
    """One request to llama.cpp's llama-server (/completion, streamed): its tokens and streamed events."""
    def one(i):
        body = json.dumps({"prompt": prompt(i), "n_predict": output_len, "ignore_eos": True, "stream": True,
                           "temperature": 0.0, "cache_prompt": False})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"llama-server answered {resp.status}: {resp.read()[:200]!r}")
        n = k = 0
        for line in resp:
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                k += 1
                if event.get("stop"):
                    n = event["timings"]["predicted_n"]
        conn.close()
        return n, k
    return one


def llama_server_run(binary: str, gguf: Path, levels: list[int], output_len: int, requests_per_client: int) -> dict:
    """llama.cpp's server on the same GGUF and workload, started for each concurrency with a slot per client
    (-np), every core, a context per slot for the prompt and the output. {clients: closed_loop's figures +
    server_cores}."""
    out = {}
    for c in levels:
        with _llama_server(binary, gguf, c, 256 + output_len) as (server, port):
            one = llama_server_request(port, output_len)
            closed_loop(min(2, c), 1, one)  # warm-up
            cpu0 = process_tree_cpu_s(server.pid)
            out[c] = closed_loop(c, requests_per_client, one)
            out[c]["server_cores"] = (process_tree_cpu_s(server.pid) - cpu0) / out[c]["wall_s"]
    return out


@contextlib.contextmanager
def _llama_server(binary: str, gguf: Path, slots: int, slot_context: int):
    """A running llama-server with `slots` parallel sequences: (its Popen, its port)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [binary, "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
           "-c", str(slots * slot_context), "-t", str(os.cpu_count()), "--no-webui"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"llama-server exited ({server.returncode}): {server.stderr.read()[-500:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server was not ready within 120 s")
            time.sleep(0.5)
        yield server, port
    finally:  # llama-server may finish its slots' work before it honours SIGTERM
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _children_cpu_s() -> float:
    """CPU seconds (user + system) this process's finished children used (perf_analyzer)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# What each process of a served model is, by its name in /proc (a name is cut at 15 characters there).
_ROLES = {"tritonserver": "tritonserver", "triton_python_b": "Python stub"}


def process_tree_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by `pid` and every process below it (Linux /proc), by role: the
    server binary, the Python backend's stub, and the rest ("engine": the stub's engine process, which runs the
    model, and any helper it started)."""
    ticks = os.sysconf("SC_CLK_TCK")
    parents, cpu, names = {}, {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
        p = int(entry.name)
        parents[p], names[p] = int(fields[1]), name
        cpu[p] = (int(fields[11]) + int(fields[12])) / ticks
    tree, frontier = {pid}, [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(frontier)
    by_role: dict[str, float] = {}
    for p in tree:
        role = _ROLES.get(names.get(p, ""), "engine")
        by_role[role] = by_role.get(role, 0.0) + cpu.get(p, 0.0)
    return by_role


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and every process below it."""
    return sum(process_tree_cpu(pid).values())


def _own_cpu_s() -> float:
    """CPU seconds (user + system) this process has used: the benchmark's clients."""
    t = os.times()
    return t.user + t.system


def repository(model: str | Path, dummy: bool, stream_interval: int, max_num_seqs: int, compile_: bool,
               cancel_poll_s: float = 0.0, engine_process: bool = True, quantization: str = "auto",
               single_team: bool = False, compile_cpu_decode: bool = False) -> Path:
    repo = Path(tempfile.mkdtemp()) / "repo"
    shutil.copytree(ROOT / "model_repository", repo)
    values = {"model": str(model), "stream_interval": str(stream_interval), "max_num_seqs": str(max_num_seqs),
              "max_num_batched_tokens": "2048", "max_model_len": "2048",
              "enable_torch_compile": str(compile_).lower(), "cancel_poll_interval_s": str(cancel_poll_s),
              "engine_process": str(engine_process).lower(), "quantization": quantization,
              "cpu_single_openmp_team": str(single_team).lower(),
              "cpu_compile_decode": str(compile_cpu_decode).lower()}
    if dummy:
        values["dummy_weights"] = "true"
    set_parameters(repo / "llm" / "config.pbtxt", values)
    return repo


def hf_baseline(folder: Path, dummy: bool, levels: list[int], output_len: int) -> dict[int, float]:
    """HF `generate` (greedy, EOS ignored) on the same prompts, each concurrency as one static batch."""
    from engine_bench import _save_dummy_for_hf, run_hf

    from kvtriton.backend.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(folder)
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    hf_folder = _save_dummy_for_hf(folder, dtype) if dummy else str(folder)
    ids = [tokenizer.encode(prompt(i)) for i in range(max(levels))]
    return {c: run_hf(hf_folder, ids[:c], output_len, "cuda" if cuda else "cpu", dtype, c)["tok_s"] for c in levels}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["default", "llama-1b"], default="default")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--stream-intervals", default="4,16",
                    help="coalescing intervals also measured at the top concurrency (1 is always measured)")
    ap.add_argument("--cancel-poll-intervals", default="",
                    help="cancel_poll_interval_s values also measured at the top concurrency (stream_interval 1)")
    ap.add_argument("--torch-compile", default="off", choices=["on", "off"],
                    help="CUDA decode graphs compiled (slow start-up) or eager; the same on both sides")
    ap.add_argument("--tokenizer",
                    help="folder with tokenizer.json for --config llama-1b (default: the default model's)")
    ap.add_argument("--protocol", default="sse", choices=["sse", "grpc"], help="the clients' streaming protocol")
    ap.add_argument("--load-generator", default="kvtriton", choices=["kvtriton", "perf_analyzer"],
                    help="the server path's clients: kvtriton's (SSE threads, or gRPC asyncio) or perf_analyzer "
                         "(gRPC streaming; tritonclient[all] 2.51 bundles it)")
    ap.add_argument("--hf", action="store_true",
                    help="also HF transformers generate on the same prompts, as static batches of each concurrency")
    ap.add_argument("--llama-server", metavar="BIN",
                    help="also llama.cpp's llama-server binary on the default model's GGUF, the same closed loop")
    ap.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4", "fp8"],
                    help="the same on both sides (auto, as the shipped config.pbtxt: int4 for a GGUF on the CPU)")
    ap.add_argument("--cpu-single-openmp-team", default="on", choices=["on", "off"],
                    help="cpu_single_openmp_team on both sides (on, as the shipped config.pbtxt; README: CPU threads)")
    ap.add_argument("--cpu-compile-decode", default="on", choices=["on", "off"],
                    help="cpu_compile_decode on both sides (on, as the shipped config.pbtxt; README: Compiled decode)")
    ap.add_argument("--engine-process", default="on", choices=["on", "off", "both"],
                    help="the engine in a process of its own inside the Triton stub (the shipped default)")
    args = ap.parse_args()
    if args.llama_server and args.config != "default":
        ap.error("--llama-server serves the default model's GGUF: use --config default")
    if args.load_generator == "perf_analyzer" and args.protocol != "grpc":
        ap.error("--load-generator perf_analyzer streams over gRPC only: add --protocol grpc")
    args.cpu_single_openmp_team = args.cpu_single_openmp_team == "on"
    args.cpu_compile_decode = args.cpu_compile_decode == "on"
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.tokenizer and args.config == "llama-1b":
        default = Path(args.tokenizer)
    else:
        from kvtriton.backend.models.default_model import ensure_default_model

        default = ensure_default_model(progress=lambda *_: None)
    if args.config == "llama-1b":
        folder = Path(tempfile.mkdtemp()) / "llama-1b"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(LLAMA_1B))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(default / name, folder / name)
        dummy = True
    else:
        folder, dummy = default, False
    # The engine's `model`: for the default config "default" itself (its GGUF), so that quantization auto picks
    # what the shipped repository serves (int4 on the CPU); the converted folder serves HF and the tokenizer.
    served = "default" if args.config == "default" else str(folder)
    max_seqs = max(64, max(levels))
    cuda = torch.cuda.is_available()
    print(f"# serving benchmark: {args.config}, {'dummy' if dummy else 'real'} weights, "
          f"{torch.cuda.get_device_name() if cuda else 'CPU'}; torch {torch.__version__}, python "
          f"{platform.python_version()}; prompt ~100 tokens, {args.output_len} output tokens, EOS ignored, "
          f"{args.requests_per_client} requests per client; clients: {args.load_generator} over {args.protocol}; "
          f"quantization {args.quantization}; cpu_compile_decode "
          f"{args.cpu_compile_decode}; load average "
          f"{os.getloadavg()[0]:.1f}")
    results = {"in_process": {}, "server": {}}

    compile_ = args.torch_compile == "on"
    engine = LLMEngine(EngineConfig(model=served, dummy_weights=dummy, max_num_seqs=max_seqs,
                                    max_num_batched_tokens=2048, max_model_len=2048,
                                    enable_torch_compile=compile_, quantization=args.quantization,
                                    cpu_single_openmp_team=args.cpu_single_openmp_team,
                                    cpu_compile_decode=args.cpu_compile_decode)).start()
    one = engine_request(engine, args.output_len)
    closed_loop(2, 1, one)  # warm-up
    for c in levels:
        results["in_process"][c] = closed_loop(c, args.requests_per_client, one)
    engine.shutdown()
    del engine, one
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    def serve(interval, level_list, cancel_poll_s=0.0, engine_process=True):
        out = {}
        repo = repository(served, dummy, interval, max_seqs, compile_, cancel_poll_s, engine_process,
                          args.quantization, args.cpu_single_openmp_team, args.cpu_compile_decode)
        with TritonServer(repo, ready_timeout_s=600) as server:
            if args.load_generator == "perf_analyzer":
                load = perf_analyzer_load(server.grpc_url, args.output_len)
            elif args.protocol == "grpc":
                load = grpc_load(server.grpc_url, args.output_len)
            else:
                load = functools.partial(closed_loop, one_request=sse_request(server.http_port, args.output_len))
            load(2, 1)
            for c in level_list:
                cpu0, own0 = process_tree_cpu(server.process.pid), _own_cpu_s() + _children_cpu_s()
                out[c] = load(c, args.requests_per_client)
                cpu = process_tree_cpu(server.process.pid)
                used = {role: s - cpu0.get(role, 0.0) for role, s in cpu.items()}
                # The server idles outside the span (perf_analyzer's start-up): its CPU over the span is its cores.
                out[c]["server_cores"] = sum(used.values()) / out[c].get("span_s", out[c]["wall_s"])
                out[c]["server_cpu_ms_per_token"] = {role: 1e3 * s / max(1, out[c]["tokens"])
                                                     for role, s in sorted(used.items(), key=lambda kv: -kv[1])}
                # The clients share the machine with the server: on a small CPU what they use is not the server's.
                out[c]["client_cores"] = (_own_cpu_s() + _children_cpu_s() - own0) / out[c]["wall_s"]
        return out
    if args.engine_process == "both":
        results["server_in_stub"] = serve(1, levels, engine_process=False)
    results["server"] = serve(1, levels, engine_process=args.engine_process != "off")
    top = max(levels)
    coalesced = {k: serve(k, [top])[top] for k in map(int, filter(None, args.stream_intervals.split(",")))}
    for poll in filter(None, args.cancel_poll_intervals.split(",")):
        run = serve(1, [top], float(poll))[top]
        results[f"cancel_poll_{poll}"] = run
        print(f"cancel_poll_interval_s {poll} at {top} clients, stream_interval 1: {run['tok_s']:.1f} tok/s = "
              f"{run['tok_s'] / results['in_process'][top]['tok_s']:.2f} of in-process", flush=True)

    print(f"{'clients':>8} {'in-process tok/s':>17} {'tritonserver tok/s':>19} {'ratio':>6} {'server cores':>12} "
          f"{'client cores':>12}"
          + ("   engine in the stub: tok/s, ratio" if "server_in_stub" in results else ""))
    for c in levels:
        a, b = results["in_process"][c], results["server"][c]
        line = (f"{c:>8} {a['tok_s']:>17.1f} {b['tok_s']:>19.1f} {b['tok_s'] / a['tok_s']:>6.2f} "
                f"{b['server_cores']:>12.2f} {b['client_cores']:>12.2f}")
        if "server_in_stub" in results:
            s = results["server_in_stub"][c]
            line += f"   {s['tok_s']:.1f}, {s['tok_s'] / a['tok_s']:.2f}"
        print(line)
    for c in levels:  # where the server's cores go: on a small CPU, what is not the engine's slows it down
        split = results["server"][c]["server_cpu_ms_per_token"]
        print(f"server CPU at {c} clients, ms per output token: "
              + ", ".join(f"{role} {ms:.3f}" for role, ms in split.items()))
    s1, base = results["server"][top], results["in_process"][top]
    for k, run in coalesced.items():
        serving_s = s1.get("span_s", s1["wall_s"]) - run.get("span_s", run["wall_s"])
        per_response = serving_s / max(1, s1["responses"] - run["responses"])
        print(f"stream_interval {k} at {top} clients: {run['tok_s']:.1f} tok/s = {run['tok_s'] / base['tok_s']:.2f} of "
              f"in-process ({run['responses']} responses vs {s1['responses']}); one streamed response costs "
              f"~{per_response * 1e6:.0f} us of wall time")
        results[f"stream_interval_{k}"] = dict(run, per_response_cost_us=per_response * 1e6)
    if args.hf:
        results["hf"] = hf_baseline(folder, dummy, levels, args.output_len)
        for c in levels:
            b = results["server"][c]["tok_s"]
            print(f"HF transformers generate, static batch {c}: {results['hf'][c]:.1f} tok/s; "
                  f"through tritonserver / HF = {b / results['hf'][c]:.2f}x")
    if args.llama_server:
        from kvtriton.backend.models.default_model import ensure_default_gguf

        version = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True)
        print(f"llama.cpp: {(version.stdout + version.stderr).strip().splitlines()[-2:]}")
        results["llama_server"] = llama_server_run(args.llama_server, ensure_default_gguf(progress=lambda *_: None),
                                                   levels, args.output_len, args.requests_per_client)
        for c in levels:
            b, ll = results["server"][c], results["llama_server"][c]
            print(f"llama.cpp llama-server -np {c}, {c} clients: {ll['tok_s']:.1f} tok/s, "
                  f"{ll['server_cores']:.2f} cores; through tritonserver / llama.cpp = {b['tok_s'] / ll['tok_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
