"""Decode matmul kernels on CUDA at the 1B-class Llama's shapes: bf16 vs fp8 vs int4, and the tile tables.

  python benchmarks/quant_kernels_bench.py --device cuda [--rows 1,2,4,8,16,32,64] [--formats bf16,fp8,int4]
                                           [--shapes qkv,o,gate_up,down,lm_head] [--out tiles.json]

For each projection of benchmarks/engine_bench.py's LLAMA_1B (qkv 3072x2048, o 2048x2048, gate_up
16384x2048, down 2048x8192, lm_head 49152x2048) and each decode batch M, it times every candidate with
the work the decode step does around it:
  bf16 cuBLAS        F.linear (what batches above FUSED_MAX_BATCH run in bf16)
  bf16 skinny        kernels/skinny_matmul.py's fused kernel (RMSNorm / SwiGLU / residual fused), M <= 4
  bf16 triton        kernels/pdl_matmul.py (the 16-bit decode matmul that launches in the PDL chain), M >= 16,
                     under each candidate tile; for gate_up also "bf16 triton swiglu", the same kernel ending in
                     the SwiGLU (CHAIN's gate_up, the 'bf16-swiglu' entries); qkv only on unsplit tiles (a split's
                     add would delay the attention kernel that qkv lets launch early), in fp8 too
  fp8 _scaled_mm     per-token quantization kernel + torch._scaled_mm (cuBLASLt)
  fp8 triton         per-token quantization kernel + kernels/fp8_matmul.py, under each candidate tile
  fp8 skinny         the fused kernel reading e4m3 weights, quantizing x per token inside, M <= 4
  int4 triton        kernels/int4_matmul.py (g32), under each candidate tile
  int4 skinny        the fused kernel reading int4 weights, M <= 4; at M = 1 also kernels/int4_gemv.py's
                     one-row kernel (fp16-pair arithmetic), whichever is faster per shape
  int4 tinygemm      torch.ops.aten._weight_int4pack_mm (PyTorch's CUDA int4 kernel, gpt-fast's and torchao's),
                     the same g32 numbers as w = (q - 8) * s + z; not a path of the decode step yet: a
                     reference for the Triton kernels (its error against the dequantized weight is printed once)
Each time is a CUDA graph replay over enough distinct copies of the weight that they never fit the L2
(as in a decode step, where each layer's weight comes from HBM), divided by the calls; GB/s is the
weight bytes over that time. Printed: the table (best tile per candidate family), a decode step's
matmuls (16 layers + lm_head) per format and M with its ratio to bf16, and the Python tables to paste
into the kernel modules (int4_matmul.TILES, fp8_matmul.TILES with CUBLAS where cuBLASLt wins,
skinny_matmul.TILES, int4_gemv.TILES) and llama_decode.FUSED_MAX_BATCH_QUANTIZED. --out writes all of it as JSON.
"""

from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F
import triton

from kvtriton.backend.kernels import skinny_matmul
from kvtriton.backend.kernels.fp8_matmul import CUBLAS, fp8_matmul_with
from kvtriton.backend.kernels.fp8_matmul import heuristic_tile as fp8_heuristic
from kvtriton.backend.kernels.fp8_quant import per_token_fp8
from kvtriton.backend.kernels.int4_matmul import heuristic_tile as int4_heuristic
from kvtriton.backend.kernels.int4_matmul import int4_matmul_with, split_k_for
from kvtriton.backend.kernels.pdl_matmul import pdl_matmul_with
from kvtriton.backend.kernels.tile_config import Tile
from kvtriton.backend.models.fp8 import FP8_MAX, MIN_SCALE, Fp8Linear, quantize_fp8_per_channel
from kvtriton.backend.models.int4 import Int4Linear, quantize_groupwise
from kvtriton.backend.models.llama import RMSNorm
from kvtriton.backend.models.llama_decode import decode_weight

