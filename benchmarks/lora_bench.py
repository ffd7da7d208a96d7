"""Multi-LoRA benchmark: what serving requests through LoRA adapters costs against the base model.

The engine in-process, as shipped (the default model from its GGUF, quantization auto: int4 on the CPU, the CPU's
compiled and one-call decode and one OpenMP team), with --adapters random PEFT adapters of the model (every
projection, rank --rank) in lora_modules. Workloads, each
with --requests prompts of ~100 tokens in flight at once, --max-tokens output tokens, greedy, EOS ignored:
all on the base model (the baseline, same process), all on one adapter, and a mix (a third base, the rest
spread over the adapters); then one stream alone on the base and on an adapter. Printed: output tok/s, TTFT
p50, ITL p50 and the ratio to the base run. Beside them HF transformers with the adapter merged into its
weights (a merged model serves one adapter at no cost: the bound for an adapter's stream), batch 1.

  python benchmarks/lora_bench.py                      # CPU, default model
  python benchmarks/lora_bench.py --device cuda --config llama-1b --requests 64
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: its tests' adapter writer
from engine_bench import add_workload_options, model_folder, pct, run_engine  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402
from kvtriton.backend.engine.sampling_params import SamplingParams  # noqa: E402

from tests.lora_adapters import ALL_TARGETS, make_adapter, merged_hf_model  # noqa: E402

WORDS = "adapters share one base model and every step serves them side by side in one batch".split()


def prompt(i: int) -> str:
    return f"Request {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(90))


def params(args, lora_name: str | None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, lora_name=lora_name)


def row(name: str, run: dict, base: dict) -> str:
    return (f"| {name} | {run['tok_s']:.1f} | {pct(run['ttft'], 50) * 1e3:.0f} | {pct(run['itl'], 50) * 1e3:.1f} | "
            f"{run['tok_s'] / base['tok_s']:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_options(ap)
    ap.add_argument("--requests", type=int, default=16, help="prompts in flight at once")
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    args = ap.parse_args()
    folder, dummy = model_folder(args.config, args.tokenizer)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {device}, {args.config} model")
    print(f"# {args.adapters} adapters of rank {args.rank} on every projection; {args.requests} requests of ~100 "
          f"prompt + {args.max_tokens} output tokens in flight, greedy, EOS ignored")
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"lora{i}" for i in range(args.adapters)]
        paths = [make_adapter(Path(tmp) / n, folder, targets=ALL_TARGETS, rank=args.rank, alpha=2 * args.rank,
                              seed=i, scale=0.3) for i, n in enumerate(names)]
        engine = LLMEngine(EngineConfig(
            model="default" if args.config == "default" else folder, dummy_weights=dummy, device=args.device,
            max_num_seqs=max(args.requests, 1),
            quantization="auto", cpu_compile_decode=args.device == "cpu",
            cpu_single_openmp_team=args.device == "cpu",
            lora_modules=",".join(f"{n}={p}" for n, p in zip(names, paths)))).start()
        try:
            # Each workload its own prompts: the prefix cache would otherwise serve a later workload's prompts.
            prompts = lambda w: [prompt(1000 * w + i) for i in range(args.requests)]  # noqa: E731
            engine.generate([prompt(-1)], params(args, names[0]))  # warm-up: first-call costs out of the figures
            engine.generate([prompt(-2)], params(args, None))
            mix = [None if i % 3 == 0 else names[i % len(names)] for i in range(args.requests)]
            runs = {
                "base": run_engine(engine, prompts(1), 0, [params(args, None)] * args.requests),
                f"all on {names[0]}": run_engine(engine, prompts(2), 0, [params(args, names[0])] * args.requests),
                f"mixed (a third base, the rest over {args.adapters} adapters)":
                    run_engine(engine, prompts(3), 0, [params(args, n) for n in mix]),
            }
            single = {"one stream, base": run_engine(engine, prompts(4)[:1], 0, [params(args, None)]),
                      f"one stream, {names[0]}": run_engine(engine, prompts(5)[:1], 0, [params(args, names[0])])}
        finally:
            engine.shutdown()
        print("| workload | output tok/s | TTFT p50 (ms) | ITL p50 (ms) | / base |")
        print("| --- | --- | --- | --- | --- |")
        for name, run in runs.items():
            print(row(name, run, runs["base"]))
        for name, run in single.items():
            print(row(name, run, single["one stream, base"]))
        if not args.no_hf and not dummy:
            import time

            hf = merged_hf_model(folder, paths[0])
            ids = engine.tokenizer.encode(prompts(5)[0])
            t0 = time.perf_counter()
            with torch.inference_mode():
                hf.generate(torch.tensor([ids]), max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens,
                            do_sample=False, pad_token_id=0)
            hf_tok_s = args.max_tokens / (time.perf_counter() - t0)
            print(f"# HF transformers {__import__('transformers').__version__}, {names[0]} merged, fp32, batch 1: "
                  f"{hf_tok_s:.1f} tok/s; kvtriton's one stream on {names[0]} / HF = "
                  f"{single[f'one stream, {names[0]}']['tok_s'] / hf_tok_s:.2f}")


if __name__ == "__main__":
    main()
