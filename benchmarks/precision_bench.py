"""Precisions side by side: quality and decode speed per runner, throughput through the engine, and the GPU.

  python benchmarks/precision_bench.py                     # quality + engine, default model (SmolLM2-135M-Instruct)
  python benchmarks/precision_bench.py --part quality --tokens 128
  python benchmarks/precision_bench.py --part engine --rounds 5 --triton
  python benchmarks/precision_bench.py --part gpu --tokenizer DIR   # the GPU host: 1B-class, bf16 vs fp8 vs int4

quality: every variant runs the same teacher-forced decode, the text's tokens one step at a time
through the runner (the engine's decode path, batch 1), so one pass gives each position's logits and
the decode tok/s (1 / median step time). Printed: mean and max |logit - reference logit|, perplexity
of the text, top-1 agreement, tok/s and the ratio to the same runtime's fp32. The reference is the fp32
model; for a GGUF checkpoint (the default model is Q4_1) that is the GGUF's own dequantized weights.
Variants: torch fp32 and bf16; torch int8 (per channel); torch int4 as a GGUF checkpoint stores it (its
blocks) and int4 g32 / g64 / g128 quantized from the fp32 weights (g128 does not divide the default
model's 576 inputs: skipped, said in a line); torch fp8 (W8A8 e4m3, through this torch's CPU `_scaled_mm`:
the numerics of the Hopper path, not its speed); torch fp32 and bf16 (and int4 as the GGUF stores it) over
an fp8 e4m3 KV cache (kv_cache_dtype fp8); onnxruntime fp32, int8 and int4 graphs (built here, the int4
graph from the same weights as torch int4; "level 4": its MatMulNBits quantizing activations to int8).

engine: the engine in-process (benchmarks/engine_bench.py's workload: 32 chat prompts, --max-tokens
output tokens each, EOS ignored), fp32 vs each --quantization, alternated --rounds times on one
machine (a shared CPU is noisy: medians and the load average are printed): output tok/s with all 32
requests in flight, and the decode tok/s of one request alone (1 / mean inter-token latency). --isolate:
each round and variant in fresh processes, as tritonserver runs the shipped config.pbtxt: its engine
settings (token budget, KV pool, one OpenMP team) in a process of its own (EngineProcess), the client in
another (in one process every engine's team counts against the cores, libgomp stops spin-waiting, and the
client's thread competes with the team). --triton: also
one stream through tritonserver (the shipped model repository, streamed over HTTP), fp32 vs each.

gpu: a 1B-class Llama (engine_bench's LLAMA_1B, random weights) on CUDA in bf16, fp8 (W8A8) and int4
(g32, the Triton decode kernel): the runner's batch-1 decode step alone (CUDA-graph replay) and output
tok/s through the engine with 1 and 64 requests (128-token prompts, --max-tokens each; and the 64 prompts'
first step alone, their 8,192-token prefill), each beside bf16
measured in the same process; --gpu-variants adds the fp8 KV cache (bf16+kv8, fp8+kv8). --isolate: the
requests go to the engine in a process of its own (EngineProcess), as tritonserver runs it: in-process, the
client thread that reads the streams wakes once a step and takes the GIL from the engine loop (at 64 requests
that can cost more host time than a faster step saves). Targets (issue #15): step fp8 <= 0.6x and int4 <= 0.4x
bf16; batch 64 fp8 >= 1.4x bf16 tok/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import (  # noqa: E402
    QUESTIONS,
    add_prefill_graph_option,
    chat_prompt_ids,
    model_folder,
    pct,
    run_engine,
)

from kvtriton.backend.attention.metadata import AttentionMetadata  # noqa: E402
from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.engine.tokenizer import Tokenizer  # noqa: E402
from kvtriton.backend.models.loader import load_model  # noqa: E402
from kvtriton.backend.models.model_config import ModelConfig  # noqa: E402
from kvtriton.backend.runners.step_input import StepInput  # noqa: E402

TEXT = (
    "Paged attention keeps the keys and values of every sequence in fixed-size blocks, so that memory is "
    "allocated on demand and shared between requests with a common prefix. The scheduler decides each step "
    "how many tokens every running request may compute under one token budget, which lets long prompts be "
    "split into chunks and interleaved with the decoding of other requests. When the cache is full, the "
    "youngest request is preempted and recomputed later. Weight-only quantization stores each matrix in "
    "eight-bit integers with one scale per output channel, halving or quartering the bytes read per step."
)
BLOCK = 16


def decode_step(token: int, position: int, blocks: int) -> StepInput:
    def t(values):
        return torch.tensor(values, dtype=torch.int64)

    return StepInput(
        input_ids=t([token]), positions=t([position]), last_token_indices=t([0]),
        attn=AttentionMetadata(slot_mapping=t([position]), block_tables=t([list(range(blocks))]),
                               context_lens=t([position + 1]), num_decodes=1, query_lens=[1],
                               context_lens_host=[position + 1], decode_context_blocks=position // BLOCK + 1),
    )


# The steps run on a thread of their own while models load on the main thread: as in the engine (its
# kvtriton-forward thread), which on a CPU decides how OpenMP waits (see the README's INT4 paragraph).
_FORWARD = ThreadPoolExecutor(1, "bench-forward")


def teacher_forced(runner, ids: list[int], passes: int = 2) -> tuple[torch.Tensor, float]:
    """-> logits (T, V) of every position, decode tok/s from the median step time (robust to other load on a
    shared machine; the first 8 steps are warm-up) of the fastest of `passes` passes over the text."""
    return _FORWARD.submit(_teacher_forced, runner, ids, passes).result()


def _teacher_forced(runner, ids: list[int], passes: int) -> tuple[torch.Tensor, float]:
    blocks = -(-len(ids) // BLOCK)
    speeds = []
    for _ in range(passes):
        rows, times = [], []
        for i, tok in enumerate(ids):
            start = time.perf_counter()
            rows.append(runner.execute(decode_step(tok, i, blocks))[0].clone())
            times.append(time.perf_counter() - start)
        speeds.append(1.0 / statistics.median(times[8:]))
    return torch.stack(rows), max(speeds)


def quality(args, folder: Path, gguf: Path | None) -> None:
    from kvtriton.backend.runners.onnx_runner import OnnxRunner
    from kvtriton.backend.runners.torch_runner import TorchRunner
    from kvtriton.build.onnx_export import export_step_graph

    mc = ModelConfig.from_pretrained(folder)
    ids = Tokenizer.from_pretrained(folder).encode(TEXT)[: args.tokens]
    cpu = torch.device("cpu")
    base = dict(model=args.model, device="cpu", block_size=BLOCK, num_kv_blocks=len(ids) // BLOCK + 2)
    import onnx
    import onnxruntime

    print(f"model {folder.name}: {mc.num_params / 1e6:.0f}M parameters, {len(ids)} tokens, batch 1, CPU "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    print(f"torch {torch.__version__}, onnx {onnx.__version__}, onnxruntime {onnxruntime.__version__}")

    results = {}
    for kv_cache_dtype, label in (("auto", "torch bf16"), ("fp8", "torch bf16, fp8 KV")):
        bf16_runner = TorchRunner(EngineConfig(**base, kv_cache_dtype=kv_cache_dtype), mc, str(folder), cpu,
                                  torch.bfloat16, len(ids))
        results[label] = teacher_forced(bf16_runner, ids)
        del bf16_runner
    runner = TorchRunner(EngineConfig(**base), mc, str(folder), cpu, torch.float32, len(ids))
    # torch variants: the runner's model swapped, so each is loaded exactly as named.
    variants = {"torch fp32": lambda: load_model(folder),
                "torch int8": lambda: load_model(folder, quantization="int8"),  # per channel, from fp32
                "torch fp8 (CPU _scaled_mm)": lambda: load_model(folder, quantization="fp8")}
    if gguf:
        variants["torch int4 (GGUF blocks)"] = lambda: load_model(folder, quantization="int4", gguf=gguf)
    for group_size in (32, 64, 128):  # from the fp32 weights (for a GGUF: its dequantized blocks, quantized again)
        label = f"torch int4 g{group_size}" + (" re-quantized" if gguf else "")
        variants[label] = lambda g=group_size: load_model(folder, quantization="int4", group_size=g)
    for name, load in variants.items():
        try:
            runner.model = load()
        except ValueError as exc:  # e.g. a group size that does not divide the hidden size
            print(f"({name} skipped: {exc})")
            continue
        results[name] = teacher_forced(runner, ids)
    del runner
    fp8_kv = TorchRunner(EngineConfig(**base, kv_cache_dtype="fp8"), mc, str(folder), cpu, torch.float32, len(ids))
    for name in ("torch fp32", "torch int4 (GGUF blocks)"):
        if name in variants:
            fp8_kv.model = variants[name]()
            results[f"{name}, fp8 KV"] = teacher_forced(fp8_kv, ids)
    del fp8_kv
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {}
        for precision in ("fp32", "int8", "int4"):
            graphs[precision] = path = Path(tmp) / f"{precision}.onnx"
            model = load_model(folder, quantization="int4" if precision == "int4" else None, gguf=gguf)
            export_step_graph(model, path, BLOCK, precision)
        graphs["int4 level 4"] = _with_int8_activations(graphs["int4"], Path(tmp) / "int4_level4.onnx")
        for name, path in graphs.items():
            config = EngineConfig(**{**base, "model": str(folder)}, runner="onnxruntime", engine_path=str(path))
            onnx_runner = OnnxRunner(config, mc, folder, cpu, torch.float32, len(ids))
            results[f"onnxruntime {name}"] = teacher_forced(onnx_runner, ids)
            del onnx_runner

    reference, ref_speed = results["torch fp32"]
    targets = torch.tensor(ids[1:])
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (speeds on a shared machine are noisy)")
    print(f"{'variant':28} {'mean|dlogit|':>12} {'max|dlogit|':>11} {'ppl':>8} {'top1 agree':>10} {'tok/s':>7} "
          f"{'vs fp32':>8}")
    for name, (logits, speed) in results.items():
        runtime = name.split()[0]
        fp32_speed = results[f"{runtime} fp32"][1]
        nll = torch.nn.functional.cross_entropy(logits[:-1], targets).item()
        diff = (logits - reference).abs()
        agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"{name:28} {diff.mean().item():12.4f} {diff.max().item():11.3f} {math.exp(nll):8.2f} {agree:10.1%} "
              f"{speed:7.1f} {speed / fp32_speed:7.2f}x")
    what = "the GGUF's own dequantized weights" if gguf else "the checkpoint's weights"
    print(f"(reference: torch fp32 = {what}; ratio: speed / fp32 speed of the same runtime; "
          f"torch fp32 {ref_speed:.1f} tok/s)")
    print(f"results {json.dumps({k: round(v[1], 2) for k, v in results.items()})}")


def _with_int8_activations(path: Path, out: Path) -> Path:
    """The int4 graph with every 4-bit MatMulNBits at accuracy level 4 (activations quantized to int8 per
    block on the fly) instead of the exported 0 (fp32): the speed and the accuracy that choice costs."""
    import onnx

    proto = onnx.load(str(path))
    for node in proto.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMulNBits" and attrs["bits"].i == 4:
            attrs["accuracy_level"].i = 4
    onnx.save(proto, str(out))
    return out


def engine_config(args, quantization: str, single_team: bool) -> EngineConfig:
    return EngineConfig(model=args.model, device="cpu", max_num_seqs=64, max_num_batched_tokens=2048,
                        max_model_len=2048, kv_cache_memory_gb=1.0, quantization=quantization,
                        cpu_single_openmp_team=single_team)


def measure(engine, prompt_ids: list[list[int]], max_tokens: int) -> tuple[float, float]:
    """(output tok/s with every prompt in flight, decode tok/s of the first prompt alone)."""
    batch = run_engine(engine, prompt_ids, max_tokens)
    single = run_engine(engine, prompt_ids[:1], max_tokens)
    return batch["tok_s"], len(single["itl"]) / sum(single["itl"])


def shipped_engine_config(args, quantization: str) -> EngineConfig:
    """The engine settings of the shipped model_repository/llm/config.pbtxt (token budget, KV pool, one OpenMP
    team...), with this run's model and quantization: what `make serve` runs."""
    from kvtriton.backend.entrypoints.pbtxt_parameters import read_parameters
    from kvtriton.backend.triton.config import AdapterConfig

    shipped = Path(__file__).resolve().parents[1] / "model_repository" / "llm" / "config.pbtxt"
    _, values = AdapterConfig.from_parameters(read_parameters(shipped))
    return dataclasses.replace(EngineConfig.from_mapping({**values, **engine_overrides(args)}), model=args.model,
                               device="cpu", quantization=quantization)


