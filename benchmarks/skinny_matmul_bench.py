"""Skinny matmul (Triton) vs PyTorch on the 1B-class decode shapes: time and achieved bandwidth.

Each row times the fused kernel the decode step runs (e.g. RMSNorm + qkv matmul), the same work as
PyTorch ops (eager, cuBLAS), and the cuBLAS matmul alone, for each decode batch (rows of x). Each call
reads its weight once, so bytes / time is the bandwidth the kernel reaches. The per-step totals decide
llama_decode.FUSED_MAX_BATCH: the largest batch at which the fused kernels beat PyTorch ops.
--sweep also times every (BLOCK_N, BLOCK_K, warps) candidate, to tune skinny_matmul._blocks.

  python benchmarks/skinny_matmul_bench.py [--rows 1,2,4] [--sweep]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from kvtriton.backend.kernels import skinny_matmul

# Llama-3.2-1B's projections (hidden 2048, 32/8 heads of 64, MLP 8192) with a 49152-token vocabulary, each
# with the work the decode step fuses into it: (name, N, K, fused op).
SHAPES = [("qkv_proj", 3072, 2048, "rms_norm_linear"), ("o_proj", 2048, 2048, "linear+residual"),
          ("gate_up_proj", 16384, 2048, "rms_norm_swiglu"), ("down_proj", 2048, 8192, "linear+residual"),
          ("lm_head", 49152, 2048, "rms_norm_linear")]


def fused_and_unfused(op, x, w, blocks=None):
    """(the Triton kernel's call, the same work in PyTorch ops) for one row of SHAPES."""
    from kvtriton.backend.models.llama import RMSNorm

    norm = RMSNorm(x.shape[1], 1e-5).to(x.device, x.dtype)
    if op == "rms_norm_linear":
        return (lambda: skinny_matmul.rms_norm_linear(x, norm.weight, 1e-5, w, blocks=blocks),
                lambda: torch.nn.functional.linear(norm(x), w))
    if op == "rms_norm_swiglu":
        def unfused():
            gate, up = torch.nn.functional.linear(norm(x), w).chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up
        return lambda: skinny_matmul.rms_norm_swiglu(x, norm.weight, 1e-5, w, blocks=blocks), unfused
    residual = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    return (lambda: skinny_matmul.linear(x, w, residual=residual, blocks=blocks),
            lambda: residual + torch.nn.functional.linear(x, w))


def timed(fn, reps=200) -> float:
    """Seconds per call, measured as a CUDA graph of `reps` calls (no launch overhead, as in the engine)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--rows", default="1", help="decode batch sizes, comma-separated (at most MAX_ROWS)")
    args = ap.parse_args()
    torch.manual_seed(0)
    for rows in (int(r) for r in args.rows.split(",")):
        print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, "
              f"batch {rows}")
        one_batch(rows, args.sweep)


def one_batch(rows, sweep_blocks):
    total = {"fused": 0.0, "unfused": 0.0, "cublas": 0.0}
    for name, n, k, op in SHAPES:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        gb = w.numel() * 2
        fused, unfused = fused_and_unfused(op, x, w)
        times = {"fused": timed(fused), "unfused": timed(unfused),
                 "cublas": timed(lambda: torch.nn.functional.linear(x, w))}
        for key, t in times.items():
            total[key] += t * (16 if name != "lm_head" else 1)
        print(f"{name:13s} {n:6d}x{k:<5d} {gb / 1e6:6.1f} MB  {op:16s} triton {times['fused'] * 1e6:5.1f} us "
              f"{gb / times['fused'] / 1e12:4.2f} TB/s | PyTorch ops {times['unfused'] * 1e6:5.1f} us "
              f"({times['unfused'] / times['fused']:.2f}x) | cuBLAS matmul alone {times['cublas'] * 1e6:5.1f} us "
              f"{gb / times['cublas'] / 1e12:4.2f} TB/s")
        if sweep_blocks:
            sweep(op, x, w, gb)
    print(f"one decode step's matmuls (16 layers + lm_head): triton fused {total['fused'] * 1e3:.3f} ms, "
          f"PyTorch ops {total['unfused'] * 1e3:.3f} ms, cuBLAS matmuls alone {total['cublas'] * 1e3:.3f} ms")


def sweep(op, x, w, gb):
    """Time the fused op under every candidate (BLOCK_N, BLOCK_K, warps); print the best three."""
    k = x.shape[1]
    norm = op.startswith("rms_norm")
    tiles = 2 if op == "rms_norm_swiglu" else 1
    results = []
    for block_n, block_k, warps in itertools.product(
            (1, 2, 4, 8), (triton.next_power_of_2(k),) if norm else (1024, 2048, 4096), (1, 2, 4, 8)):
        if block_n * block_k * tiles > 32768:
            continue
        blocks = (block_n, block_k, warps)
        results.append((timed(fused_and_unfused(op, x, w, blocks)[0], reps=50), blocks))
    for t, (block_n, block_k, warps) in sorted(results)[:3]:
        print(f"    BLOCK_N {block_n} BLOCK_K {block_k:4d} warps {warps}: {t * 1e6:6.1f} us {gb / t / 1e12:5.2f} TB/s")


if __name__ == "__main__":
    main()
