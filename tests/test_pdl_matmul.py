"""kernels/pdl_matmul.py: the decode qkv matmul that lets the attention kernel launch early computes x @ W^T (+ bias)
as cuBLAS does, to fp32 summation order, at every decode row count; other row counts stay with cuBLAS. Runs on a
GPU, or on the CPU under Triton's interpreter (TRITON_INTERPRET=1 with triton installed), otherwise skips."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU)", allow_module_level=True)

from kvtriton.backend.kernels.pdl_matmul import pdl_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows", [3, 16, 33, 64, 65])
@pytest.mark.parametrize("n,k,bias", [(96, 128, False), (80, 192, True)])
def test_pdl_linear_is_the_linear_layer(rows, n, k, bias):
    g = torch.Generator(device=DEVICE).manual_seed(rows + n)
    x = torch.randn(rows, k, generator=g, device=DEVICE).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g, device=DEVICE) * k**-0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=g, device=DEVICE).to(torch.bfloat16) if bias else None
    got = pdl_linear(x, w, b)
    expected = (x.float() @ w.float().T + (b.float() if bias else 0)).to(torch.bfloat16)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("split_k", [2, 4])
def test_split_k_tiles_sum_to_the_product_with_the_bias_once(split_k):
    """A tile split along K (a narrow projection's programs fill the SMs) adds its fp32 partial sums in
    kernels/split_k.py's add_planes; the bias belongs to split 0's partial only."""
    from kvtriton.backend.kernels.pdl_matmul import pdl_matmul_with
    from kvtriton.backend.kernels.tile_config import Tile

    g = torch.Generator(device=DEVICE).manual_seed(split_k)
    x = torch.randn(20, 256, generator=g, device=DEVICE).to(torch.bfloat16)
    w = (torch.randn(96, 256, generator=g, device=DEVICE) / 16).to(torch.bfloat16)
    b = torch.randn(96, generator=g, device=DEVICE).to(torch.bfloat16)
    got = pdl_matmul_with(x, w, b, Tile(32, 32, 64, split_k, 4, True, 3))
    expected = (x.float() @ w.float().T + b.float()).to(torch.bfloat16)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [3, 16, 64, 65])
def test_the_swiglu_epilogue_is_the_mlp_s_swiglu(rows):
    """pdl_swiglu_linear: gate_up's product rounded as its output would be (pdl_linear's, the same tiles along K),
    then silu(gate) * up in fp32, as the compiled MLP computes it from that output; above MAX_ROWS (cuBLAS, then
    the SwiGLU) the same."""
    from kvtriton.backend.kernels.pdl_matmul import pdl_linear, pdl_swiglu_linear

    g = torch.Generator(device=DEVICE).manual_seed(rows)
    x = torch.randn(rows, 256, generator=g, device=DEVICE).to(torch.bfloat16)
    w = (torch.randn(2 * 96, 256, generator=g, device=DEVICE) / 16).to(torch.bfloat16)
    gate, up = pdl_linear(x, w, None).float().chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = pdl_swiglu_linear(x, w)
    assert got.shape == (rows, 96) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=8e-3, atol=1e-3)  # one rounding to bf16 (2^-8)


@pytest.mark.skipif(DEVICE != "cuda", reason="the MLP takes a swiglu_matmul on CUDA only")
@pytest.mark.parametrize("rows", [4, 8, 9, 16, 24, 40, 64])
def test_a_chained_mlp_computes_the_mlp(rows):
    """The CUDA runner's CHAIN (runners/decode_chain.py): gate_up ending in the SwiGLU and down
    on this kernel from CHAIN_MIN_ROWS rows (cuBLAS and _swiglu below), against the plain MLP."""
    from types import SimpleNamespace

    from kvtriton.backend.kernels import pdl_matmul
    from kvtriton.backend.models.llama import LlamaMLP

    torch.manual_seed(rows)
    mlp = LlamaMLP(SimpleNamespace(hidden_size=256, intermediate_size=512)).to(DEVICE, torch.bfloat16)
    x = torch.randn(rows, 256, device=DEVICE).to(torch.bfloat16)
    expected = mlp(x)
    mlp.gate_up_proj.swiglu_matmul = pdl_matmul.chain_swiglu_linear
    mlp.down_proj.decode_matmul = pdl_matmul.chain_linear
    torch.testing.assert_close(mlp(x).float(), expected.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="the 1B-class shapes are too slow for Triton's interpreter")
@pytest.mark.parametrize("key", sorted(__import__("kvtriton.backend.kernels.pdl_matmul", fromlist=["TILES"]).TILES))
def test_every_measured_tile_computes_its_product(key):
    """Each TILES entry (the swept tiles, split-K ones included) at its own shape and a row count of its bucket; the
    16-row ones also at 4 rows, which take them below 16 (tile_for)."""
    from kvtriton.backend.kernels.pdl_matmul import TILES, pdl_swiglu_linear

    form, bucket, n, k = key
    for rows in [bucket - 3] + ([4] if bucket == 16 else []):  # partial row tiles
        g = torch.Generator(device=DEVICE).manual_seed(bucket + n + k + rows)
        x = torch.randn(rows, k, generator=g, device=DEVICE).to(torch.bfloat16)
        w = (torch.randn(2 * n if form == "bf16-swiglu" else n, k, generator=g, device=DEVICE) * k**-0.5).to(
            torch.bfloat16)
        product = (x.float() @ w.float().T).to(torch.bfloat16).float()
        if form == "bf16-swiglu":
            gate, up = product.chunk(2, dim=-1)
            got, expected = pdl_swiglu_linear(x, w), torch.nn.functional.silu(gate) * up
        else:
            got, expected = pdl_linear(x, w, None), product
        assert got.shape == (rows, n), TILES[key]
        torch.testing.assert_close(got.float(), expected, rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("rows", [2, 16, 40, 65])
@pytest.mark.parametrize("split_k", [1, 2])
def test_planes_add_up_to_the_product_pdl_linear_returns(rows, split_k, monkeypatch):
    """pdl_linear_planes (kernels/pdl_matmul.py PLANES_INTO_NORM): 4 planes whatever the tile's split (the rest
    zeros; cuBLAS's product in plane 0 outside 3-64 rows), and added in plane order, rounded once (models/llama.py
    planes_sum), the bits pdl_linear's own split-K add gives."""
    from kvtriton.backend.kernels import pdl_matmul
    from kvtriton.backend.kernels.tile_config import Tile, rows_bucket
    from kvtriton.backend.models.llama import planes_sum

    n, k = 48, 256
    monkeypatch.setitem(pdl_matmul.TILES, ("bf16", rows_bucket(rows), n, k), tuple(Tile(64, 16, 64, split_k)))
    g = torch.Generator(device=DEVICE).manual_seed(rows + split_k)
    x = torch.randn(rows, k, generator=g, device=DEVICE).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g, device=DEVICE) * k**-0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=g, device=DEVICE).to(torch.bfloat16)
    planes = pdl_matmul.pdl_linear_planes(x, w, b, 3, 4)
    assert planes.shape == (4, rows, n) and planes.dtype == torch.float32
    used = split_k if 3 <= rows <= 64 else 1
    assert not planes[used:].any()
    got, expected = planes_sum(planes, torch.bfloat16), pdl_linear(x, w, b)
    if DEVICE == "cuda":
        assert torch.equal(got, expected)
    else:  # Triton's interpreter rounds fp32 -> bf16 in a kernel other than torch does: at most a unit apart
        torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-6)