def engine_overrides(args) -> dict[str, str]:
    """The engine parameters this run sets over the shipped config's (--cpu-dense-min-rows, --cpu-compile-decode),
    as config.pbtxt strings: for the --isolate engines and the --triton repository alike."""
    given = {"cpu_dense_min_rows": args.cpu_dense_min_rows, "cpu_compile_decode": args.cpu_compile_decode}
    return {key: str(value) for key, value in given.items() if value is not None}


def engine_child(args) -> None:
    """--isolate's child: one variant, one round, run as tritonserver runs it: the shipped config's engine in
    a process of its own (EngineProcess), this process its client; prints its figures as JSON."""
    from kvtriton.backend.engine.engine_process import EngineProcess

    e = EngineProcess(shipped_engine_config(args, args.variant)).start()
    try:
        prompt_ids = chat_prompt_ids(e.tokenizer)
        run_engine(e, prompt_ids[:4], 8)  # warm-up
        print(json.dumps(measure(e, prompt_ids, args.max_tokens)))
    finally:
        e.shutdown()


def engine(args) -> None:
    from kvtriton.backend.engine.llm_engine import LLMEngine

    variants = {"fp32": "none", **{q: q for q in args.quantization}}
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    how = ("each round and variant: the shipped config.pbtxt's engine in a process of its own (EngineProcess, as "
           "tritonserver runs it), the client in another" if args.isolate else
           "all variants in this process (EngineConfig's default: two OpenMP teams each)")
    if args.isolate and engine_overrides(args):
        how += f"; over the shipped config: {engine_overrides(args)}"
    print(f"# engine: {args.model} on the CPU ({platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}; {len(QUESTIONS)} prompts x "
          f"{args.max_tokens} tokens, EOS ignored; {args.rounds} rounds, variants alternated; {how}")

    def report(r: int, name: str, figures) -> None:
        rows[name].append(tuple(figures))
        print(f"round {r + 1} {name:5}: batch 32 {figures[0]:7.1f} output tok/s   "
              f"single stream decode {figures[1]:6.1f} tok/s", flush=True)

    if args.isolate:
        for r in range(args.rounds):
            for name, quantization in variants.items():
                child = subprocess.run(
                    [sys.executable, __file__, "--part", "engine-child", "--variant", quantization, "--model",
                     args.model, "--max-tokens", str(args.max_tokens),
                     *(f"--{key.replace('_', '-')}={value}" for key, value in engine_overrides(args).items())],
                    capture_output=True, text=True, check=True)
                report(r, name, json.loads(child.stdout.strip().splitlines()[-1]))
    else:
        engines = {}
        for name, quantization in variants.items():
            started = time.perf_counter()
            engines[name] = LLMEngine(engine_config(args, quantization, single_team=False)).start()
            print(f"# {name} engine start-up: {time.perf_counter() - started:.1f} s")
        prompt_ids = chat_prompt_ids(engines["fp32"].tokenizer)
        for e in engines.values():
            run_engine(e, prompt_ids[:4], 8)  # warm-up
        try:
            for r in range(args.rounds):
                for name, e in engines.items():
                    report(r, name, measure(e, prompt_ids, args.max_tokens))
        finally:
            for e in engines.values():
                e.shutdown()
    med = {name: [statistics.median(col) for col in zip(*values)] for name, values in rows.items()}
    print(f"median of {args.rounds} rounds (ratio: the median over rounds of the ratio within a round, where the "
          f"variants ran back to back); load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores:")
    for name, (batch, single) in med.items():
        ratios = [(b / fb, s / fs) for (b, s), (fb, fs) in zip(rows[name], rows["fp32"])]
        batch_ratio, single_ratio = (statistics.median(col) for col in zip(*ratios))
        print(f"  {name:5} batch 32 {batch:7.1f} output tok/s ({batch_ratio:.2f}x fp32)   "
              f"single stream {single:6.1f} tok/s ({single_ratio:.2f}x fp32)")
    if args.triton:
        through_triton(args, variants)


