"""The CUDA decode step alone (the torch runner: input copies + CUDA graph replay) against its memory bound.

1B-class Llama (benchmarks/engine_bench.py's LLAMA_1B), random bf16 weights. For each batch and context
it prints the runner's step time and the bound it chases: (weight bytes + the KV bytes the step reads) /
the device-to-device copy bandwidth measured in this run. --batch captured times every batch size the runner
captures a graph for and the one past each (padded into the next graph), and names any batch slower than a
larger one: a tile table missing a bucket (batches 5-8 in fp8 and int4, until 2026-12-07) shows there first.
--profile adds the top kernels by GPU time and what each adds to the step's chain of kernels (their durations
overlap under PDL).
No engine and no tokenizer: the runner is built and fed directly.

  python benchmarks/profile_decode.py [--batch 1,16,64|captured] [--context 192,2048] [--compile on|off]
      [--kernels on|off] [--fused-max-batch N] [--max-splits N] [--warps-per-sm N] [--large-tile T,W,S]
      [--bf16-chain on|off] [--bf16-chain-min-rows N] [--bf16-swiglu on|off]
      [--planes-into-norm on|off] [--fp8-planes-into-norm on|off] [--quantization none|fp8|int8|int4]
      [--kv-cache-dtype auto|fp8] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_bench import LLAMA_1B  # noqa: E402
from loop_bench import copy_bandwidth  # noqa: E402

from kvtriton.backend.config import EngineConfig  # noqa: E402
from kvtriton.backend.kernels import fp8_matmul, paged_decode_attention, pdl, pdl_matmul  # noqa: E402
from kvtriton.backend.models import llama_decode  # noqa: E402
from kvtriton.backend.models.model_config import ModelConfig  # noqa: E402
from kvtriton.backend.runners.step_input import prepare_step  # noqa: E402
from kvtriton.backend.runners.torch_runner import TorchRunner  # noqa: E402


@dataclass
class ProbeSequence:  # what prepare_step reads of a scheduled sequence
    token_ids: list[int]
    num_computed_tokens: int  # this step's token included, as the scheduler leaves it
    block_ids: list[int]
    spec_token_ids: list[int] = field(default_factory=list)  # no speculative proposals
    lora_adapter: int = 0  # the base model


def decode_step(runner: TorchRunner, batch: int, context: int):
    """One decode-only step: `batch` sequences of `context` tokens (the last one new), disjoint blocks."""
    bs = runner.block_size
    width = -(-context // bs)
    seqs = [ProbeSequence(list(range(1, context + 1)), context, list(range(i * width, (i + 1) * width)))
            for i in range(batch)]
    return prepare_step([(s, 1) for s in seqs], bs, runner.device)


def time_steps(runner, step, rounds=7, steps=50) -> float:
    """Median over rounds of the mean step time: one round can catch a clock or neighbour hiccup."""
    for _ in range(5):
        runner.execute(step)
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.execute(step)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times)


CAPTURED_MAX = 64  # --batch captured: the largest batch, as the engine's default max_num_seqs captures


def captured_batches(graph_sizes: list[int]) -> list[int]:
    """Every graph's batch size and the one past it (the smallest batch padded into the next graph)."""
    return sorted({b for size in graph_sizes for b in (size, size + 1) if b <= graph_sizes[-1]})