def test_a_compiled_step_adds_the_planes_as_the_split_k_add_does(monkeypatch):
    """kernels/pdl_matmul.py PLANES_INTO_NORM as the CUDA runner sets it up (decode_planes on o_proj and down_proj,
    the model's delta_planes): the compiled layers add the split-K partial sums in the residual add + RMSNorm, and
    the step's logits are the ones of the same projections with their _add_planes launch."""
    from kvtriton.backend.kernels import pdl_matmul
    from kvtriton.backend.kernels.tile_config import Tile

    from tests.llama_reference import prefill_logits
    from tests.tiny_model import small_decode_model

    monkeypatch.setattr(pdl_matmul, "PLANES_MIN_ROWS", 9)  # the 16-row step below hands on planes
    model = small_decode_model(torch.bfloat16, DEVICE)
    for n, k in ((256, 256), (256, 384)):  # o_proj, down_proj: split along K in two
        monkeypatch.setitem(pdl_matmul.TILES, ("bf16", 16, n, k), tuple(Tile(16, 64, 64, 2)))
    narrow = [proj for layer in model.layers for proj in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    for proj in narrow:
        proj.decode_matmul = pdl_matmul.chain_linear
    model.compile_layers()
    prompts = [[5, 9, 3, 77, 12, 1, 8], [40, 2, 6, 6, 19], [7, 8, 9, 10]]  # 16 rows
    added = prefill_logits(model, prompts)
    for proj in narrow:
        proj.decode_planes = pdl_matmul.chain_linear_planes
    model.delta_planes = (9, 64, pdl_matmul.planes_for(256, 384, 9))
    assert model.delta_planes[2] == 2
    launches = []
    matmul = pdl_matmul.pdl_matmul_with
    monkeypatch.setattr(pdl_matmul, "pdl_matmul_with", lambda *a, **kw: launches.append(kw) or matmul(*a, **kw))
    for want, got in zip(added, prefill_logits(model, prompts)):
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert [kw.get("planes") for kw in launches].count(2) == 2 * len(model.layers)  # o_proj's and down_proj's
