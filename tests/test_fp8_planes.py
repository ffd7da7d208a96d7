"""kernels/fp8_matmul.py PLANES_INTO_NORM: fp8 down projections hand their split-K partial sums to the compiled
residual add + RMSNorm after them, which adds them as split_k's add launch would. Runs on a GPU, or on the CPU
under Triton's interpreter (TRITON_INTERPRET=1 with triton installed), otherwise skips."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on the CPU)", allow_module_level=True)

from kvtriton.backend.kernels import fp8_matmul  # noqa: E402
from kvtriton.backend.kernels.fp8_quant import silu_mul_per_token_fp8  # noqa: E402
from kvtriton.backend.kernels.tile_config import Tile, rows_bucket  # noqa: E402
from kvtriton.backend.models.fp8 import Fp8Linear, fp8_supported, per_token_fp8_reference  # noqa: E402
from kvtriton.backend.models.llama import LlamaMLP, planes_sum  # noqa: E402
from kvtriton.backend.runners.decode_chain import fp8_down_projections_hand_on_planes  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float16  # the interpreter's 16-bit tl.dot is right in fp16 only
pytestmark = [
    pytest.mark.skipif(CUDA and torch.cuda.get_device_capability() < (8, 9), reason="fp8: compute capability 8.9+"),
    pytest.mark.skipif(not CUDA and fp8_supported(torch.device("cpu")) is not None, reason="no CPU fp8 _scaled_mm"),
]


def fp8_layer(n: int, k: int, seed: int) -> Fp8Linear:
    linear = torch.nn.Linear(k, n, bias=False)
    linear.weight.data = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    return with_kernels(Fp8Linear.from_linear(linear).to(DEVICE))


def with_kernels(layer: Fp8Linear) -> Fp8Linear:
    """A CPU layer has no Triton kernels of its own; under the interpreter it may take them."""
    if not CUDA:
        layer._quantize_swiglu, layer._matmul = silu_mul_per_token_fp8, fp8_matmul.fp8_matmul
        layer._matmul_planes = fp8_matmul.fp8_matmul_planes
    return layer


@pytest.mark.parametrize("rows", [5, 16, 40, 70])
@pytest.mark.parametrize("split_k", [1, 2])
def test_planes_add_up_to_the_product_fp8_matmul_returns(rows, split_k, monkeypatch):
    """4 planes whatever the tile's split (the rest zeros; cuBLASLt's product in plane 0 past 64 rows)."""
    n, k = 48, 256
    monkeypatch.setitem(fp8_matmul.TILES, ("fp8", rows_bucket(rows), n, k), tuple(Tile(64, 16, 64, split_k, 4, True)))
    layer = fp8_layer(n, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(split_k)).to(DEVICE, DTYPE)
    xq, x_scale = per_token_fp8_reference(x)
    planes = fp8_matmul.fp8_matmul_planes(xq, x_scale, layer.weight, layer.weight_scale, 4)
    assert planes.shape == (4, rows, n) and planes.dtype == torch.float32
    assert not planes[split_k if rows <= fp8_matmul.MAX_ROWS else 1:].any()
    expected = fp8_matmul.fp8_matmul(xq, x_scale, layer.weight, layer.weight_scale, torch.float32)
    torch.testing.assert_close(planes.sum(0), expected, rtol=1e-5, atol=1e-5)


def test_an_fp8_mlp_hands_on_its_down_projections_planes_where_asked():
    mlp = LlamaMLP(SimpleNamespace(hidden_size=128, intermediate_size=256))
    mlp.gate_up_proj, mlp.down_proj = fp8_layer(512, 128, seed=1), fp8_layer(128, 256, seed=2)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(3)).to(DEVICE, DTYPE)
    whole = mlp(x)
    assert mlp(x, planes=True).shape == whole.shape  # planes 0: the product whole
    mlp.down_proj.planes = 4
    planes = mlp(x, planes=True)
    assert planes.shape == (4, 40, 128) and planes.dtype == torch.float32
    torch.testing.assert_close(planes_sum(planes, DTYPE).float(), whole.float(), rtol=2e-2, atol=2e-2)


def test_the_runner_sets_the_planes_up_only_where_asked_and_down_proj_splits(monkeypatch):
    from tests.tiny_model import small_decode_model

    model = small_decode_model(DTYPE, DEVICE, quantization="fp8")
    for layer in model.layers:
        with_kernels(layer.mlp.down_proj)
    monkeypatch.setitem(fp8_matmul.TILES, ("fp8", 64, 256, 384), tuple(Tile(64, 32, 64, 2, 4, True)))
    fp8_down_projections_hand_on_planes(model)  # PLANES_INTO_NORM off
    assert model.delta_planes is None and model.layers[0].mlp.down_proj.planes == 0
    monkeypatch.setattr(fp8_matmul, "PLANES_INTO_NORM", True)
    fp8_down_projections_hand_on_planes(model)
    assert model.delta_planes == (fp8_matmul.PLANES_MIN_ROWS, 64, 2)
    assert [layer.mlp.down_proj.planes for layer in model.layers] == [2, 2]


def test_a_compiled_fp8_step_adds_the_planes_as_the_split_k_add_does(monkeypatch):
    """As the CUDA runner sets it up: the compiled layers add down_proj's partial sums in the next layer's residual
    add + RMSNorm (the last layer's in the final norm), and the logits are those of the split-K add launch."""
    from tests.llama_reference import prefill_logits
    from tests.tiny_model import small_decode_model

    monkeypatch.setattr(fp8_matmul, "PLANES_INTO_NORM", True)
    monkeypatch.setattr(fp8_matmul, "PLANES_MIN_ROWS", 9)  # the 16-row step below hands on planes
    monkeypatch.setitem(fp8_matmul.TILES, ("fp8", 16, 256, 384), tuple(Tile(16, 32, 64, 2, 4, True)))  # down_proj
    model = small_decode_model(DTYPE, DEVICE, quantization="fp8")
    for layer in model.layers:
        for proj in (layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            with_kernels(proj)
    model.compile_layers()
    prompts = [[5, 9, 3, 77, 12, 1, 8], [40, 2, 6, 6, 19], [7, 8, 9, 10]]  # 16 rows
    added = prefill_logits(model, prompts)
    fp8_down_projections_hand_on_planes(model)
    assert model.delta_planes == (9, 64, 2)
    launches = []
    matmul = fp8_matmul.fp8_matmul_with
    monkeypatch.setattr(fp8_matmul, "fp8_matmul_with", lambda *a, **kw: launches.append(kw) or matmul(*a, **kw))
    for want, got in zip(added, prefill_logits(model, prompts)):  # a residual a unit apart may move an e4m3 code
        torch.testing.assert_close(got, want, atol=6e-2, rtol=6e-2)
    assert [kw.get("planes") for kw in launches].count(2) == len(model.layers)  # each layer's down_proj
