"""Paged attention kernels (Triton) alone, on the 1B-class shapes (32 query / 8 KV heads of 64), bf16.

Decode: one layer's paged_decode_attention for (batch, context) against its bound, the KV bytes it must
read / the copy bandwidth measured in this run, for each split count (the default marked *), and beside
it the PyTorch path (gather + SDPA) on the same step. Consecutive calls read different copies of the
pools, over 200 MB in all, so that the KV comes from HBM as in a decode step, not from the 50 MB L2.
Prefill: one layer's varlen kernel over a packed step (N prompts of T tokens, or one chunk of T tokens
after a cached prefix) against the PyTorch path (one SDPA call per sequence after gathering its
context) and, where torch has it, torch.nn.attention.varlen.varlen_attn on contiguous K/V (no pages).

  python benchmarks/paged_attention_bench.py [--sweep] [--kv-cache-dtype auto|fp8 [--e4m3-widen registers|operands]]
"""

from __future__ import annotations

import argparse

import torch
import triton

from kvtriton.backend.attention.kv_cache import KVCache
from kvtriton.backend.attention.metadata import AttentionMetadata
from kvtriton.backend.attention.paged import PagedAttention
from kvtriton.backend.kernels import paged_decode_attention as paged_decode_attention_module
from kvtriton.backend.kernels.paged_decode_attention import default_num_splits, default_tile, paged_decode_attention
from kvtriton.backend.kernels.paged_prefill_attention import paged_prefill_attention

HEADS, KV_HEADS, DIM, BS = 32, 8, 64, 16
DTYPE = torch.bfloat16
KV_DTYPES = {"auto": DTYPE, "fp8": torch.float8_e4m3fn}  # the pools' (EngineConfig.kv_cache_dtype)


