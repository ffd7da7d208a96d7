"""Time to first token of one request alone, by prompt length, on the CPU: the shipped engine against its own
prompt threshold at 256 tokens and against HF transformers, in this process.

Each prompt is new to the prefix cache (its first tokens differ from every other's) and asks for one token, so
TTFT is the prompt's prefill and the first sample. Three variants, the first two alternated for each length and
round, HF after them (its OpenMP threads spin after each call and would slow the engine's):
  kvtriton    the shipped config.pbtxt's engine (quantization auto: int4 from the default model's GGUF, the
              bf16 copies' thresholds timed at load: README "Many rows take a bf16 copy")
  kvtriton-256  the same engine with the prompt-chunk threshold at 256 tokens (the rule before it was timed)
  hf          HF transformers fp32 `generate(max_new_tokens=1)` on the same ids (its CPU best: no static-cache
              compile there)
The first two share the weights: only `DenseRows.prompt` changes between them.

  python benchmarks/ttft_bench.py                          # 24, 48, 96, 160, 240 and 480 prompt tokens
  python benchmarks/ttft_bench.py --lengths 96,240 --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_bench  # noqa: E402
import precision_bench  # noqa: E402

from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402
from kvtriton.backend.models.default_model import ensure_default_model  # noqa: E402

TEXT = ("The river bends past the old mill, where the town keeps its records of floods, harvests and the names of "
        "every family that crossed the bridge in the years before the railway came. ")


def prompt_ids(text_ids: list[int], length: int, variant: int, round_: int) -> list[int]:
    """`length` ids of ordinary text (`text_ids`, at least as long), led by two ids that no other (length,
    variant, round) shares."""
    return [1000 + variant * 97 + round_, 2000 + length] + text_ids[: length - 2]


def hf_ttft(model, ids: list[int]) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([ids]), max_new_tokens=1, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="24,48,96,160,240,480", help="prompt tokens, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="the median of this many")
    parser.add_argument("--no-hf", action="store_true")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]

    shipped = types.SimpleNamespace(cpu_dense_min_rows=None, cpu_compile_decode=None, model="default")
    engine = LLMEngine(precision_bench.shipped_engine_config(shipped, "auto")).start()
    rows = engine.runner.model.dense_rows
    if rows is None:
        sys.exit("ttft_bench: the engine made no dense copies on this CPU (no int4 layers, or too little memory): "
                 "nothing to compare")
    timed = rows.prompt
    variants = {"kvtriton": timed, "kvtriton-256": 256}
    print(f"# ttft_bench: default model on the CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}; the shipped engine in-process; bf16 "
          f"copies from {rows.decode} decode sequences, prompt chunks from {timed} tokens (timed at load), other "
          f"steps from {rows.prefill}; median of {args.rounds} rounds, variants alternated")

    text_ids = engine.tokenizer.encode(TEXT * (max(lengths) // 20 + 2), add_special_tokens=False)
    engine_bench.run_engine(engine, [prompt_ids(text_ids, 64, 9, 99)], 2)  # warm-up
    ttft: dict[tuple[str, int], list[float]] = {}
    try:
        for length in lengths:
            for r in range(args.rounds):
                for v, (name, threshold) in enumerate(variants.items()):
                    rows.prompt = threshold
                    run = engine_bench.run_engine(engine, [prompt_ids(text_ids, length, v, r)], 1)
                    ttft.setdefault((name, length), []).append(run["ttft"][0])
    finally:
        rows.prompt = timed
        engine.shutdown()
    hf = None
    if not args.no_hf:  # after the engine: HF's OpenMP threads, spinning after each call, would slow the engine's
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(ensure_default_model(), dtype=torch.float32).eval()
        hf_ttft(hf, prompt_ids(text_ids, 64, 9, 99))  # warm-up
        for length in lengths:
            for r in range(args.rounds):
                ttft.setdefault(("hf", length), []).append(hf_ttft(hf, prompt_ids(text_ids, length, 0, r)))

    names = [*variants, *(["hf"] if hf is not None else [])]
    print(f"{'prompt tokens':>13}" + "".join(f"{n + ' ms':>16}" for n in names)
          + f"{'vs 256':>9}" + (f"{'vs hf':>8}" if hf is not None else ""))
    for length in lengths:
        ms = {n: statistics.median(ttft[(n, length)]) * 1e3 for n in names}
        line = f"{length:>13}" + "".join(f"{ms[n]:>16.1f}" for n in names)
        line += f"{ms['kvtriton-256'] / ms['kvtriton']:>8.2f}x"
        if hf is not None:
            line += f"{ms['hf'] / ms['kvtriton']:>7.2f}x"
        print(line)


if __name__ == "__main__":
    main()