def cliffs(steps: dict[int, float], margin: float = 1.10) -> list[str]:
    """Batches whose step takes longer than a larger batch's by more than `margin`: a step reads the same
    weights at every batch size, so one slower than a larger batch's is a kernel or tile gone wrong there."""
    found = []
    for batch, step_s in steps.items():
        larger = [(b, s) for b, s in steps.items() if b > batch and s * margin < step_s]
        if larger:
            b, s = min(larger, key=lambda item: item[1])
            found.append(f"batch {batch} takes {step_s * 1e3:.3f} ms, batch {b} {s * 1e3:.3f} ms: check its tiles")
    return found


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,16,64", help="batch sizes, or `captured`: every graph's and the next")
    ap.add_argument("--context", default="192,2048")
    ap.add_argument("--compile", default="on", choices=["on", "off"])
    ap.add_argument("--kernels", default="on", choices=["on", "off"], help="enable_triton_kernels")
    ap.add_argument("--fused-max-batch", type=int, help="override llama_decode.FUSED_MAX_BATCH (measuring it)")
    ap.add_argument("--max-splits", type=int, help="override paged_decode_attention.MAX_SPLITS (1: no split)")
    ap.add_argument("--warps-per-sm", type=int, help="override paged_decode_attention.WARPS_PER_SM (more: more splits)")
    ap.add_argument("--large-tile", help="override paged_decode_attention.LARGE_TILE: BLOCK_T,num_warps,num_stages")
    ap.add_argument("--early-attention", default="on", choices=["on", "off"],
                    help="kernels/pdl.py EARLY_ATTENTION: the qkv matmul lets the attention kernel launch at its start")
    ap.add_argument("--pdl-chain", default="on", choices=["on", "off"],
                    help="kernels/pdl.py CHAIN: the fp8 matmul, its quantizer, the split-K adds and the compiled "
                         "layer kernels launch with PDL")
    ap.add_argument("--bf16-chain", default="on", choices=["on", "off"],
                    help="kernels/pdl_matmul.py CHAIN: every 16-bit projection of 9-64 decode rows on that kernel, "
                         "launched with PDL, instead of cuBLAS for all but qkv")
    ap.add_argument("--bf16-chain-min-rows", type=int,
                    help="override kernels/pdl_matmul.py CHAIN_MIN_ROWS: the fewest decode rows the bf16 chain serves")
    ap.add_argument("--planes-into-norm", choices=["on", "off"],
                    help="kernels/pdl_matmul.py PLANES_INTO_NORM: with --bf16-chain on, o_proj's and down_proj's "
                         "split-K partial sums added in the compiled residual add + RMSNorm, not by a launch")
    ap.add_argument("--bf16-swiglu", default="on", choices=["on", "off"],
                    help="kernels/pdl_matmul.py SWIGLU_EPILOGUE: with --bf16-chain on, gate_up ends in the SwiGLU")
    ap.add_argument("--fp8-planes-into-norm", choices=["on", "off"],
                    help="kernels/fp8_matmul.py PLANES_INTO_NORM: fp8 down_proj's split-K partial sums added in the "
                         "compiled residual add + RMSNorm at 33-64 rows, not by a launch")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--profile", action="store_true", help="also list the top kernels of each step")
    ap.add_argument("--quantization", default="none", choices=["none", "fp8", "int8", "int4"],
                    help="the weights' precision (EngineConfig.quantization)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                    help="the KV pools' element type (EngineConfig.kv_cache_dtype)")
    args = ap.parse_args()
    batches = None if args.batch == "captured" else [int(b) for b in args.batch.split(",")]
    contexts = [int(c) for c in args.context.split(",")]
    if args.fused_max_batch is not None:
        llama_decode.FUSED_MAX_BATCH = args.fused_max_batch
    if args.max_splits is not None:
        paged_decode_attention.MAX_SPLITS = args.max_splits
    if args.warps_per_sm is not None:
        paged_decode_attention.WARPS_PER_SM = args.warps_per_sm
    if args.large_tile:
        paged_decode_attention.LARGE_TILE = tuple(int(x) for x in args.large_tile.split(","))
    pdl.EARLY_ATTENTION = args.early_attention == "on"
    pdl.CHAIN = args.pdl_chain == "on"
    pdl_matmul.CHAIN = args.bf16_chain == "on"
    pdl_matmul.SWIGLU_EPILOGUE = args.bf16_swiglu == "on"
    if args.planes_into_norm is not None:
        pdl_matmul.PLANES_INTO_NORM = args.planes_into_norm == "on"
    if args.fp8_planes_into_norm is not None:
        fp8_matmul.PLANES_INTO_NORM = args.fp8_planes_into_norm == "on"
    if args.bf16_chain_min_rows is not None:
        pdl_matmul.CHAIN_MIN_ROWS = args.bf16_chain_min_rows
    folder = Path(tempfile.mkdtemp()) / "llama-1b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_1B))
    max_blocks = -(-args.max_model_len // 16)
    most = max(batches or [CAPTURED_MAX])
    config = EngineConfig(model=str(folder), device="cuda", dummy_weights=True, max_num_seqs=most,
                          max_model_len=args.max_model_len, num_kv_blocks=most * max_blocks,
                          enable_torch_compile=args.compile == "on", enable_triton_kernels=args.kernels == "on",
                          quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    started = time.perf_counter()
    runner = TorchRunner(config, ModelConfig.from_dict(LLAMA_1B), str(folder), torch.device("cuda"),
                         torch.bfloat16, args.max_model_len)
    if batches is None:
        batches = captured_batches(runner.graph_batch_sizes)
    bandwidth = copy_bandwidth("cuda")
    mc = runner.model_config
    # Quantized layers keep their codes and scales in buffers.
    weight_bytes = sum(t.numel() * t.element_size() for t in (*runner.model.parameters(), *runner.model.buffers()))
    kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * runner.kv_dtype.itemsize  # K and V, all layers
    startup = time.perf_counter() - started
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; runner start-up {startup:.1f} s "
          f"({len(runner._graphs)} CUDA graphs); compile {args.compile}, triton kernels {args.kernels}, fused "
          f"matmuls up to batch {llama_decode.FUSED_MAX_BATCH if runner.fuse_matmuls else 0}, at most "
          f"{paged_decode_attention.MAX_SPLITS} splits (decode attention: {paged_decode_attention.WARPS_PER_SM} "
          f"warps an SM, large tile {paged_decode_attention.LARGE_TILE}), early attention {args.early_attention}, "
          f"PDL chain {args.pdl_chain}, bf16 chain {args.bf16_chain} from {pdl_matmul.CHAIN_MIN_ROWS} rows "
          f"(SwiGLU epilogue {args.bf16_swiglu}, planes into the norm {pdl_matmul.PLANES_INTO_NORM}); "
          f"quantization {args.quantization} (fp8 planes into the norm {fp8_matmul.PLANES_INTO_NORM}), KV cache "
          f"{str(runner.kv_dtype).removeprefix('torch.')}; weights {weight_bytes / 1e9:.2f} GB; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s")
    for context in contexts:
        steps = {}
        for batch in batches:
            step = decode_step(runner, batch, context)
            step_s = steps[batch] = time_steps(runner, step)
            kv_bytes = batch * context * kv_per_token
            bound_s = (weight_bytes + kv_bytes) / bandwidth
            print(f"batch {batch:3d} context {context:5d}: runner step {step_s * 1e3:6.3f} ms   bound "
                  f"{bound_s * 1e3:6.3f} ms ({weight_bytes / 1e9:.2f} GB weights + {kv_bytes / 1e9:.3f} GB KV) "
                  f"= {bound_s / step_s * 100:3.0f}% of bound   {batch / step_s:8.0f} tok/s")
            if args.profile:
                profile(runner, step)
        for line in cliffs(steps):
            print(f"# context {context:5d}: {line}")


def critical_path(kernels: list[tuple[str, float, float]]) -> tuple[dict[str, float], float]:
    """A chain of dependent kernels, (name, start, end) each -> ({name: time it added to the chain}, idle).

    Under programmatic dependent launch a kernel starts before its predecessor ends and waits inside, so its
    duration overstates what it costs the step; what it adds is its end minus the chain's end before it (or
    minus its own start, after a gap in which the GPU ran nothing of the chain: idle)."""
    added: dict[str, float] = {}
    idle, chain_end = 0.0, None
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        if chain_end is not None and start > chain_end:
            idle += start - chain_end
        since = start if chain_end is None else max(start, chain_end)
        added[name] = added.get(name, 0.0) + max(0.0, end - since)
        chain_end = end if chain_end is None else max(chain_end, end)
    return added, idle


def profile(runner, step, steps=20):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            runner.execute(step)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in events)
    print(f"  {len(events) / steps:.0f} kernels per step, {total_us / steps:.0f} us of kernel time per step "
          f"(overlapping under PDL: the critical path below is what each adds)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70))
    added, idle = critical_path([(e.name, e.time_range.start, e.time_range.end) for e in events])
    print(f"  critical path per step: idle between kernels {idle / steps:.1f} us")
    for name, us in sorted(added.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {us / steps:8.1f} us  {name[:90]}")


if __name__ == "__main__":
    main()
