"""Tile choices for the decode matmul kernels, looked up per (kernel, rows bucket, N, K), never autotuned.

A decode step runs inside a CUDA graph, so a kernel's launch configuration must be fixed before capture
and must not time anything (triton.autotune would run its sweep at the first call, i.e. at capture, and
pick from noisy single timings). Instead, as vLLM's fused_moe does with its per-device JSON configs,
benchmarks/quant_kernels_bench.py --device cuda sweeps the candidates once on the GPU and prints a
`TILES` entry per (kernel, rows bucket, N, K); pasted into the kernel module's table, it is used from
then on. A shape missing from the table takes the kernel's own heuristic.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # the decode batch sizes the runner captures graphs for
# The decode matmuls take their row count M with do_not_specialize. Triton compiles a variant per class of an
# integer argument (== 1, a multiple of 16, other), and the graphs capture M at the buckets above only, so an
# eager step's other counts compiled mid-serving (likely the logits rows of a prefill step that took part of 64
# arriving requests): an H200, fp8, `_fp8_matmul` compiled in 276 ms, that run's TTFT p50 299 ms against 22-39. M only
# bounds masks and addresses.
ROWS_NOT_SPECIALIZED = "M"

# Unmeasured shapes (the heuristics of kernels/fp8_matmul.py and int4_matmul.py): up to here rows a broadcast GEMV,
# past it a 16-row tensor-core tile. The GEMV's tile keeps ~8K weights, so at 8 rows it is one output wide and every
# program re-reads all rows of x (the 1B step at batch 5-8, the 8-row bucket missing from the tables until
# 2026-12-07: fp8 3.43 ms, int4 6.4 ms, against 0.91 and 1.20 at 16 rows on an H100). 2, as the tables have it: at
# 4 rows every measured shape took a tensor-core tile, at 2 rows most the GEMV.
BROADCAST_ROWS = 2


class Tile(NamedTuple):
    """One launch configuration. block_m/block_n/block_k: the program's tile; split_k: programs sharing one
    output tile along K (split_k.add_planes adds their fp32 partial sums); warps: num_warps; dot: tensor-core
    tl.dot (>= 16 rows) rather than the broadcast-multiply-sum of CUDA cores; stages: the software pipeline's
    depth over K, where the kernel pipelines (int4's dot form)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    warps: int = 4
    dot: bool = False
    stages: int = 3


def rows_bucket(m: int) -> int:
    """The smallest captured batch size >= m (the graph's padded row count)."""
    return next((b for b in ROW_BUCKETS if b >= m), ROW_BUCKETS[-1])


def buckets_between(min_rows: int, max_rows: int) -> list[int]:
    """The captured batch sizes that serve min_rows to max_rows rows."""
    return [b for b in ROW_BUCKETS if rows_bucket(min_rows) <= b <= max_rows]


# Every (kernel, rows bucket, N, K) looked up and missing from its table since start-up: those calls ran on the
# kernel's untimed heuristic. The runner names them after capturing its graphs, since one missing bucket can cost
# several times the step (the 8-row bucket, absent from the fp8 and int4 tables until 2026-12-07: 3.4 and 6.4 ms
# steps at batch 5-8 against 0.9 and 1.2 at 16).
UNMEASURED: set[tuple[str, int, int, int]] = set()


def measured(table: dict, kernel: str, m: int, n: int, k: int) -> tuple | None:
    """The table's entry for this call, or None (recorded in UNMEASURED)."""
    key = (kernel, rows_bucket(m), n, k)
    found = table.get(key)
    if found is None:
        UNMEASURED.add(key)
    return found


def unmeasured_shapes() -> list[str]:
    """UNMEASURED as one entry a (kernel, N, K): "fp8 N=576 K=576 at 8/16 rows"."""
    buckets: dict[tuple[str, int, int], list[int]] = {}
    for kernel, rows, n, k in sorted(UNMEASURED):
        buckets.setdefault((kernel, n, k), []).append(rows)
    return [f"{kernel} N={n} K={k} at {'/'.join(map(str, rows))} rows" for (kernel, n, k), rows in buckets.items()]


def lookup(table: dict, kernel: str, m: int, n: int, k: int) -> Tile | None:
    """The measured tile for this call, or None (then the kernel's heuristic)."""
    found = measured(table, kernel, m, n, k)
    return Tile(*found) if found is not None else None


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """The GPU's SM count, which launch shapes are sized by; off CUDA (Triton's interpreter) an H200's 132, so
    that the interpreter's tests take the launch shapes the H200 takes."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