# (name, weight rows N, K, the fused op the decode step runs, layers a step reads it in)
SHAPES = [("qkv", 3072, 2048, "rms_norm_linear", 16), ("o", 2048, 2048, "linear+residual", 16),
          ("gate_up", 16384, 2048, "rms_norm_swiglu", 16), ("down", 2048, 8192, "linear+residual", 16),
          ("lm_head", 49152, 2048, "rms_norm_linear", 1)]
GROUP = 32
HBM_BYTES = 150e6  # each timed op rotates over at least this many weight bytes: 3x an H200's 50 MB L2
REPS = 3
DEVICE = "cuda"  # (a CPU dry run under TRITON_INTERPRET=1 sets "cpu" to check the program, not to time)


def graph_seconds(calls: list) -> float:
    """Seconds per call: one CUDA graph runs every call in turn, REPS rounds, replayed after a warm-up."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            for call in calls:
                call()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (3 * REPS * len(calls))


def copies(weight_bytes: int) -> int:
    return max(2, math.ceil(HBM_BYTES / weight_bytes))


def make_layers(n: int, k: int) -> dict:
    """The shape's weight in each format, each as a list of distinct copies (distinct addresses for the L2)."""
    w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) / k**0.5
    fp8 = Fp8Linear(*quantize_fp8_per_channel(w), None)
    int4 = Int4Linear.from_group_quantized(quantize_groupwise(w, GROUP), device=DEVICE)
    clones = {"bf16": w.clone, "fp8": lambda: Fp8Linear(fp8.weight.clone(), fp8.weight_scale.clone(), None),
              "int4": lambda: Int4Linear(int4.qweight.clone(), int4.scale.clone(), int4.zero_point.clone(), None,
                                         GROUP, None)}
    sizes = {"bf16": n * k * 2, "fp8": n * k, "int4": n * k // 2 + 3 * n * (k // GROUP)}  # + fp16 scale, u8 zero
    layers = {name: ([clone() for _ in range(copies(sizes[name]))], sizes[name]) for name, clone in clones.items()}
    try:
        packed, scale_zeros = tinygemm_operands(quantize_groupwise(w, GROUP))
        tiny_bytes = packed.numel() * packed.element_size() + scale_zeros.numel() * 2
        layers["tinygemm"] = ([(packed.clone(), scale_zeros.clone()) for _ in range(copies(tiny_bytes))], tiny_bytes)
    except Exception as e:  # noqa: BLE001 - a reference only: say why and go on
        print(f"# int4 tinygemm: unavailable here ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
    return layers


def tinygemm_operands(gq) -> tuple[torch.Tensor, torch.Tensor]:
    """A GroupQuantized int4 weight as torch's CUDA int4 kernel takes it: codes packed two a byte by
    _convert_weight_to_int4pack (8 inner K tiles), and (G, N, 2) bf16 scales and zeros with w = (q - 8) * s + z,
    z = (8 - zero_point) * s."""
    q = gq.codes.to(DEVICE).int()
    packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), 8)
    scale = gq.scale.to(DEVICE).float()
    zero = (8 - gq.zero_point.to(DEVICE).float()) * scale
    return packed, torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous().to(torch.bfloat16)


def fused_call(op: str, x: torch.Tensor, weight, norm: torch.Tensor, residual: torch.Tensor, blocks=None):
    """The decode step's fused kernel for this shape (weight: a bf16 tensor or a QuantizedWeight)."""
    if op == "rms_norm_linear":
        return lambda: skinny_matmul.rms_norm_linear(x, norm, 1e-5, weight, blocks=blocks)
    if op == "rms_norm_swiglu":
        return lambda: skinny_matmul.rms_norm_swiglu(x, norm, 1e-5, weight, blocks=blocks)
    return lambda: skinny_matmul.linear(x, weight, residual=residual, blocks=blocks)


