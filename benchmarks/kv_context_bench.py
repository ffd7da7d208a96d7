"""One stream's decode on the CPU as the context grows: an fp32 KV cache against an fp8 one (kv_cache_dtype fp8).

The default model as shipped (its GGUF in int4, compiled and one-call decode, one OpenMP team), in-process, one
engine at a time. For each context N (random token ids), one request of N prompt tokens and --max-tokens out,
greedy, EOS ignored: the inter-token latency p50 and TTFT. Beside them, the bound: (the projections' bytes + the
KV bytes a step reads at that context) / this machine's copy bandwidth; and HF transformers (fp32, the same
prompt, `generate`): its time a token after the first, (t(1 + M tokens) - t(1 token)) / M.

At long contexts a CPU step reads more KV than weights (fp32: 46 KB a token of context for the default model's
30 layers, against 76 MB of int4 weights), which the fp8 pool cuts to a quarter.

  python benchmarks/kv_context_bench.py [--contexts 100,1000,2000,3900] [--no-hf]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import _default_model, pct, run_engine  # noqa: E402
from gguf_kquant_bench import copy_bandwidth  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402


def step_bytes(engine, context: int) -> int:
    """What a one-sequence decode step reads: the projections' codes and scales, and the KV of `context` tokens."""
    native = engine.runner.compiled_decode.native
    weights = sum(t.numel() * t.element_size() for t in (*native.weights, *native.scales))
    kv = engine.runner.kv
    per_token = sum(pool[0, 0].numel() * pool.element_size() for pool in (*kv.k, *kv.v))
    return weights + per_token * context


def hf_token_s(prompt: list[int], max_tokens: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(_default_model(), dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    return (timed(1 + max_tokens) - timed(1)) / max_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="100,1000,2000,3900")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()}; the default model as shipped, one stream, "
          f"{args.max_tokens} tokens out")
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(100, 40000, size=n).tolist() for n in contexts}
    rows: dict[int, dict] = {n: {} for n in contexts}
    for kv in ("auto", "fp8"):
        torch._dynamo.reset()  # each engine compiles the same functions: a fresh count of recompiles
        engine = LLMEngine(EngineConfig(model="default", quantization="auto", cpu_compile_decode=True,
                                        cpu_single_openmp_team=True, kv_cache_dtype=kv,
                                        max_model_len=max(contexts) + args.max_tokens + 1,
                                        kv_cache_memory_gb=1.0)).start()
        try:
            assert engine.runner.compiled_decode.native is not None, "the one-call decode step does not serve"
            run_engine(engine, [prompts[contexts[0]][:16]], 8)  # warm-up
            for n in contexts:
                run = run_engine(engine, [prompts[n]], args.max_tokens)
                rows[n][kv] = (pct(run["itl"], 50), pct(run["ttft"], 50), step_bytes(engine, n))
        finally:
            engine.shutdown()
    # Measured after the engines: a parallel copy on this thread would give it an OpenMP team of its own beside the
    # engine's, and two teams on two cores stop spin-waiting (README "CPU threads"), slowing every step.
    bandwidth = copy_bandwidth()
    print(f"# copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| context | fp32 KV: ITL p50 | bound | TTFT | fp8 KV: ITL p50 | bound | TTFT | fp8 / fp32 ITL | HF fp32 "
          "a token |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in contexts:
        (itl32, ttft32, bytes32), (itl8, ttft8, bytes8) = rows[n]["auto"], rows[n]["fp8"]
        bound32, bound8 = bytes32 / bandwidth, bytes8 / bandwidth
        hf = "-" if args.no_hf else f"{hf_token_s(prompts[n], args.max_tokens) * 1e3:.1f} ms"
        print(f"| {n} | {itl32 * 1e3:.2f} ms | {bound32 * 1e3:.2f} ms | {ttft32 * 1e3:.0f} ms | {itl8 * 1e3:.2f} ms "
              f"| {bound8 * 1e3:.2f} ms | {ttft8 * 1e3:.0f} ms | {itl8 / itl32:.2f} | {hf} |")


if __name__ == "__main__":
    main()