def timed(fn, reps=50, graph=True) -> float:
    """Seconds per call: a CUDA graph of `reps` calls (no launch gaps, as in the engine's decode), or an
    eager loop between CUDA events."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        g.replay()
        torch.cuda.synchronize()
        start.record()
        g.replay()
    else:
        start.record()
        for _ in range(reps):
            fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), reps=10, graph=False)
    return 2 * src.numel() / t  # read + write


def paged_step(query_lens, context_lens, kv_dtype, seed=0):
    """Pools holding every context at scattered blocks, block tables, slots, q/k/v of the new tokens."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    widths = [-(-c // BS) for c in context_lens]
    blocks = sum(widths) + 1
    cache = KVCache.allocate(1, blocks, BS, KV_HEADS, DIM, kv_dtype, "cuda")
    for p in (cache.k[0], cache.v[0]):
        p.copy_(torch.randn(p.shape, generator=g, device="cuda"))  # an fp8 pool has no normal_
    perm = torch.randperm(blocks - 1, generator=g, device="cuda")
    tables = torch.zeros(len(context_lens), max(widths), dtype=torch.int64, device="cuda")
    used = 0
    for i, w in enumerate(widths):
        tables[i, :w] = perm[used : used + w]
        used += w
    pos = torch.cat([torch.arange(c - n, c, device="cuda") for n, c in zip(query_lens, context_lens)])
    rows = torch.repeat_interleave(torch.arange(len(query_lens), device="cuda"),
                                   torch.tensor(query_lens, device="cuda"))
    slots = tables[rows, pos // BS] * BS + pos % BS
    n = sum(query_lens)
    q = torch.randn(n, HEADS, DIM, generator=g, device="cuda", dtype=DTYPE)
    k = torch.randn(n, KV_HEADS, DIM, generator=g, device="cuda", dtype=DTYPE)
    v = torch.randn(n, KV_HEADS, DIM, generator=g, device="cuda", dtype=DTYPE)
    return cache, tables, slots, q, k, v


def decode(batch, context, bandwidth, sweep, kv_dtype=DTYPE):
    cache, tables, slots, q, k, v = paged_step([1] * batch, [context] * batch, kv_dtype)
    ctx = torch.full((batch,), context, device="cuda")
    kv_bytes = 2 * batch * context * KV_HEADS * DIM * kv_dtype.itemsize
    copies = -(-200_000_000 // kv_bytes)
    pools = [(cache.k[0].clone(), cache.v[0].clone()) for _ in range(copies)]
    bound = kv_bytes / bandwidth
    tile = default_tile(batch, KV_HEADS, q.device)
    default = default_num_splits(batch, KV_HEADS, tables.shape[1] * BS, q.device, tile)

    def cycle(**launch):
        def run():
            for k_pool, v_pool in pools:
                paged_decode_attention(q, k, v, k_pool, v_pool, slots, tables, ctx, DIM**-0.5, **launch)
        return lambda: timed(run, reps=max(1, 50 // copies)) / copies

    splits = sorted({1, 2, 4, 8, 16, 32, default}) if sweep else [default]
    cells = []
    for s in splits:
        t = cycle(num_splits=s)()
        cells.append(f"{s}{'*' if s == default else ''}: {t * 1e6:6.1f} us {bound / t * 100:3.0f}%")
    cells[0] = f"tile {tile} splits " + cells[0]
    if sweep:  # tile shapes at the default split count
        results = sorted((cycle(num_splits=default, tile=(bt, w, st))(), bt, w, st)
                         for bt in (32, 64, 128, 256) for w in (2, 4, 8) for st in (2, 3))
        cells.append("best tiles " + ", ".join(f"T{bt} w{w} s{st} {t * 1e6:.1f} us" for t, bt, w, st in results[:3]))
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=ctx, num_decodes=batch,
                             query_lens=[1] * batch, context_lens_host=[context] * batch,
                             decode_context_blocks=tables.shape[1], decode_only=True)
    torch_t = timed(lambda: PagedAttention(cache, meta, DIM**-0.5).attend(0, q, k, v))
    print(f"decode batch {batch:3d} context {context:5d}: bound {bound * 1e6:6.1f} us "
          f"({kv_bytes / 1e6:6.1f} MB) | {' | '.join(cells)} | PyTorch path {torch_t * 1e6:7.1f} us")


def prefill(name, query_lens, context_lens, sweep, kv_dtype=DTYPE):
    cache, tables, slots, q, k, v = paged_step(query_lens, context_lens, kv_dtype)
    ctx = torch.tensor(context_lens, device="cuda")
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=ctx, num_decodes=0,
                             query_lens=query_lens, context_lens_host=context_lens, decode_context_blocks=0)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], device="cuda")
    kernel = PagedAttention(cache, meta, DIM**-0.5, varlen_kernel=True)
    reference = PagedAttention(cache, meta, DIM**-0.5)
    got, expected = kernel.attend(0, q, k, v), reference.attend(0, q, k, v)
    err = (got.float() - expected.float()).abs().max().item()
    flops = sum(4 * n * (c - n / 2) * HEADS * DIM for n, c in zip(query_lens, context_lens))  # causal
    t_kernel = timed(lambda: kernel.attend(0, q, k, v), graph=False)
    t_torch = timed(lambda: reference.attend(0, q, k, v), graph=False, reps=10)
    line = (f"prefill {name}: varlen kernel {t_kernel * 1e6:7.1f} us ({flops / t_kernel / 1e12:5.1f} TFLOP/s) | "
            f"PyTorch path {t_torch * 1e6:8.1f} us ({t_torch / t_kernel:4.1f}x) | max |diff| {err:.4f}")
    try:
        from torch.nn.attention.varlen import varlen_attn

        if all(n == c for n, c in zip(query_lens, context_lens)):  # fresh prompts: contiguous K/V = the new ones
            cu = starts.to(torch.int32)
            m = max(query_lens)
            t_varlen = timed(lambda: varlen_attn(q, k, v, cu, cu, m, m, scale=DIM**-0.5, window_size=(-1, 0)),
                             graph=False)
            line += f" | torch varlen_attn (contiguous) {t_varlen * 1e6:7.1f} us"
    except (ImportError, RuntimeError, TypeError) as exc:
        line += f" | torch varlen_attn: {type(exc).__name__}"
    print(line)
    if sweep:
        results = []
        for rows, block_n, warps, stages in [(r, n, w, s) for r in (32, 64, 128) for n in (32, 64)
                                             for w in (4, 8) for s in (2, 3)]:
            try:
                t = timed(lambda: paged_prefill_attention(q, cache.k[0], cache.v[0], tables, starts, ctx, DIM**-0.5,
                                                          rows=rows, block_n=block_n, num_warps=warps,
                                                          num_stages=stages), graph=False)
            except Exception as exc:  # noqa: BLE001 - a tile shape that does not compile or fit
                print(f"    rows {rows} block_n {block_n} warps {warps} stages {stages}: {type(exc).__name__}")
                continue
            results.append((t, rows, block_n, warps, stages))
        for t, rows, block_n, warps, stages in sorted(results)[:3]:
            print(f"    rows {rows:3d} block_n {block_n:3d} warps {warps} stages {stages}: {t * 1e6:7.1f} us")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="every split count; prefill tile shapes")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_DTYPES), help="the pools' element type")
    ap.add_argument("--e4m3-widen", choices=["registers", "operands"], default="registers",
                    help="fp8 pools: where the decode kernel widens e4m3 (E4M3_WIDEN_IN_REGISTERS)")
    ap.add_argument("--decode-only", action="store_true", help="skip the prefill steps")
    ap.add_argument("--decode-shapes", default="1x192,1x2048,16x192,16x2048,64x192,64x2048",
                    help="decode steps to time: BATCHxCONTEXT, comma-separated")
    args = ap.parse_args()
    kv_dtype = KV_DTYPES[args.kv_cache_dtype]
    paged_decode_attention_module.E4M3_WIDEN_IN_REGISTERS = args.e4m3_widen == "registers"
    bandwidth = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, "
          f"{HEADS}/{KV_HEADS} heads of {DIM}, block size {BS}, KV {str(kv_dtype).removeprefix('torch.')} "
          f"(e4m3 widened at the {args.e4m3_widen}); "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for shape in args.decode_shapes.split(","):
        batch, context = (int(n) for n in shape.split("x"))
        decode(batch, context, bandwidth, args.sweep, kv_dtype)
    if args.decode_only:
        return
    prefill("64 x 128 fresh", [128] * 64, [128] * 64, args.sweep, kv_dtype)  # the tile sweep: this step only
    prefill("4 x 512 fresh", [512] * 4, [512] * 4, False, kv_dtype)
    prefill("512 after 1536 cached + 8 decodes", [1] * 8 + [512], [300] * 8 + [2048], False, kv_dtype)


if __name__ == "__main__":
    main()