def int4_tiles(m: int, n: int, k: int) -> list[Tile]:
    """Candidates: the heuristic's, broadcast GEMV tiles (<= 8 rows), and tl.dot tiles (Marlin/GemLite-like)
    of 16-128 outputs by 64-256 inputs per pipeline stage (4 stages deep, 3 for 256), split along K until there are
    132+ programs (one per H200 SM); from 32 rows also 256 outputs on two warpgroups."""
    tiles = {int4_heuristic(m, n, k, GROUP)}
    if m <= 8:
        bm = triton.next_power_of_2(m)
        for bn, bk, split, warps in ((2, 1024, 1, 1), (4, 1024, 1, 4), (8, 512, 1, 4), (8, 256, 2, 4)):
            if bm * bn * bk <= 16384:
                tiles.add(Tile(bm, bn, bk, split, warps, False))
    bm = max(16, triton.next_power_of_2(m))
    for bn in (16, 32, 64, 128):  # 16: as bf16_tiles, a narrow projection unsplit on 128 programs
        for bk in (64, 128, 256):
            tiles.add(Tile(bm, bn, bk, split_k_for(n, k, bn, bk), 4, True, 4 if bk <= 128 else 3))
            tiles.add(Tile(bm, bn, bk, 1, 4, True, 4))  # unsplit, as fp8_tiles (where that won at 64 rows)
    if m >= 32:
        # Every program reads all its rows of x (bf16) from L2 for its block_n outputs' codes from HBM: at 64 rows
        # and 128 outputs, x is twice the codes' bytes (the table's 64-row tiles read ~62 MB of x a layer against
        # 17 MB of codes), so wider tiles, fewer x reads.
        for bk in (64, 128):
            for split in {1, split_k_for(n, k, 256, bk)}:
                tiles.add(Tile(bm, 256, bk, split, 8, True, 3))
    return [t for t in tiles if k % (t.block_k * t.split_k) == 0]


def fp8_tiles(m: int, n: int, k: int) -> list[Tile]:
    """Candidates: the heuristic's and broadcast GEMV tiles (<= 8 rows); tl.dot tiles of fixed splits, and, as
    int4_tiles, of 16-128 outputs by 64-256 inputs per stage, split along K until there are 132+ programs (a
    64-row o_proj of 2,048 outputs in 64-wide tiles is 32 programs on 132 SMs otherwise), and unsplit."""
    tiles = set()
    if m <= 8:
        tiles.add(fp8_heuristic(m, 2048, k))
        bm = triton.next_power_of_2(m)
        for bn, bk, split, warps in ((2, 2048, 1, 1), (4, 1024, 1, 1), (8, 1024, 1, 4), (8, 512, 2, 4)):
            if bm * bn * bk <= 16384:
                tiles.add(Tile(bm, bn, bk, split, warps, False))
    bm = max(16, triton.next_power_of_2(m))
    for bn, bk, split, warps in ((32, 128, 2, 4), (64, 128, 1, 4), (32, 256, 4, 4), (64, 256, 2, 8)):
        tiles.add(Tile(bm, bn, bk, split, warps, True))
    for bn in (16, 32, 64, 128):  # 16: as bf16_tiles, a narrow projection unsplit on 128 programs
        for bk in (64, 128, 256):
            tiles.add(Tile(bm, bn, bk, split_k_for(n, k, bn, bk), 4, True, 4 if bk <= 128 else 3))
            # Unsplit, 4 stages deep: fewer programs than SMs can still win (no partial sums to add). At 64 rows
            # 32 x 256 was the best qkv and o_proj tile (5.2 and 4.9 us against 8.4 and 8.2, H200, 2026-12-05).
            tiles.add(Tile(bm, bn, bk, 1, 4, True, 4))
    if m >= 32:
        # Deeper pipelines and two warpgroups: at 64 rows the 1B-class step's fp8 matmuls streamed ~1.95 TB/s on an
        # H200 whose copies reach 4.2 (550 us a step, profile_decode.py --quantization fp8 --profile, stop 59); a
        # tile of 64 rows reads as many activation bytes (from L2) as weight bytes at 64 outputs, and more bytes in
        # flight a program may be what keeps HBM busy.
        for bn, bk in ((64, 256), (128, 128), (128, 256), (256, 128)):
            for warps, stages in ((4, 5), (8, 3), (8, 4), (8, 5)):
                tiles.add(Tile(bm, bn, bk, 1, warps, True, stages))
                tiles.add(Tile(bm, bn, bk, split_k_for(n, k, bn, bk), warps, True, stages))
    return [t for t in tiles if t is not None and k % (t.block_k * t.split_k) == 0]


