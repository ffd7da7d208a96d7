"""Tensor-parallel benchmark: decode step time and tok/s at TP = 1, 2, 4, the all-reduce time per step, and
the bound the split chases.

For each TP it prints:
  - the runner's decode step alone at batch B over contexts of C tokens (rank 0's view: the broadcast of
    the step's inputs, its shard's forward pass, the all-reduces, the logits gather);
  - the all-reduce time per step: one all-reduce of the (B, hidden) activations timed over the group
    (every rank taking part), times the 2 per layer + 1 for the embedding a step makes;
  - the bound: weight bytes / (TP x copy bandwidth) + that all-reduce cost. On a GPU host each rank has
    its own HBM; on a CPU the ranks share one memory bus, so there the bound is printed with TP = 1
    bandwidth too, and the figures measure overheads, not speed-up;
  - the engine's output tok/s over R requests of P random prompt tokens, M output tokens, greedy.

The model: the 1B-class config (benchmarks/engine_bench.py LLAMA_1B) with random weights; --num-layers
cuts its layers so that a CPU run finishes (the layer shapes stay the 1B's).

  python benchmarks/tp_bench.py --device cuda --tp 1,2,4                     # a GPU host with 4 GPUs
  python benchmarks/tp_bench.py --num-layers 2 --tp 1,2,4 --iterations 5     # CPU, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import model_folder  # noqa: E402
from loop_bench import copy_bandwidth, random_prompts, run_engine, runner_step  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402


def measure(config: EngineConfig, batch: int, context: int, iterations: int, warm_up, prompts,
            max_tokens: int) -> dict:
    engine = LLMEngine(config).start()
    try:
        step_s = runner_step(engine, batch, context, rounds=3, iterations=iterations)
        mc, tp = engine.model_config, config.tensor_parallel_size
        all_reduces = 2 * mc.num_layers + 1
        one = engine.runner.time_all_reduce((batch, mc.hidden_size), engine.dtype) if tp > 1 else 0.0
        reports = getattr(engine.runner, "shard_reports", None)
        rank_bytes = (max(r.param_bytes for r in reports) if reports else
                      sum(p.numel() * p.element_size() for p in engine.runner.model.parameters()))
        run_engine(engine, warm_up, 2)  # its own prompt: no prefix-cache hit for the measured run
        run = run_engine(engine, prompts, max_tokens)
    finally:
        engine.shutdown()
    return dict(tp=tp, step_ms=step_s * 1e3, all_reduce_ms=one * all_reduces * 1e3, one_all_reduce_us=one * 1e6,
                rank_weight_bytes=rank_bytes, tok_s=run["tok_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tp", default="1,2,4")
    ap.add_argument("--num-layers", type=int, default=0, help="cut the 1B config to this many layers (0: all 16)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--iterations", type=int, default=20, help="decode steps per timed round (3 rounds, median)")
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--tokenizer", help="folder with tokenizer.json (default: the default model's)")
    ap.add_argument("--json")
    args = ap.parse_args()
    folder, _ = model_folder("llama-1b", args.tokenizer)
    if args.num_layers:
        path = Path(folder) / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "num_hidden_layers": args.num_layers}))
    layers = json.loads((Path(folder) / "config.json").read_text())["num_hidden_layers"]
    rng = random.Random(0)
    warm_up, prompts = random_prompts(rng, 1, args.prompt_len), random_prompts(rng, args.requests, args.prompt_len)
    cuda = args.device.startswith("cuda")
    bandwidth = copy_bandwidth(args.device)
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"# tensor-parallel benchmark: 1B-class config, {layers} layers, random weights, "
          f"{'bf16' if cuda else 'fp32'}; decode step at batch {args.batch}, context {args.context}; engine "
          f"{args.requests} x ({args.prompt_len} prompt + {args.max_tokens} output) tokens, greedy")
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {device_name}, "
          f"{'NCCL' if cuda else 'gloo'}; {os.cpu_count()} CPUs; copy bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"load average before {os.getloadavg()[0]:.2f} (a shared, noisy machine)")
    rows = []
    for tp in (int(t) for t in args.tp.split(",")):
        config = EngineConfig(model=folder, device=args.device, dummy_weights=True, tensor_parallel_size=tp,
                              max_num_seqs=max(args.batch, args.requests), max_num_batched_tokens=1024,
                              max_model_len=1024, kv_cache_memory_gb=0.25, quantization="none")
        row = measure(config, args.batch, args.context, args.iterations, warm_up, prompts, args.max_tokens)
        row["bound_ms"] = (row["rank_weight_bytes"] / bandwidth) * 1e3 + row["all_reduce_ms"]
        row["load"] = os.getloadavg()[0]
        rows.append(row)
    base = rows[0]
    print(f"{'TP':>3} | {'step':>9} | {'vs TP' + str(base['tp']):>7} | {'all-reduce/step':>15} | "
          f"{'(one)':>8} | {'rank weights':>12} | {'bound':>9} | {'step/bound':>10} | {'tok/s':>7} | {'load':>5}")
    for r in rows:
        print(f"{r['tp']:>3} | {r['step_ms']:7.2f}ms | {base['step_ms'] / r['step_ms']:6.2f}x | "
              f"{r['all_reduce_ms']:13.3f}ms | {r['one_all_reduce_us']:6.0f}us | "
              f"{r['rank_weight_bytes'] / 1e9:10.3f}GB | {r['bound_ms']:7.2f}ms | "
              f"{r['bound_ms'] / r['step_ms']:10.0%} | {r['tok_s']:7.1f} | {r['load']:5.2f}")
    if not cuda:
        print("# CPU: the ranks share one memory bus and the cores (one OpenMP team each of cores/TP threads), so "
              "the TP = 1 bound (all weights / one bandwidth) holds for every TP here: "
              f"{rows[0]['rank_weight_bytes'] / bandwidth * 1e3:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
