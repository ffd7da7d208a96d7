"""Engine-loop benchmark: what users see (tok/s, TTFT, ITL) against the runner step alone and the bound.

Workload: N requests of 128 random prompt tokens submitted at once (each run's prompts new to the engine: no
prefix-cache hit), 128 output tokens each, EOS ignored, greedy; N = 1, 16, 64 by default. For each N it prints:
  - output tok/s, TTFT p50 and inter-token latency (ITL) p50 and mean of the engine, with the overlapped loop
    (async scheduling) and, for comparison, the synchronous one (enable_async_scheduling=false);
  - the runner's decode step alone at batch N (a CUDA-graph replay timed by itself), and the engine's
    ITL over it: what the host costs beyond the device (--engine-process: the engine in a process of its own,
    as tritonserver runs it, so that this process's thread reading the streams does not share the loop's GIL);
  - the bound: (weight bytes + KV bytes read) / copy bandwidth measured in this run;
  - HF transformers `generate` with the static cache (compiled), same config, prompts and N.

  python benchmarks/loop_bench.py --config llama-1b --device cuda       # the GPU host
  python benchmarks/loop_bench.py --batches 1,8 --no-hf                 # CPU, default model
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import engine_bench  # noqa: E402
from engine_bench import add_prefill_graph_option, add_workload_options, model_folder, pct  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.engine_process import EngineProcess  # noqa: E402
from kvtriton.backend.engine.llm_engine import LLMEngine  # noqa: E402
from kvtriton.backend.engine.sampling_params import SamplingParams  # noqa: E402
from kvtriton.backend.engine.sequence import Sequence  # noqa: E402
from kvtriton.backend.runners.step_input import prepare_step  # noqa: E402


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> dict:
    run = engine_bench.run_engine(engine, prompts, max_tokens)
    return dict(tok_s=run["tok_s"], ttft_ms=pct(run["ttft"], 50) * 1e3, itl_ms=pct(run["itl"], 50) * 1e3,
                itl_mean_ms=statistics.fmean(run["itl"]) * 1e3 if run["itl"] else float("nan"))


def random_prompts(rng: random.Random, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` random token ids (3..39999: within every vocabulary the benchmarks use)."""
    return [[rng.randrange(3, 40000) for _ in range(length)] for _ in range(n)]


def copy_bandwidth(device) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the bound's denominator."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * 10 / (time.perf_counter() - t0)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def runner_step(engine: LLMEngine, batch: int, context: int, rounds: int = 5, iterations: int = 50,
                prefill: bool = False) -> float:
    """Seconds of the runner's decode step alone, `batch` sequences of `context` tokens (median of rounds x
    iterations); prefill: of the step that computes all `context` tokens of each (a first prefill)."""
    bm = engine.block_manager
    seqs = []
    for i in range(batch):
        seq = Sequence(f"probe{i}", [1 + (i + j) % 1000 for j in range(context)], SamplingParams())
        seq.num_computed_tokens = context
        seq.block_ids = bm.allocate_slots(seq.request_id, seq.token_ids, 0, context)
        seqs.append(seq)
    step = prepare_step([(s, context if prefill else 1) for s in seqs], engine.config.block_size, engine.device)
    for _ in range(min(5, iterations)):
        engine.runner.execute(step)
    sync(engine.device)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iterations):
            engine.runner.execute(step)
        sync(engine.device)
        times.append((time.perf_counter() - t0) / iterations)
    for s in seqs:
        bm.free(s.request_id)
    return statistics.median(times)


def bound_s(engine: LLMEngine, batch: int, context: int, bandwidth: float) -> float:
    """(weights + the KV the step reads) / bandwidth."""
    model = engine.runner.model  # quantized layers keep their codes and scales in buffers
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    mc = engine.model_config
    kv = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * engine.runner.kv_dtype.itemsize * batch * context
    return (weights + kv) / bandwidth


