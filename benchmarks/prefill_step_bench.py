"""Prefill and mixed steps on CUDA: the runner's CUDA graph replay against the same step run eagerly, in the
same process (the eager path is the baseline: what every such step cost before the prefill graphs).

For each step shape (sequences x new tokens each, fresh prompts) it prints the host time (until the runner
returns) and the wall time (until the device is done), medians of 5 after 3 warm-ups, and the graph bucket the
step took. A step larger than max_prefill_graph_tokens prints "eager" in both columns' bucket.

  python benchmarks/prefill_step_bench.py --config llama-1b      # the GPU host, random weights
  python benchmarks/prefill_step_bench.py --prefill-graph-tokens 8192 --quantization fp8   # graphs to the budget
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import add_prefill_graph_option, model_folder  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402
from kvtriton.backend.runners.step_input import prepare_step  # noqa: E402

SHAPES = ((1, 20), (1, 80), (1, 128), (1, 500), (4, 128), (16, 32), (64, 8), (64, 4), (1, 1000), (8, 128),
          (1, 2000), (16, 128), (32, 128), (40, 128), (64, 128))


def scheduled(seqs: int, tokens: int, block_size: int) -> list[tuple[SimpleNamespace, int]]:
    """`seqs` fresh prompts of `tokens` tokens each, in blocks of their own (what prepare_step reads)."""
    blocks = -(-tokens // block_size)
    return [(SimpleNamespace(token_ids=[(7 * j + i) % 30000 for j in range(tokens)], num_computed_tokens=tokens,
                             block_ids=list(range(1 + i * blocks, 1 + (i + 1) * blocks)), spec_token_ids=[],
                             lora_adapter=0), tokens)
            for i in range(seqs)]


def timed(run, step_of) -> tuple[float, float]:
    """(host ms, wall ms): medians of 5 runs after 3 warm-ups."""
    host, wall = [], []
    for i in range(8):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(step_of())
        returned = time.perf_counter()
        torch.cuda.synchronize()
        if i >= 3:
            host.append((returned - start) * 1e3)
            wall.append((time.perf_counter() - start) * 1e3)
    return statistics.median(host), statistics.median(wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=["default", "llama-1b"], default="llama-1b")
    ap.add_argument("--tokenizer", help="folder with tokenizer.json for --config llama-1b (default: the default "
                    "model's, which a GPU host without network may not have)")
    ap.add_argument("--quantization", default="none", choices=["none", "fp8", "int4"])
    add_prefill_graph_option(ap, EngineConfig.max_prefill_graph_tokens)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefill_step_bench needs a CUDA GPU (the prefill graphs are CUDA graphs); none found")
    folder, dummy = model_folder(args.config, args.tokenizer)
    engine = LLMEngine(EngineConfig(model=folder, device="cuda", dummy_weights=dummy, max_num_seqs=64,
                                    max_num_batched_tokens=8192, max_model_len=2048, num_kv_blocks=8192,
                                    quantization=args.quantization, max_prefill_graph_tokens=args.prefill_graph_tokens))
    runner = engine.runner
    print(f"# prefill steps: {args.config} ({'random' if dummy else 'real'} weights), {args.quantization}, graphs to "
          f"{engine.config.max_prefill_graph_tokens} tokens; torch {torch.__version__}, python "
          f"{platform.python_version()}, {torch.cuda.get_device_name()}, {platform.processor() or platform.machine()}")
    print(f"{'step':>22} | {'bucket':>10} | {'graph host':>10} | {'graph wall':>10} | {'eager host':>10} | "
          f"{'eager wall':>10} | eager / graph")
    for seqs, tokens in SHAPES:
        step_of = lambda: prepare_step(scheduled(seqs, tokens, runner.block_size), runner.block_size,  # noqa: E731
                                       runner.device)
        bucket = runner._prefill_bucket(step_of())
        graph = timed(runner.execute, step_of)
        eager = timed(runner.execute_eager, step_of)
        print(f"{seqs:>4} x {tokens:>4} new tokens | {str(bucket or 'eager'):>10} | {graph[0]:8.2f}ms | "
              f"{graph[1]:8.2f}ms | {eager[0]:8.2f}ms | {eager[1]:8.2f}ms | {eager[1] / graph[1]:5.1f}x", flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
