"""What sampling costs on the CPU: the shipped engine's output tok/s under common sampling settings, against greedy
decoding and against the device path's sampler (exponential race, full sort) in this process.

The shipped config.pbtxt's engine in-process (int4 from the default model's GGUF, one OpenMP team, compiled
decode), N requests at once, 128 output tokens each, EOS ignored. For each setting and N, two variants,
alternated round by round:
  cpu      the sampler as shipped: on a CPU, inverse-CDF draws and the top-k / top-p cut found among each
           row's largest logits (backend/engine/cpu_sampling.py)
  device   the same engine with `Sampler.cpu_forms` off: one exponential per vocabulary entry and a full
           sort of each row, as on a GPU (the sampler before cpu_sampling.py)
Greedy takes neither (argmax), so it is the ceiling both are measured against. With --hf, HF transformers fp32
`generate` with the same setting over static batches of N, after the engine (its OpenMP threads spin after each
call and would slow the engine's).

  python benchmarks/sampling_bench.py                      # 1 and 32 requests, 2 rounds
  python benchmarks/sampling_bench.py --concurrency 1,8,32 --rounds 3 --hf
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_bench  # noqa: E402
import precision_bench  # noqa: E402

from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402
from kvtriton.backend.engine.sampling_params import SamplingParams  # noqa: E402
from kvtriton.backend.models.default_model import ensure_default_model  # noqa: E402

SETTINGS = {  # name -> SamplingParams fields (and HF generate's)
    "greedy": dict(temperature=0.0),
    "temperature 1": dict(temperature=1.0),
    "top_p 0.9": dict(temperature=1.0, top_p=0.9),
    "t 0.8, top_k 40, top_p 0.9": dict(temperature=0.8, top_k=40, top_p=0.9),
}
TOPICS = ["a lighthouse", "a chess game", "the first snow", "a lost key", "an old map", "a quiet market",
          "a long train ride", "a garden at night"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,32", help="requests at once, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="the median of this many")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hf", action="store_true", help="also HF transformers fp32 generate, same settings")
    args = parser.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]

    shipped = types.SimpleNamespace(cpu_dense_min_rows=None, cpu_compile_decode=None, model="default")
    engine = LLMEngine(precision_bench.shipped_engine_config(shipped, "auto")).start()
    print(f"# sampling_bench: default model on the CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}; the shipped engine in-process; "
          f"{args.max_tokens} output tokens, EOS ignored; median of {args.rounds} rounds, variants alternated")
    prompts = [f"Write a short story about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(max(levels))]
    engine_bench.run_engine(engine, prompts[:2], 8)  # warm-up
    tok_s: dict[tuple[str, str, int], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for name, fields in SETTINGS.items():
                for n in levels:
                    params = [SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, **fields)] * n
                    for variant in (["cpu"] if name == "greedy" else ["cpu", "device"]):
                        engine.sampler.cpu_forms = variant == "cpu"
                        run = engine_bench.run_engine(engine, prompts[:n], args.max_tokens, params)
                        tok_s.setdefault((name, variant, n), []).append(run["tok_s"])
    finally:
        engine.sampler.cpu_forms = True
        engine.shutdown()
    hf = {}
    if args.hf:
        folder = ensure_default_model()
        ids = [engine.tokenizer.encode(p) for p in prompts]
        for name, fields in SETTINGS.items():
            sampling = {"do_sample": False} if name == "greedy" else {"do_sample": True, **fields}
            for n in levels:
                hf[(name, n)] = engine_bench.run_hf(folder, ids[:n], args.max_tokens, "cpu", torch.float32, n,
                                                   **sampling)["tok_s"]

    greedy = {n: statistics.median(tok_s[("greedy", "cpu", n)]) for n in levels}
    print(f"{'setting':>28}{'requests':>10}{'cpu tok/s':>11}{'device tok/s':>14}{'cpu/device':>12}"
          f"{'cpu/greedy':>12}" + (f"{'hf tok/s':>10}{'vs hf':>8}" if hf else ""))
    for name in SETTINGS:
        for n in levels:
            cpu = statistics.median(tok_s[(name, "cpu", n)])
            device = statistics.median(tok_s[(name, "device", n)]) if name != "greedy" else None
            line = (f"{name:>28}{n:>10}{cpu:>11.1f}" + (f"{device:>14.1f}{cpu / device:>11.2f}x" if device else
                                                          f"{'':>14}{'':>12}") + f"{cpu / greedy[n]:>11.2f}x")
            if hf:
                line += f"{hf[(name, n)]:>10.1f}{cpu / hf[(name, n)]:>7.2f}x"
            print(line)


if __name__ == "__main__":
    main()