def through_triton(args, variants: dict[str, str]) -> None:
    """One stream through tritonserver (the shipped repository, HTTP streaming): fp32 vs each quantization."""
    from serving_bench import closed_loop, sse_request

    from kvtriton.backend.entrypoints.pbtxt_parameters import set_parameters
    from kvtriton.backend.entrypoints.tritonserver import TritonServer
    from kvtriton.backend.models.checkpoint import resolve_checkpoint

    speeds = {}
    for name, quantization in variants.items():
        repo = Path(tempfile.mkdtemp()) / "repo"  # the shipped repository, this run's model and quantization
        shutil.copytree(Path(__file__).resolve().parents[1] / "model_repository", repo)
        set_parameters(repo / "llm" / "config.pbtxt", {"model": str(resolve_checkpoint(args.model)),
                                                       "quantization": quantization, **engine_overrides(args)})
        with TritonServer(repo, ready_timeout_s=600) as server:
            one = sse_request(server.http_port, args.max_tokens)
            closed_loop(1, 1, one)  # warm-up
            speeds[name] = [closed_loop(1, 1, one)["tok_s"] for _ in range(args.rounds)]
    print(f"through tritonserver, one stream (HTTP generate_stream, ~100-token prompt, {args.max_tokens} tokens; "
          f"output tok/s incl. prefill, median of {args.rounds}); load average {os.getloadavg()[0]:.1f}:")
    base = statistics.median(speeds["fp32"])
    for name, values in speeds.items():
        print(f"  {name:5} {statistics.median(values):6.1f} tok/s ({statistics.median(values) / base:.2f}x fp32)")