def bf16_tiles(m: int, n: int, k: int) -> list[Tile]:
    """Candidates for kernels/pdl_matmul.py at 16+ rows: all rows in one tile, 16-256 outputs by 64-256 inputs a
    stage (wgmma takes up to 256 outputs at 64 rows), one or two warpgroups, unsplit and split along K until there
    are 132+ programs. 16 outputs: a 2,048-output projection (o_proj, down) unsplit on 128 programs, with no
    split-K add after it (a launch on the step's critical path, ~1.4 us at 64 rows on an H100)."""
    bm = max(16, triton.next_power_of_2(m))
    tiles = set()
    for bn, bk in ((16, 128), (16, 256), (32, 128), (64, 64), (64, 128), (128, 64), (128, 128), (256, 64)):
        for warps, stages in ((4, 4), (8, 4)):
            for split in {1, split_k_for(n, k, bn, bk)}:
                tiles.add(Tile(bm, bn, bk, split, warps, True, stages))
    return [t for t in tiles if k % (t.block_k * t.split_k) == 0]


# One int4 row through kernels/int4_gemv.py instead: ("gemv", ROWS, num_warps, programs per SM or None).
GEMV_CHOICES = [("gemv", rows, warps, per_sm) for rows in (2, 4, 8, 16) for warps in (1, 2, 4, 8)
                for per_sm in (None, 8, 16)]


