"""From how many rows the CPU's bf16 copies beat kvtriton's int4 GEMV, in decode batches and in prompt chunks: timed
on this CPU at load.

The GEMV reads 4-bit codes (few bytes) and multiplies with AVX-512 BF16's vdpbf16ps, so a decode batch
costs it about one pass of multiply-adds per row; a bf16 copy costs oneDNN's GEMM (AMX where the CPU has
it) nearly the same at 1 and at 64 rows. Where they cross depends on the CPU more than on the model: at 32
rows the default model's 30 layers took the GEMV 11.3 ms against the copies' 14.4 on a 2-core Sapphire
Rapids VM (2026-12-04), and its 30 layers and head 67 ms against 32 on a 2-core "Intel Xeon Processor" VM
whose vdpbf16ps runs at a quarter of its fp32 FMA's instruction rate (2026-12-05: 1.6 G against 6.7 G a
second on one core). The engine's 32 streams there: 317 tok/s on the GEMV up to 63 rows, 444 with the copies
from 32. So the loader times both on the model's own first layers and picks the thresholds.

A prompt's chunk pays the GEMV's cost for each of its tokens too: there one request's TTFT for a prompt of
96 / 160 / 240 tokens was 170 / 278 / 371 ms on the GEMV against 71 / 90 / 113 ms with the copies from 64
tokens (2026-12-05). Steps with a chunk that long take the copies (DenseRows.prompt); the candidates start at
64 tokens, above a short chat question: the default model's answer to "What is the capital of France?" (~35
tokens with its template) starts at an exact bf16 tie that the copies break the other way, so such a prompt
keeps the GEMV's numbers, alone or beside other short prompts (a step under 256 tokens).

The candidates are few (decode 32; 16 measured faster still there, 469 tok/s), well above one request's rows,
and the copies must win clearly: batches below the threshold compute what each request would alone (the
GEMV's numbers do not depend on the batch), and a near-tie in timing must not move greedy output from one
load to the next.
"""

from __future__ import annotations

import time

import torch

from kvtriton.backend.models.quantization import dense_linear

# Rows to try, lowest first: decode sequences and a prompt chunk's tokens; the first where the copies win by
# MARGIN sets that threshold.
DECODE_CANDIDATES = (32,)
PROMPT_CANDIDATES = (64, 128)
MARGIN = 0.8  # the copies' time must be at most this share of the GEMV's
# The layers timed: the model's first ones up to this many bytes of copies (more than an L2, so that the
# GEMV's fewer bytes count), and models with fewer weights than MIN_WEIGHTS are not timed (their matmuls are
# too small for the choice to matter or to be measured: the tests' tiny models keep the fixed threshold).
TIMED_BYTES = 64 << 20
MIN_WEIGHTS = 20_000_000
ROUNDS = 3


def dense_rows(layers: list, decode: int, prompt: int) -> tuple[int, int, str | None]:
    """(decode threshold, prompt threshold, the timings that chose them for the log or None if not timed) for
    quantized layers that each have a GEMV (`matmul`) and a dense copy (`dense_weight`). `decode` and `prompt`
    are the fixed thresholds, kept where the copies never win clearly at a candidate or the model is too small
    to time."""
    if sum(layer.dense_weight.numel() for layer in layers) < MIN_WEIGHTS:
        return decode, prompt, None
    timed, size = [], 0
    for layer in layers:
        if size >= TIMED_BYTES:
            break
        timed.append(layer)
        size += layer.dense_weight.numel() * layer.dense_weight.element_size()
    figures: dict[int, tuple[float, float]] = {}

    def first_win(candidates: tuple[int, ...], fixed: int) -> int:
        for rows in candidates:
            if rows not in figures:
                figures[rows] = _timings(timed, rows)
            gemv, copies = figures[rows]
            if copies <= MARGIN * gemv:
                return rows
        return fixed

    decode, prompt = first_win(DECODE_CANDIDATES, decode), first_win(PROMPT_CANDIDATES, prompt)
    said = "; ".join(f"{rows} rows: GEMV {gemv * 1e3:.2f} ms, copies {copies * 1e3:.2f} ms"
                     for rows, (gemv, copies) in sorted(figures.items()))
    return decode, prompt, f"{said} ({len(timed)} layers, {size / 1e6:.0f} MB)"


def _timings(layers: list, rows: int) -> tuple[float, float]:
    """Best of ROUNDS passes over `layers` at `rows` rows: (GEMV seconds, dense-copy seconds), alternated so
    that a neighbour's burst hits both; the first pass of each warms up."""
    g = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(rows, n, generator=g) for n in {layer.in_features for layer in layers}}

    def gemv():
        for layer in layers:
            layer.matmul(inputs[layer.in_features])

    def copies():
        for layer in layers:
            dense_linear(inputs[layer.in_features], layer.dense_weight).float()

    best = {gemv: float("inf"), copies: float("inf")}
    with torch.inference_mode():
        for round_ in range(ROUNDS + 1):
            for path in (gemv, copies):
                start = time.perf_counter()
                path()
                if round_:
                    best[path] = min(best[path], time.perf_counter() - start)
    return best[gemv], best[copies]
