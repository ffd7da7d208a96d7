"""The CPU's in-place decode attention (attention/cpu_decode.py) computes what the gather + SDPA decode attention
does, and its compiled form serves the eager steps' shapes without a compile after its warm-up."""

from __future__ import annotations

import pytest
import torch

from kvtriton.backend.attention.cpu_decode import CompiledDecodeAttention, decode_attention_in_place
from kvtriton.backend.attention.paged import decode_attention, decode_mask

BS, HKV, H, D = 4, 2, 6, 8  # grouped-query: 3 query heads per KV head


def pools(dtype=torch.float32, blocks=12):
    torch.manual_seed(0)
    return torch.randn(blocks, BS, HKV, D, dtype=dtype), torch.randn(blocks, BS, HKV, D, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_equals_gather_and_sdpa(dtype):
    k_pool, v_pool = pools(dtype)
    tables = torch.tensor([[3, 7, 1], [0, 2, 2], [9, 4, 5]])  # row 1's context ends in its 2nd block
    context_lens = torch.tensor([11, 6, 12])
    mask = decode_mask(context_lens, tables.shape[1] * BS)
    q = torch.randn(3, H, D, dtype=dtype)
    out = decode_attention_in_place(q, k_pool, v_pool, tables, mask, 0.3)
    ref = decode_attention(q, k_pool, v_pool, tables, mask, 0.3)
    assert out.dtype == dtype and out.shape == (3, H, D)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_compiled_serves_eager_shapes_after_warm_up():
    torch._dynamo.reset()
    k_pool, v_pool = pools()
    attention = CompiledDecodeAttention()
    for batch in (1, 2):  # as the compiled decode's warm-up does
        attention.warm_up(batch, H, k_pool.dtype, k_pool, v_pool, 0.3)
    wide = torch.tensor([[3, 7, 1, 0, 0], [0, 2, 6, 8, 0], [9, 4, 5, 10, 11]])
    for batch, width in ((1, 3), (3, 5), (2, 4)):
        tables = wide[:batch, :width]  # a column slice, as a mixed step's decode rows pass it
        with torch.inference_mode():  # as the runner's steps make q and the mask
            mask = decode_mask(torch.full((batch,), width * BS - 1), width * BS)
            q = torch.randn(batch, H, D)
            out = attention(q, k_pool, v_pool, tables, mask, 0.3)
        torch.testing.assert_close(out, decode_attention(q, k_pool, v_pool, tables, mask, 0.3), atol=1e-5, rtol=1e-5)
    assert attention.eager_calls == 0