def skinny_blocks(m: int, n: int, k: int, op: str) -> list[tuple[int, int, int]]:
    """The heuristic's (BLOCK_N, BLOCK_K, warps) and neighbours: two and four times the outputs on 2, 4 or 8
    warps (a quantized tile holds a half or a quarter of the bytes, so a program may need more rows to keep
    as many loads in flight, and more threads to share the per-program work on x), the other warp count,
    and a tile as long as K."""
    norm, swiglu = op.startswith("rms_norm"), op == "rms_norm_swiglu"
    base = skinny_matmul.tile_of(m, n // 2 if swiglu else n, k, norm, swiglu)
    out = {(base.block_n, base.block_k, base.warps), (base.block_n, base.block_k, 4 if base.warps == 1 else 1)}
    lengths = {base.block_k}
    if not norm and base.block_k < k:  # one tile along all of K: fp8 then needs no first pass for max|x|
        out.add((max(1, base.block_n // 2), triton.next_power_of_2(k), 4))
        lengths.add(triton.next_power_of_2(k))
    # fp8 at one row (2026-12-04): 8-16 rows a program on 8 warps won for qkv, o and down
    out |= {(base.block_n * f, bk, w) for f in (2, 4) for bk in lengths for w in (2, 4, 8)}
    return sorted(out)


def may_split(name: str) -> bool:
    """Whether a projection's tile may split K: not qkv, whose split's add would sit between it and the attention
    kernel it lets launch early (on an H100 the bf16 16-row step 1.195-1.198 -> 1.203-1.207 ms on the sweep's split
    qkv tile, stop 64)."""
    return name != "qkv"


def time_shape(name, n, k, op, rows, results, log, formats=("bf16", "fp8", "int4")):
    layers = make_layers(n, k)
    out_n = n // 2 if op == "rms_norm_swiglu" else n
    norm = RMSNorm(k, 1e-5).to(DEVICE, torch.bfloat16).weight
    for m in rows:
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        residual = torch.randn(m, out_n, device=DEVICE, dtype=torch.bfloat16)
        row = {}

        def best(family, options):
            """options: {label: [calls]} -> the fastest (label, seconds) under `family`. A candidate that fails
            (a tile too big for shared memory, say) is named in one line and left out."""
            timed = {}
            for label, calls in options.items():
                try:
                    timed[label] = graph_seconds(calls)
                except Exception as e:  # noqa: BLE001 - one bad tile must not end a one-shot GPU run
                    log(f"  {name} M={m} {family} {label}: failed, left out ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})")
                    torch.cuda.synchronize()
            if timed:
                label = min(timed, key=timed.get)
                row[family] = (label, timed[label], {str(key): value for key, value in timed.items()})

        bf16, bf16_bytes = layers["bf16"]
        fp8, fp8_bytes = layers["fp8"]
        int4, int4_bytes = layers["int4"]
        best("bf16 cuBLAS", {"F.linear": [lambda w=w: F.linear(x, w) for w in bf16]})
        if m <= skinny_matmul.MAX_ROWS:
            best("bf16 skinny", {"heuristic": [fused_call(op, x, w, norm, residual) for w in bf16]})
        if m >= 16 and "bf16" in formats:
            best("bf16 triton", {tile: [lambda w=w, tile=tile: pdl_matmul_with(x, w, None, tile) for w in bf16]
                                 for tile in bf16_tiles(m, n, k) if may_split(name) or tile.split_k == 1})
        if m >= 16 and "bf16" in formats and op == "rms_norm_swiglu":  # gate_up ending in the SwiGLU (CHAIN)
            best("bf16 triton swiglu", {tile: [lambda w=w, tile=tile: pdl_matmul_with(x, w, None, tile, swiglu=True)
                                               for w in bf16]
                                        for tile in bf16_tiles(m, n // 2, k) if tile.split_k == 1})

        def fp8_call(layer, tile):
            def call():
                xq, x_scale = per_token_fp8(x, FP8_MAX, MIN_SCALE)
                if tile is None:
                    return torch._scaled_mm(xq, layer.weight.T, scale_a=x_scale, scale_b=layer.weight_scale,
                                            out_dtype=torch.bfloat16)
                return fp8_matmul_with(xq, x_scale, layer.weight, layer.weight_scale, torch.bfloat16, tile)
            return call

        if "fp8" in formats:
            best("fp8 _scaled_mm", {"cuBLASLt": [fp8_call(layer, None) for layer in fp8]})
            best("fp8 triton", {tile: [fp8_call(layer, tile) for layer in fp8] for tile in fp8_tiles(m, n, k)
                                if may_split(name) or tile.split_k == 1})
        if "int4" in formats:
            best("int4 triton", {tile: [lambda layer=layer, tile=tile: int4_matmul_with(
                x, layer.qweight, layer.scale, layer.zero_point, layer.offset, GROUP, tile) for layer in int4]
                for tile in int4_tiles(m, n, k)})
        if "tinygemm" in layers and "int4" in formats:
            tiny = layers["tinygemm"][0]
            if m == rows[0]:  # once a shape: are the operands right? (bf16 scales: ~1e-2 relative is expected)
                reference = x.float() @ int4[0].dequantized_weight().float().T
                got = torch.ops.aten._weight_int4pack_mm(x, tiny[0][0], GROUP, tiny[0][1]).float()
                error = ((got - reference).norm() / reference.norm()).item()
                log(f"  {name} int4 tinygemm: relative error {error:.2e} against the dequantized weight")
            best("int4 tinygemm", {"_weight_int4pack_mm": [
                lambda p=p, sz=sz: torch.ops.aten._weight_int4pack_mm(x, p, GROUP, sz) for p, sz in tiny]})
        if m <= skinny_matmul.MAX_ROWS:
            for kind, layers_of_kind in (("fp8", fp8), ("int4", int4)):
                if kind not in formats:
                    continue
                choices = skinny_blocks(m, n, k, op) + (GEMV_CHOICES if kind == "int4" and m == 1 else [])
                best(f"{kind} skinny", {blocks: [fused_call(op, x, decode_weight(layer), norm, residual, blocks)
                                                 for layer in layers_of_kind]
                                        for blocks in choices})
        best_of = {family: dict(choice=str(v[0]), seconds=v[1], tried=v[2]) for family, v in row.items()}
        results.append(dict(shape=name, n=n, k=k, op=op, m=m, bytes=dict(bf16=bf16_bytes, fp8=fp8_bytes,
                                                                          int4=int4_bytes),
                            best=best_of, choice={family: v[0] for family, v in row.items()}))
        cells = []
        for family, (label, seconds, _) in row.items():
            nbytes = {"bf16": bf16_bytes, "fp8": fp8_bytes, "int4": int4_bytes}[family.split()[0]]
            cells.append(f"{family} {seconds * 1e6:6.1f}us {nbytes / seconds / 1e12:4.2f}TB/s")
        log(f"{name:8} M={m:<3d} " + " | ".join(cells))
    del layers
    torch.cuda.empty_cache()


def summarize(results: list, rows: list[int], log) -> dict:
    """Per M and format: a step's matmuls on each path (16 layers + lm_head); and the tables to paste."""
    from kvtriton.backend.kernels.tile_config import rows_bucket

    layers_of = {name: count for name, _, _, _, count in SHAPES}
    tables = {"int4_matmul.TILES": {}, "fp8_matmul.TILES": {}, "skinny_matmul.TILES": {}, "int4_gemv.TILES": {},
              "pdl_matmul.TILES": {}}
    fused_max = {"fp8": 0, "int4": 0}
    log("\n# a decode step's matmuls (16 layers + lm_head), ms: fused = the skinny kernels, unfused = the best "
        "other path; vs bf16 = the format's better path over bf16's")
    log(f"{'M':>3} | {'bf16 fused':>10} {'bf16 cuBLAS':>11} | {'fp8 fused':>9} {'fp8 unfused':>11} {'vs bf16':>7} | "
        f"{'int4 fused':>10} {'int4 unfused':>12} {'vs bf16':>7}")
    for m in rows:
        step: dict[str, float] = {}
        for r in (r for r in results if r["m"] == m):
            for family, b in r["best"].items():
                step[family] = step.get(family, 0.0) + b["seconds"] * layers_of[r["shape"]]
            bucket, choice, best = rows_bucket(m), r["choice"], r["best"]
            if "bf16 triton" in choice:
                tables["pdl_matmul.TILES"][("bf16", bucket, r["n"], r["k"])] = tuple(choice["bf16 triton"])
            if "bf16 triton swiglu" in choice:
                tables["pdl_matmul.TILES"][("bf16-swiglu", bucket, r["n"] // 2, r["k"])] = tuple(
                    choice["bf16 triton swiglu"])
            if "int4 triton" in choice:
                tables["int4_matmul.TILES"][("int4", bucket, r["n"], r["k"])] = tuple(choice["int4 triton"])
            if "fp8 triton" in choice or "fp8 _scaled_mm" in best:
                triton_s = best.get("fp8 triton", {}).get("seconds", math.inf)
                cublas_s = best.get("fp8 _scaled_mm", {}).get("seconds", math.inf)
                tables["fp8_matmul.TILES"][("fp8", bucket, r["n"], r["k"])] = (
                    tuple(choice["fp8 triton"]) if triton_s < cublas_s else CUBLAS)
            n_out = r["n"] // 2 if r["op"] == "rms_norm_swiglu" else r["n"]
            for kind in ("fp8", "int4"):
                if f"{kind} skinny" in choice and choice[f"{kind} skinny"][0] == "gemv":
                    tables["int4_gemv.TILES"][(n_out, r["k"])] = tuple(choice[f"{kind} skinny"][1:])
                elif f"{kind} skinny" in choice:
                    bn, bk, warps = choice[f"{kind} skinny"]
                    tables["skinny_matmul.TILES"][(f"skinny-{kind}", bucket, n_out, r["k"])] = (
                        triton.next_power_of_2(m), bn, bk, 1, warps)
        shapes_at_m = sum(1 for r in results if r["m"] == m)

        def total(*families):  # a path's step time, if every shape measured it
            complete = [step[f] for f in families
                        if f in step and all(f in r["best"] for r in results if r["m"] == m)]
            return min(complete) if complete and shapes_at_m else math.inf

        bf16 = total("bf16 skinny", "bf16 cuBLAS")
        paths = {"fp8": (total("fp8 skinny"), total("fp8 _scaled_mm", "fp8 triton")),
                 "int4": (total("int4 skinny"), total("int4 triton"))}
        for kind, (fused, unfused) in paths.items():
            if fused < unfused:
                fused_max[kind] = m
        cells = " | ".join(f"{fused * 1e3:9.3f} {unfused * 1e3:11.3f} {min(fused, unfused) / bf16:6.2f}x"
                           for fused, unfused in paths.values())
        log(f"{m:3d} | {total('bf16 skinny') * 1e3:10.3f} {total('bf16 cuBLAS') * 1e3:11.3f} | {cells}")
        if total("bf16 triton") < math.inf:
            log(f"    bf16 on kernels/pdl_matmul.py: {total('bf16 triton') * 1e3:.3f} ms, "
                f"{total('bf16 triton') / total('bf16 cuBLAS'):.2f}x cuBLAS")
        if total("int4 tinygemm") < math.inf:  # the reference, not a path: beside the int4 paths, not in them
            log(f"    int4 tinygemm (PyTorch's CUDA kernel, a reference): {total('int4 tinygemm') * 1e3:.3f} ms, "
                f"{total('int4 tinygemm') / bf16:.2f}x bf16")
    tables["llama_decode.FUSED_MAX_BATCH_QUANTIZED"] = fused_max
    log("\n# paste into the kernel modules (measured on this GPU):")
    for name, table in tables.items():
        module, variable = name.split(".")
        log(f"{variable} = {{  # backend/{'models' if module == 'llama_decode' else 'kernels'}/{module}.py")
        for key, value in table.items():
            log(f"    {key!r}: {value!r},")
        log("}")
    log("(FUSED_MAX_BATCH_QUANTIZED 0: the fused kernels lost at every batch size; check the batch-1 step with "
        "benchmarks/precision_bench.py --part gpu before setting it below 1)")
    return tables


@torch.inference_mode()
def main(args) -> None:
    started = time.monotonic()
    rows = [int(r) for r in args.rows.split(",")]
    torch.manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; LLAMA_1B "
          f"shapes, bf16 activations, int4 g{GROUP}; CUDA-graph replay over >= {HBM_BYTES / 1e6:.0f} MB of weight "
          f"copies per op (L2 {torch.cuda.get_device_properties(0).L2_cache_size / 1e6:.0f} MB)", flush=True)
    results = []
    formats = tuple(args.formats.split(","))
    asked = args.shapes.split(",")
    swept = [shape for shape in SHAPES if shape[0] in asked]
    if len(swept) < len(SHAPES):  # the tiles stand alone; a step's sum and FUSED_MAX_BATCH_QUANTIZED need them all
        print(f"# only {', '.join(name for name, *_ in swept)}: the step totals below cover these projections "
              f"alone, and its FUSED_MAX_BATCH_QUANTIZED is not the step's", flush=True)
    for name, n, k, op, _ in swept:
        time_shape(name, n, k, op, rows, results, lambda line: print(line, flush=True), formats)
        if args.out:  # after every shape, so that a sweep cut short by a time limit still leaves what it measured
            write_json(args.out, results, summarize(results, rows, lambda line: None))
    tables = summarize(results, rows, print)
    print(f"# {time.monotonic() - started:.0f} s")
    if args.out:
        write_json(args.out, results, tables)
        print(f"wrote {args.out}")


def write_json(path: str, results: list, tables: dict) -> None:
    with open(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       results=results, tables={name: [[list(k), list(v)] for k, v in table.items()]
                                                if name != "llama_decode.FUSED_MAX_BATCH_QUANTIZED" else table
                                                for name, table in tables.items()}), f, indent=1, default=str)