def run_hf(folder: str, prompts: list[list[int]], max_tokens: int, device: str, dtype) -> float:
    """HF generate at its best: static cache (generate compiles the forward for it on CUDA); one warm-up."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)  # all prompts have the same length: no padding
    kwargs = dict(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                  cache_implementation="static")
    with torch.inference_mode():
        model.generate(input_ids=ids, **kwargs)  # warm-up: compile and capture for this shape
        sync(device)
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, **kwargs)
        sync(device)
    wall = time.perf_counter() - t0
    del model
    return (out.shape[1] - ids.shape[1]) * len(prompts) / wall


def profile_host(config: EngineConfig, prompts: list[list[int]], max_tokens: int, functions: bool = False) -> None:
    """Drive engine.step() from this thread (no engine thread, no consumer) with a timer on each phase,
    once the prompts are in: where the host's time per step goes. functions: then the same steps again under
    cProfile, the top functions by their own time (the device wait shows as the host copy's wait)."""
    import collections
    import cProfile
    import pstats

    engine = LLMEngine(config)
    spent: collections.Counter = collections.Counter()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0
        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.runner.execute = timed("runner.execute (launch)", engine.runner.execute)
    executor = engine.step_executor
    for owner, name in ((executor, "_prepare"), (executor, "_update"), (executor.sampling_batch, "metadata"),
                        (executor, "_sample"), (engine.output_processor, "emit_tokens")):
        setattr(owner, name, timed(name, getattr(owner, name)))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"p{i}", p, params)
    for _ in range(4):  # prefill and the first decodes
        engine.step()
    sync(engine.device)
    spent.clear()
    steps = 50
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.device)
    per_step = (time.perf_counter() - t0) / steps * 1e3
    print(f"# {len(prompts)} sequences, host-driven: {per_step:.3f} ms per step; per phase (ms): "
          + ", ".join(f"{k} {v / steps * 1e3:.3f}" for k, v in spent.most_common()))
    if functions:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [engine.step() for _ in range(steps)])
        print(f"# the same {steps} steps under cProfile (its own overhead inflates Python-heavy functions):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_options(ap)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--context", type=int, default=192, help="context of the runner-step probe (default 192)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-sync-loop", action="store_true", help="skip the synchronous-loop comparison")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="only time the engine's host work per phase over decode steps at batch N")
    ap.add_argument("--cprofile", action="store_true", help="with --profile: also the top functions (cProfile)")
    ap.add_argument("--quantization", default="none", choices=["none", "fp8", "int8", "int4"])
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    ap.add_argument("--engine-process", action="store_true",
                    help="the overlapped loop's requests go to the engine in a process of its own (EngineProcess, as "
                         "tritonserver runs it), so no client thread shares the loop's GIL; the step alone in-process")
    add_prefill_graph_option(ap, 8192)  # the token budget: on a 1B-class model every prefill step replays a graph
    ap.add_argument("--json")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    folder, dummy = model_folder(args.config, args.tokenizer)
    # Random prompts never repeat: every measured run gets prompts the engine has not seen (the warm-up its own),
    # so no run's prefill is cut short by a prefix-cache hit on an earlier run's prompts.
    rng = random.Random(0)
    warm_up = random_prompts(rng, 4, args.prompt_len)
    prompts = {n: random_prompts(rng, n, args.prompt_len) for n in batches}
    cuda = args.device.startswith("cuda")
    base = dict(model=folder, device=args.device, dummy_weights=dummy, max_num_seqs=max(batches),
                max_num_batched_tokens=8192, max_model_len=2048, kv_cache_memory_gb=2.0,
                quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                max_prefill_graph_tokens=args.prefill_graph_tokens)
    bandwidth = copy_bandwidth(args.device)
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"# loop benchmark: {args.config}, {args.prompt_len}-token random prompts, {args.max_tokens} output "
          f"tokens, EOS ignored, greedy; torch {torch.__version__}, python {platform.python_version()}, "
          f"{device_name}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; quantization {args.quantization}, KV cache "
          f"{args.kv_cache_dtype}; token budget 8,192"
          f"{f', prefill CUDA graphs up to {args.prefill_graph_tokens} tokens' if cuda else ''}; "
          f"the engine {'in a process of its own' if args.engine_process else 'in-process'}")
    results = {"bandwidth_tb_s": bandwidth / 1e12, "rows": []}
    if args.profile:
        return profile_host(EngineConfig(**base), random_prompts(rng, args.profile, args.prompt_len), args.max_tokens,
                            args.cprofile)
    loops = [("async", True)] + ([] if args.no_sync_loop else [("sync", False)])
    measured: dict[str, dict[int, dict]] = {}
    engine = None
    for name, overlap in loops:
        config = EngineConfig(**base, enable_async_scheduling=overlap)
        engine = LLMEngine(config).start()
        probes = {n: {} for n in batches}
        if name == "async":
            for n in batches:
                probes[n]["step_ms"] = runner_step(engine, n, args.context) * 1e3
                probes[n]["bound_ms"] = bound_s(engine, n, args.context, bandwidth) * 1e3
            dtype = engine.dtype
            if args.engine_process:  # the requests go to an engine in a process of its own
                engine.shutdown()
                del engine
                if cuda:
                    torch.cuda.empty_cache()
                engine = EngineProcess(config)
        run_engine(engine, warm_up, 8)
        measured[name] = {n: {**run_engine(engine, prompts[n], args.max_tokens), **probes[n]} for n in batches}
        engine.shutdown()
        del engine
    hf = {}
    if not args.no_hf:
        import transformers

        hf_folder = folder
        if dummy:
            out = Path(tempfile.mkdtemp()) / "hf"
            cfg = transformers.AutoConfig.from_pretrained(folder)
            torch.manual_seed(0)
            transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype).save_pretrained(out)
            hf_folder = str(out)
        hf = {n: run_hf(hf_folder, prompts[n], args.max_tokens, "cuda" if cuda else "cpu", dtype) for n in batches}
        print(f"# HF transformers {transformers.__version__}, static cache, generate")
    print(f"{'N':>3} | {'tok/s':>8} | {'TTFT p50':>9} | {'ITL p50':>8} | {'ITL mean':>8} | {'step':>8} | "
          f"{'ITL/step':>8} | {'bound':>8} | {'step/bound':>10} | {'sync tok/s':>10} | {'HF tok/s':>9} | {'vs HF':>6}")
    for n in batches:
        a = measured["async"][n]
        s = measured.get("sync", {}).get(n)
        row = dict(n=n, **a, sync_tok_s=s["tok_s"] if s else None, hf_tok_s=hf.get(n))
        results["rows"].append(row)
        print(f"{n:>3} | {a['tok_s']:8.1f} | {a['ttft_ms']:7.1f}ms | {a['itl_ms']:6.3f}ms | "
              f"{a['itl_mean_ms']:6.3f}ms | {a['step_ms']:6.3f}ms | "
              f"{a['itl_ms'] / a['step_ms']:8.2f} | {a['bound_ms']:6.3f}ms | {a['bound_ms'] / a['step_ms']:9.0%} | "
              f"{s['tok_s'] if s else float('nan'):10.1f} | {hf.get(n, float('nan')):9.1f} | "
              f"{a['tok_s'] / hf[n] if n in hf else float('nan'):5.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
