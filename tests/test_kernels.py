"""The Triton decode kernels equal the PyTorch modules they replace.

Runs on CUDA; on a CPU-only machine only under Triton's interpreter
(TRITON_INTERPRET=1 with triton installed), otherwise skips.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU)", allow_module_level=True)

from kvtriton.backend.attention.kv_cache import KVCache  # noqa: E402
from kvtriton.backend.attention.metadata import AttentionMetadata  # noqa: E402
from kvtriton.backend.attention.paged import PagedAttention  # noqa: E402
from kvtriton.backend.kernels import paged_decode_attention as paged_decode_attention_module  # noqa: E402
from kvtriton.backend.kernels import skinny_matmul  # noqa: E402
from kvtriton.backend.kernels.paged_decode_attention import paged_decode_attention  # noqa: E402
from kvtriton.backend.kernels.paged_prefill_attention import paged_prefill_attention  # noqa: E402
from kvtriton.backend.models.llama import RMSNorm  # noqa: E402
from kvtriton.backend.models.rotary import RotaryEmbedding, apply_rotary  # noqa: E402

from tests.tiny_model import decode_step_both_ways, small_decode_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 is what the GPU runs; Triton's CPU interpreter gets tl.dot wrong in bf16, so it checks fp16.
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


FP8_POOLS = pytest.param(torch.float8_e4m3fn, marks=pytest.mark.skipif(
    DEVICE != "cuda" or torch.cuda.get_device_capability() < (8, 9), reason="fp8 pools: CUDA 8.9+"), id="fp8-pools")


def close(a, b, atol=2e-2, rtol=2e-2):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


def same_pools(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("n,k", [(96, 64), (200, 320)])
def test_linear_with_bias_and_residual(m, n, k):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) / k**0.5
    bias, res = torch.randn(n, generator=g), torch.randn(m, n, generator=g)
    x, w, bias, res = (t.to(DEVICE, DTYPE) for t in (x, w, bias, res))
    close(skinny_matmul.linear(x, w), torch.nn.functional.linear(x, w))
    close(skinny_matmul.linear(x, w, bias=bias, residual=res), res + torch.nn.functional.linear(x, w, bias))


@pytest.mark.parametrize("m", [1, 2, 4])
def test_rms_norm_linear_and_swiglu(m):
    k, n = 128, 160
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(k, 1e-5)
    norm.weight.data = 1 + 0.1 * torch.randn(k, generator=g)
    norm = norm.to(DEVICE, DTYPE)
    x = (3 * torch.randn(m, k, generator=g)).to(DEVICE, DTYPE)
    w = (torch.randn(2 * n, k, generator=g) / k**0.5).to(DEVICE, DTYPE)
    close(skinny_matmul.rms_norm_linear(x, norm.weight, 1e-5, w), torch.nn.functional.linear(norm(x), w))
    logits = skinny_matmul.rms_norm_linear(x, norm.weight, 1e-5, w, out_dtype=torch.float32)
    assert logits.dtype == torch.float32
    close(logits, torch.nn.functional.linear(norm(x), w).float())
    gate, up = torch.nn.functional.linear(norm(x), w).split(n, dim=-1)
    # A product of two rounded matmul outputs: a few bf16 ulps apart when the summation order differs.
    close(skinny_matmul.rms_norm_swiglu(x, norm.weight, 1e-5, w), torch.nn.functional.silu(gate) * up, rtol=5e-2)


def test_too_many_rows_is_refused():
    x = torch.zeros(skinny_matmul.MAX_ROWS + 1, 64, device=DEVICE, dtype=DTYPE)
    with pytest.raises(ValueError, match="at most"):
        skinny_matmul.linear(x, torch.zeros(64, 64, device=DEVICE, dtype=DTYPE))


@pytest.mark.parametrize("kv_dtype", [DTYPE, FP8_POOLS])
@pytest.mark.parametrize("rope,num_splits", [(True, None), (False, 1), (True, 3)])
def test_paged_decode_attention_matches_torch_path(rope, num_splits, kv_dtype):
    """num_splits: the context split across programs (flash-decoding) and merged, or whole in one program;
    None: the launch's default for this batch and width. 3 splits of 300 tokens: the last chunk short; of
    70 tokens: later splits idle; of 1 token: only the new token, in split 0. fp8 pools: the kernel stores the
    new token's k/v as the PyTorch path's write does (saturated: one value past e4m3's range) and reads widened."""
    heads, kv_heads, dim, bs, blocks = 8, 2, 64, 16, 80
    context_lens = [1, 17, 70, 300]  # one token, a partial block, several BLOCK_T tiles
    g = torch.Generator().manual_seed(2)
    pools = KVCache.allocate(1, blocks, bs, kv_heads, dim, kv_dtype, DEVICE)
    for p in (pools.k[0], pools.v[0]):
        p.copy_(torch.randn(p.shape, generator=g).to(DTYPE))
    b = len(context_lens)
    perm = torch.randperm(blocks, generator=g)
    width = max(-(-c // bs) for c in context_lens)
    tables = perm[: b * width].view(b, width).to(DEVICE)  # scattered, disjoint blocks
    ctx = torch.tensor(context_lens, device=DEVICE)
    slots = torch.stack([tables[i, (c - 1) // bs] * bs + (c - 1) % bs for i, c in enumerate(context_lens)])
    q = torch.randn(b, heads, dim, generator=g).to(DEVICE, DTYPE)
    k = torch.randn(b, kv_heads, dim, generator=g).to(DEVICE, DTYPE)
    v = torch.randn(b, kv_heads, dim, generator=g).to(DEVICE, DTYPE)
    v[1, 0, 5] = 1000.0
    rotary = RotaryEmbedding(dim, 512, 10000.0, None).to(DEVICE)
    cos, sin = rotary(ctx - 1)
    positions = ctx - 1

    reference = KVCache([pools.k[0].clone()], [pools.v[0].clone()])
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=ctx, num_decodes=b,
                             query_lens=[1] * b, context_lens_host=context_lens, decode_context_blocks=width,
                             decode_only=True)
    q_ref, k_ref = apply_rotary(q, k, (cos, sin)) if rope else (q, k)
    expected = PagedAttention(reference, meta, dim**-0.5).attend(0, q_ref, k_ref, v)

    got = paged_decode_attention(q, k, v, pools.k[0], pools.v[0], slots, tables, ctx, dim**-0.5,
                                 rotary=(rotary.cos, rotary.sin, positions) if rope else None,
                                 num_splits=num_splits)
    close(got, expected)
    assert same_pools(pools.k[0], reference.k[0]) and same_pools(pools.v[0], reference.v[0])


FP8_POOLS_OR_INTERPRETED = pytest.mark.skipif(
    DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9), reason="fp8 pools: CUDA 8.9+")


@FP8_POOLS_OR_INTERPRETED
@pytest.mark.parametrize("num_splits", [1, 3])
def test_e4m3_widened_in_registers_reads_what_a_plain_widening_reads(num_splits, monkeypatch):
    """E4M3_WIDEN_IN_REGISTERS loads an fp8 pool as 16-bit pairs and widens them itself (inline PTX on CUDA, a
    bitcast a byte under the interpreter); the output equals the form that lets Triton widen at the dot operands."""
    heads, kv_heads, dim, bs, blocks = 8, 2, 64, 16, 80
    context_lens = [1, 17, 70, 300]
    g = torch.Generator().manual_seed(3)
    pools = KVCache.allocate(1, blocks, bs, kv_heads, dim, torch.float8_e4m3fn, DEVICE)
    for p in (pools.k[0], pools.v[0]):
        p.copy_(torch.randn(p.shape, generator=g).to(DTYPE))
    b, width = len(context_lens), max(-(-c // bs) for c in context_lens)
    tables = torch.randperm(blocks, generator=g)[: b * width].view(b, width).to(DEVICE)
    ctx = torch.tensor(context_lens, device=DEVICE)
    slots = torch.stack([tables[i, (c - 1) // bs] * bs + (c - 1) % bs for i, c in enumerate(context_lens)])
    q, k, v = (torch.randn(b, n, dim, generator=g).to(DEVICE, DTYPE) for n in (heads, kv_heads, kv_heads))
    outputs = []
    for in_registers in (True, False):
        monkeypatch.setattr(paged_decode_attention_module, "E4M3_WIDEN_IN_REGISTERS", in_registers)
        k_pool, v_pool = pools.k[0].clone(), pools.v[0].clone()
        outputs.append(paged_decode_attention(q, k, v, k_pool, v_pool, slots, tables, ctx, dim**-0.5,
                                              num_splits=num_splits))
    close(outputs[0], outputs[1], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("kv_dtype", [DTYPE, FP8_POOLS])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 2)])  # GQA groups of 4 and of 3 (padded to 4)
def test_varlen_prefill_attention_matches_torch_path(heads, kv_heads, kv_dtype):
    """A mixed step: two decodes, a fresh prompt, two chunked-prefill continuations (one over several whole
    key tiles of cached prefix). The varlen kernel's output equals the PyTorch path's on the same step."""
    dim, bs, blocks = 64, 16, 48
    query_lens, context_lens = [1, 1, 37, 30, 20], [1, 40, 37, 80, 150]
    g = torch.Generator().manual_seed(4)
    pools = KVCache.allocate(1, blocks, bs, kv_heads, dim, kv_dtype, DEVICE)
    for p in (pools.k[0], pools.v[0]):
        p.copy_(torch.randn(p.shape, generator=g).to(DTYPE))
    width = max(-(-c // bs) for c in context_lens)
    tables = torch.zeros(len(context_lens), width, dtype=torch.int64)
    free = torch.randperm(blocks, generator=g).tolist()
    for i, c in enumerate(context_lens):
        tables[i, : -(-c // bs)] = torch.tensor([free.pop() for _ in range(-(-c // bs))])
    tables = tables.to(DEVICE)
    slots = torch.cat([tables[i, torch.arange(c - n, c) // bs] * bs + torch.arange(c - n, c).to(DEVICE) % bs
                       for i, (n, c) in enumerate(zip(query_lens, context_lens))])
    n = sum(query_lens)
    q = torch.randn(n, heads, dim, generator=g).to(DEVICE, DTYPE)
    k = torch.randn(n, kv_heads, dim, generator=g).to(DEVICE, DTYPE)
    v = torch.randn(n, kv_heads, dim, generator=g).to(DEVICE, DTYPE)
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=torch.tensor(context_lens,
                             device=DEVICE), num_decodes=2, query_lens=query_lens, context_lens_host=context_lens,
                             decode_context_blocks=-(-40 // bs))
    reference = KVCache([pools.k[0].clone()], [pools.v[0].clone()])
    expected = PagedAttention(reference, meta, dim**-0.5).attend(0, q, k, v)

    got = PagedAttention(pools, meta, dim**-0.5, varlen_kernel=True).attend(0, q, k, v)
    close(got, expected)
    assert same_pools(pools.k[0], reference.k[0]) and same_pools(pools.v[0], reference.v[0])
    # Small tiles: many query tiles per sequence, and unmasked key tiles before the diagonal ones.
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], device=DEVICE)
    small = paged_prefill_attention(q, pools.k[0], pools.v[0], tables, starts, meta.context_lens, dim**-0.5,
                                    rows=16, block_n=16)
    close(small, expected)


def test_varlen_prefill_tiles_find_their_sequence_among_many_and_empty_ones():
    """The grid numbers query tiles across the step: with more sequences than a program reads at once
    (SEQS_PER_PASS), and sequences with no tokens between them (a CUDA graph's padding), every tile still finds
    its own sequence: the output equals each sequence attended alone."""
    from kvtriton.backend.kernels.paged_prefill_attention import SEQS_PER_PASS

    dim, bs, heads, kv_heads = 32, 16, 4, 2
    query_lens = [0 if i % 7 == 3 else 1 + (5 * i) % 23 for i in range(SEQS_PER_PASS + 6)]
    query_lens[-1] = 0  # trailing padding sequences, as a graph bucket has
    context_lens = [q + (3 * i) % 11 if q else 0 for i, q in enumerate(query_lens)]
    g = torch.Generator().manual_seed(5)
    widths = [-(-c // bs) for c in context_lens]
    pools = KVCache.allocate(1, sum(widths) + 1, bs, kv_heads, dim, DTYPE, DEVICE)
    for pool in (pools.k[0], pools.v[0]):
        pool.copy_(torch.randn(pool.shape, generator=g).to(DTYPE))
    tables = torch.zeros(len(query_lens), max(widths), dtype=torch.int64)
    used = 1
    for i, w in enumerate(widths):
        tables[i, :w] = torch.arange(used, used + w)
        used += w
    n = sum(query_lens)
    q = torch.randn(n, heads, dim, generator=g).to(DEVICE, DTYPE)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()])
    got = paged_prefill_attention(q, pools.k[0], pools.v[0], tables.to(DEVICE), starts.to(DEVICE),
                                  torch.tensor(context_lens, device=DEVICE), dim**-0.5, rows=16, block_n=16)
    for i, (qlen, ctx) in enumerate(zip(query_lens, context_lens)):
        if not qlen:
            continue
        rows = slice(starts[i].item(), starts[i + 1].item())
        alone = paged_prefill_attention(q[rows], pools.k[0], pools.v[0], tables[i : i + 1].to(DEVICE),
                                        torch.tensor([0, qlen], device=DEVICE), torch.tensor([ctx], device=DEVICE),
                                        dim**-0.5, rows=16, block_n=16)
        torch.testing.assert_close(got[rows], alone, atol=0, rtol=0)


@pytest.mark.parametrize("batch", [1, 2, 3])  # 3 > FUSED_MAX_BATCH: cuBLAS matmuls, kernel attention
@pytest.mark.parametrize("form", ["llama", "qkv-bias", "qk-norm"])  # Qwen2's qkv bias, Qwen3's QK-norm
def test_decode_logits_match_the_model_forward(batch, form):
    model = small_decode_model(DTYPE, DEVICE, qkv_bias=form == "qkv-bias", qk_norm=form == "qk-norm")
    got, expected, cache, reference = decode_step_both_ways(model, [5 + 9 * i for i in range(batch)], blocks_per_seq=4)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    close(got, expected, atol=5e-2, rtol=5e-2)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    close(cache.k[1], reference.k[1])


def uniform_step(query_lens, context_lens, width, bs, tables, scratch_slot):
    """The packed step's slots, and its (B, Q) layout: each packed token's row, and every row's slot (padding
    rows in the scratch slot)."""
    from kvtriton.backend.attention.uniform import uniform_rows

    slots = torch.cat([tables[i, torch.arange(c - n, c) // bs] * bs + torch.arange(c - n, c) % bs
                       for i, (n, c) in enumerate(zip(query_lens, context_lens))])
    rows = torch.from_numpy(uniform_rows(query_lens, width))
    padded_slots = torch.full((len(query_lens) * width,), scratch_slot, dtype=torch.int64)
    padded_slots[rows] = slots
    return slots.to(DEVICE), rows.to(DEVICE), padded_slots.to(DEVICE)


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (6, 2)])
@pytest.mark.parametrize("width", [5, 17])  # 17 = 1 + MAX_SPECULATIVE_TOKENS: two query tiles per sequence
def test_uniform_attention_matches_torch_path(heads, kv_heads, width):
    """A verify step in the CUDA-graph layout: Q rows per sequence, its new tokens first, padding after; a
    plain decode (1 row), verifies of several lengths, a padding sequence (1 token in the scratch block).
    Real rows equal the PyTorch path on the packed step, padding rows are zeros."""
    from kvtriton.backend.attention.uniform import UniformQueryAttention

    dim, bs, blocks = 64, 16, 40
    query_lens, context_lens = [1, width, 3, 1], [40, 70, 150, 1]
    g = torch.Generator().manual_seed(5)
    pools = KVCache.allocate(1, blocks + 1, bs, kv_heads, dim, DTYPE, DEVICE)
    for p in (pools.k[0], pools.v[0]):
        p.copy_(torch.randn(p.shape, generator=g).to(DTYPE))
    width_blocks = max(-(-c // bs) for c in context_lens)
    tables = torch.full((len(context_lens), width_blocks), blocks, dtype=torch.int64)  # the scratch block
    free = torch.randperm(blocks, generator=g).tolist()
    for i, c in enumerate(context_lens[:-1]):
        tables[i, : -(-c // bs)] = torch.tensor([free.pop() for _ in range(-(-c // bs))])
    slots, rows, padded_slots = uniform_step(query_lens, context_lens, width, bs, tables, blocks * bs)
    tables = tables.to(DEVICE)
    n = sum(query_lens)
    q = torch.randn(n, heads, dim, generator=g).to(DEVICE, DTYPE)
    k = torch.randn(n, kv_heads, dim, generator=g).to(DEVICE, DTYPE)
    v = torch.randn(n, kv_heads, dim, generator=g).to(DEVICE, DTYPE)
    ctx = torch.tensor(context_lens, device=DEVICE)
    meta = AttentionMetadata(slot_mapping=slots, block_tables=tables, context_lens=ctx, num_decodes=1,
                             query_lens=query_lens, context_lens_host=context_lens, decode_context_blocks=3)
    reference = KVCache([pools.k[0].clone()], [pools.v[0].clone()])
    expected = PagedAttention(reference, meta, dim**-0.5).attend(0, q, k, v)

    def padded(x):  # (N, ...) -> (B * Q, ...), garbage in the padding rows (as a graph's buffers hold)
        out = torch.randn(len(query_lens) * width, *x.shape[1:], generator=g).to(DEVICE, DTYPE)
        out[rows] = x
        return out

    attn = UniformQueryAttention(pools, padded_slots, tables, torch.tensor(query_lens, device=DEVICE), ctx, dim**-0.5)
    got = attn.attend(0, padded(q), padded(k), padded(v))
    real_rows = n - 1  # the last sequence is padding: its token shares the scratch slot with the padding rows
    close(got[rows[:real_rows]], expected[:real_rows])
    pad = torch.ones(len(got), dtype=torch.bool, device=DEVICE)
    pad[rows] = False
    assert torch.count_nonzero(got[pad]) == 0
    real = torch.ones(pools.k[0].shape[0], dtype=torch.bool)
    real[blocks] = False  # everything but the scratch block holds what the packed step wrote
    assert torch.equal(pools.k[0][real], reference.k[0][real]) and torch.equal(pools.v[0][real], reference.v[0][real])


def test_uniform_step_logits_match_the_model_forward():
    """The verify graph's computation (runners/torch_runner.py captures it): the model over the (B, Q) layout
    with UniformQueryAttention gives, at the packed step's rows, the logits of the eager packed step."""
    from kvtriton.backend.attention.uniform import UniformQueryAttention
    from kvtriton.backend.models.loader import load_model
    from kvtriton.backend.models.model_config import ModelConfig

    cfg = ModelConfig.from_dict(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=300, hidden_size=256,
        intermediate_size=384, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True))
    torch.manual_seed(6)
    model = load_model(None, dtype=DTYPE, device=DEVICE, config=cfg, dummy=True)
    bs, per_seq, width = 16, 4, 5
    lens = [9, 30, 21]  # prompt lengths; then a decode (1 token), a verify of 5 and one of 3
    query_lens = [1, 5, 3]
    batch = len(lens) + 1  # and a padding sequence, as a bucket of 4 has
    cache = KVCache.allocate(2, batch * per_seq + 1, bs, 2, 64, DTYPE, DEVICE)
    scratch = batch * per_seq
    tables = torch.arange(batch * per_seq).view(batch, per_seq)
    tables[-1] = scratch
    tokens = [torch.randint(0, 300, (n + q,), device=DEVICE) for n, q in zip(lens, query_lens)]
    with torch.inference_mode():
        for i, n in enumerate(lens):  # prefill each prompt with the PyTorch path
            meta = AttentionMetadata(slot_mapping=(tables[i, 0] * bs + torch.arange(n)).to(DEVICE),
                                     block_tables=tables[i : i + 1].to(DEVICE),
                                     context_lens=torch.tensor([n], device=DEVICE), num_decodes=0, query_lens=[n],
                                     context_lens_host=[n], decode_context_blocks=0)
            model(tokens[i][:n], torch.arange(n, device=DEVICE), PagedAttention(cache, meta, 64**-0.5))
        context_lens = [n + q for n, q in zip(lens, query_lens)]
        slots, rows, padded_slots = uniform_step(query_lens + [1], context_lens + [1], width, bs, tables, scratch * bs)
        rows = rows[: sum(query_lens)]
        slots = slots[: sum(query_lens)]
        tables = tables.to(DEVICE)
        ids = torch.cat([t[n:] for t, n in zip(tokens, lens)])
        pos = torch.cat([torch.arange(n, n + q) for n, q in zip(lens, query_lens)]).to(DEVICE)
        reference = KVCache([t.clone() for t in cache.k], [t.clone() for t in cache.v])
        meta = AttentionMetadata(slot_mapping=slots, block_tables=tables[:-1],
                                 context_lens=torch.tensor(context_lens, device=DEVICE), num_decodes=1,
                                 query_lens=query_lens, context_lens_host=context_lens, decode_context_blocks=per_seq)
        expected = model.compute_logits(model(ids, pos, PagedAttention(reference, meta, 64**-0.5)))

        padded_ids = torch.zeros(batch * width, dtype=torch.int64, device=DEVICE)
        padded_pos = torch.zeros(batch * width, dtype=torch.int64, device=DEVICE)
        padded_ids[rows], padded_pos[rows] = ids, pos
        attn = UniformQueryAttention(cache, padded_slots, tables, torch.tensor(query_lens + [1], device=DEVICE),
                                     torch.tensor(context_lens + [1], device=DEVICE), 64**-0.5)
        got = model.compute_logits(model(padded_ids, padded_pos, attn))[rows]
    close(got, expected, atol=5e-2, rtol=5e-2)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    close(cache.k[1][:scratch], reference.k[1][:scratch])
