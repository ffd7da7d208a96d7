"""Priority scheduling benchmark: how long an interactive request waits behind a saturating batch load.

Workload: a background of --background low-priority requests kept in flight (closed loop: each one that
ends is replaced at once), each a ~100-token prompt and --max-tokens output tokens, EOS ignored, greedy, on
an engine of --max-num-seqs seats, fewer than the background, so that some of it always waits. Once the
queue has formed, one interactive request (16 output tokens) arrives every --interval seconds. Printed per
policy: the interactive requests' TTFT and end-to-end latency (p50 / p90), the background's output tok/s
over the same window, and preemptions. The baseline, in the same process: scheduling_policy fcfs (every
request at priority 0), against priority (background 1, interactive 0).

  python benchmarks/priority_bench.py                                        # CPU, default model
  python benchmarks/priority_bench.py --device cuda --config llama-1b --background 96 --max-num-seqs 64
"""

from __future__ import annotations

import argparse
import platform
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import add_workload_options, model_folder, pct  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402
from kvtriton.backend.engine.sampling_params import SamplingParams  # noqa: E402

WORDS = "the engine schedules tokens not phases and every step hands out one budget".split()


def prompt(i: int) -> str:
    return f"Request {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(90))


def run_policy(args, folder: str, dummy: bool, policy: str) -> dict:
    engine = LLMEngine(EngineConfig(
        model=folder, dummy_weights=dummy, device=args.device, max_num_seqs=args.max_num_seqs,
        scheduling_policy=policy, quantization="auto", cpu_single_openmp_team=args.device == "cpu")).start()
    low = 1 if policy == "priority" else 0
    background = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, priority=low)
    interactive = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, priority=0)
    stop, counted, lock = threading.Event(), [0], threading.Lock()
    measuring = threading.Event()

    def background_client(c: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                stream = engine.add_request(f"bg{c}-{n}", prompt(c * 1000 + n), background)
            except Exception:
                if stop.is_set():
                    return  # the engine is shutting down
                raise
            for out in stream:
                if measuring.is_set():
                    with lock:
                        counted[0] += len(out.token_ids)
            n += 1

    try:
        engine.generate([prompt(-1)], interactive)  # warm-up: first-call costs out of the figures
        clients = [threading.Thread(target=background_client, args=(c,), daemon=True)
                   for c in range(args.background)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 120
        while engine.stats().num_waiting == 0:  # the queue has formed: the seats are all taken
            if time.monotonic() > deadline:
                raise RuntimeError("the background never filled the seats; raise --background")
            time.sleep(0.01)
        preemptions = engine.stats().num_preemptions
        measuring.set()
        t0 = time.perf_counter()
        ttft, e2e = [], []
        for i in range(args.requests):
            start = time.perf_counter()
            first = None
            for out in engine.add_request(f"ui{i}", prompt(10**6 + i), interactive):
                if first is None and out.token_ids:
                    first = out.time - out.arrival_time
            ttft.append(first)
            e2e.append(time.perf_counter() - start)
            time.sleep(max(0.0, args.interval - (time.perf_counter() - start)))
        window = time.perf_counter() - t0
        measuring.clear()
        with lock:
            tokens = counted[0]
        return dict(ttft=ttft, e2e=e2e, bg_tok_s=tokens / window,
                    preemptions=engine.stats().num_preemptions - preemptions)
    finally:
        stop.set()
        engine.shutdown(timeout_s=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_options(ap)
    ap.add_argument("--background", type=int, default=12, help="low-priority requests kept in flight")
    ap.add_argument("--max-num-seqs", type=int, default=8, help="the engine's seats (fewer than --background)")
    ap.add_argument("--requests", type=int, default=8, help="interactive requests measured")
    ap.add_argument("--interval", type=float, default=1.5, help="seconds between interactive requests")
    args = ap.parse_args()
    folder, dummy = model_folder(args.config, args.tokenizer)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {device}, {args.config} model")
    print(f"# background {args.background} requests of ~100 prompt + {args.max_tokens} output tokens kept in flight, "
          f"max_num_seqs {args.max_num_seqs}; {args.requests} interactive requests of 16 tokens, one every "
          f"{args.interval:g} s")
    runs = {policy: run_policy(args, folder, dummy, policy) for policy in ("fcfs", "priority")}
    print("| policy | interactive TTFT p50 / p90 (s) | interactive end-to-end p50 / p90 (s) | background tok/s "
          "| preemptions |")
    print("| --- | --- | --- | --- | --- |")
    for policy, r in runs.items():
        print(f"| {policy} | {pct(r['ttft'], 50):.3f} / {pct(r['ttft'], 90):.3f} | {pct(r['e2e'], 50):.3f} / "
              f"{pct(r['e2e'], 90):.3f} | {r['bg_tok_s']:.1f} | {r['preemptions']} |")
    base, prio = runs["fcfs"], runs["priority"]
    print(f"# interactive TTFT p50: priority / fcfs = {pct(prio['ttft'], 50) / pct(base['ttft'], 50):.3f}; "
          f"background tok/s: priority / fcfs = {prio['bg_tok_s'] / base['bg_tok_s']:.3f}")


if __name__ == "__main__":
    main()