def free_gpu_memory() -> None:
    """Give a shut-down engine's GPU memory back before the next one loads (the caller drops its reference
    first: a reference held here would keep it alive)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()  # each variant compiles the same layer functions; their graphs count to one limit (8)


def fused_max_batch(precision: str) -> int:
    """The decode batch up to which the runner fuses its matmuls (models/llama_decode.py), for the printout."""
    from kvtriton.backend.models import llama_decode

    return llama_decode.FUSED_MAX_BATCH_QUANTIZED.get(precision, llama_decode.FUSED_MAX_BATCH)


def gpu(args) -> None:
    """bf16 vs fp8 vs int4 on CUDA, 1B-class random weights: runner step at batch 1, engine tok/s at 1 and 64."""
    import random

    from loop_bench import random_prompts, runner_step

    from kvtriton.backend.engine.engine_process import EngineProcess
    from kvtriton.backend.engine.llm_engine import LLMEngine

    folder, dummy = model_folder("llama-1b", args.tokenizer)
    # Each run gets prompts the engine has not seen (random prompts never repeat), so no run's prefill is cut short
    # by a prefix-cache hit on a warm-up's or an earlier run's prompts; every variant gets the same ones.
    rng = random.Random(0)
    warm_ups = [random_prompts(rng, n, 128) for n in (4, 1, 64)]
    single_prompts = random_prompts(rng, 3, 128)
    batch_prompts = [random_prompts(rng, 64, 128) for _ in range(3)]
    import triton

    print(f"# gpu: llama-1b random weights on {torch.cuda.get_device_name()}; torch {torch.__version__}, "
          f"triton {triton.__version__}; 128-token random prompts, each run's new to the engine, "
          f"{args.max_tokens} output tokens, EOS ignored; token budget 8,192, prefill CUDA graphs up to "
          f"{args.prefill_graph_tokens} tokens; the requests to "
          f"{'an engine in a process of its own (EngineProcess)' if args.isolate else 'an in-process engine'}")
    rows = {}
    for name in args.gpu_variants.split(","):
        precision, _, kv = name.partition("+")  # "fp8+kv8": fp8 weights over an fp8 KV cache
        config = EngineConfig(model=folder, device="cuda", dummy_weights=dummy, max_num_seqs=64,
                              max_num_batched_tokens=8192, max_model_len=2048,
                              quantization="none" if precision == "bf16" else precision,
                              kv_cache_dtype="fp8" if kv == "kv8" else "auto",
                              max_prefill_graph_tokens=args.prefill_graph_tokens)
        engine = LLMEngine(config).start()
        weights = sum(t.numel() * t.element_size() for t in (*engine.runner.model.parameters(),
                                                            *engine.runner.model.buffers()))
        step = runner_step(engine, 1, 192)
        prefill = runner_step(engine, 64, 128, rounds=3, iterations=5, prefill=True)  # the 64 prompts' first step
        fused = fused_max_batch(precision) if engine.runner.fuse_matmuls else 0
        if args.isolate:  # the requests go to an engine in a process of its own, as tritonserver runs it
            engine.shutdown()
            del engine
            free_gpu_memory()
            engine = EngineProcess(config)
        # Warm-ups: batch 4 (a 512-token prefill), the single request's shapes (a first 128-token prefill), the 64
        # requests' (an 8,192-token prefill, eager: its first run is slow).
        for prompts in warm_ups:
            run_engine(engine, prompts, 8)
        singles = [run_engine(engine, [prompt], args.max_tokens) for prompt in single_prompts]
        one = statistics.median(r["tok_s"] for r in singles)
        ttft = statistics.median(r["ttft"][0] for r in singles)
        itl = statistics.median(x for r in singles for x in r["itl"])
        each = ", ".join(f"{r['tok_s']:.0f}" for r in singles)
        batches = [run_engine(engine, prompts, args.max_tokens) for prompts in batch_prompts]
        batch = statistics.median(r["tok_s"] for r in batches)
        # Each run's first tokens (p50 and the last, which starts the run's last stream) and its decode ITL: where
        # a run's wall time goes, beside the step alone.
        batch_each = ", ".join(f"{r['tok_s']:.0f} (TTFT p50 {statistics.median(r['ttft']) * 1e3:.0f} / max "
                               f"{max(r['ttft']) * 1e3:.0f} ms, ITL p50 {pct(r['itl'], 50) * 1e3:.3f} ms, "
                               f"wall {r['wall_s'] * 1e3:.0f} ms)" for r in batches)
        rows[name] = dict(step_ms=step * 1e3, one=one, batch64=batch, weights_gb=weights / 1e9,
                          prefill_ms=prefill * 1e3)
        print(f"{name:5}: weights {weights / 1e9:.2f} GB, batch-1 step {step * 1e3:.3f} ms, 64 x 128-token prefill "
              f"step {prefill * 1e3:.2f} ms, 1 request "
              f"{one:.0f} tok/s (median of 3: TTFT {ttft * 1e3:.1f} ms, ITL p50 {itl * 1e3:.3f} ms, each run "
              f"{each} tok/s), 64 requests {batch:.0f} tok/s (median of 3: {batch_each}); fused decode kernels "
              f"{'up to batch ' + str(fused) if fused else 'off'}", flush=True)
        engine.shutdown()
        del engine
        free_gpu_memory()
    bf16 = rows["bf16"]
    print(f"{'precision':9} | {'weights':>8} | {'step b1':>9} | {'vs bf16':>7} | {'prefill':>9} | {'vs bf16':>7} | "
          f"{'1 req tok/s':>11} | {'64 req tok/s':>12} | {'vs bf16':>7}")
    for name, r in rows.items():
        print(f"{name:9} | {r['weights_gb']:6.2f}GB | {r['step_ms']:7.3f}ms | {r['step_ms'] / bf16['step_ms']:6.2f}x | "
              f"{r['prefill_ms']:7.2f}ms | {r['prefill_ms'] / bf16['prefill_ms']:6.2f}x | "
              f"{r['one']:11.0f} | {r['batch64']:12.0f} | {r['batch64'] / bf16['batch64']:6.2f}x")
    print("targets: batch-1 step fp8 <= 0.60x, int4 <= 0.40x bf16; 64 requests fp8 >= 1.40x bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="HF folder, .gguf file, or 'default'")
    parser.add_argument("--part", choices=["quality", "engine", "gpu", "all", "engine-child"], default="all",
                        help="all: quality and engine (the CPU parts); engine-child: --isolate's, internal")
    parser.add_argument("--tokens", type=int, default=96, help="quality: text tokens to decode (teacher-forced)")
    parser.add_argument("--quantization", nargs="+", default=["int4"], choices=["int8", "int4"],
                        help="engine: the quantized variants run beside fp32")
    parser.add_argument("--max-tokens", type=int, default=128, help="engine: output tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="engine: rounds, variants alternated")
    parser.add_argument("--triton", action="store_true", help="engine: also one stream through tritonserver")
    parser.add_argument("--isolate", action="store_true",
                        help="engine: each round and variant in processes of their own, the shipped config's engine "
                             "in an EngineProcess as tritonserver runs it (in one process the variants' teams share "
                             "the cores); gpu: the requests go to an EngineProcess (the runner step stays in-process), "
                             "so no client thread shares the engine loop's GIL")
    parser.add_argument("--cpu-compile-decode", choices=["true", "false"],
                        help="engine --isolate and --triton: the engines' cpu_compile_decode (default: the shipped "
                             "config.pbtxt's, true)")
    parser.add_argument("--cpu-dense-min-rows", type=int,
                        help="engine --isolate and --triton: the engines' cpu_dense_min_rows (default: the shipped "
                             "config's; 24 gives int4 and int8 bf16 copies for inputs of 24 rows or more)")
    parser.add_argument("--variant", default="none", help=argparse.SUPPRESS)
    add_prefill_graph_option(parser, 8192)  # gpu: the token budget, so every prefill step replays a graph
    parser.add_argument("--gpu-variants", default="bf16,fp8,int4",
                        help="gpu: weights bf16|fp8|int4, each optionally +kv8 (an fp8 KV cache); bf16 first")
    parser.add_argument("--tokenizer", help="gpu: folder with tokenizer.json (default: the default model's; a GPU "
                                            "host without the gguf package or network needs it)")
    args = parser.parse_args()

    from kvtriton.backend.models.checkpoint import resolve_checkpoint
    from kvtriton.backend.models.gguf_quantized import gguf_source

    if args.part == "gpu":
        return gpu(args)
    if args.part == "engine-child":
        return engine_child(args)
    if args.part in ("quality", "all"):
        quality(args, resolve_checkpoint(args.model), gguf_source(args.model))
    if args.part in ("engine", "all"):
        engine(args)


if __name__ == "__main__":
    main()
