"""kernels/l2_prefetch.py: which decode matmul launches ask for their weights in L2, in how many ranges a row.
The instruction itself compiles in tests/test_kernels_compile.py and runs in the GPU kernel tests."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kvtriton.backend.kernels import l2_prefetch  # noqa: E402
from kvtriton.backend.kernels.tile_config import Tile  # noqa: E402

QKV_TILE = Tile(64, 32, 128, 1, 4, True, 4)
DOWN_TILE = Tile(64, 64, 128, 8, 4, True, 3)
GPU = torch.device("cuda", 0)


@pytest.fixture
def on_hopper(monkeypatch):
    monkeypatch.setattr(l2_prefetch, "ENABLED", True)
    monkeypatch.setattr(l2_prefetch, "pdl_supported", lambda device: device.type == "cuda")


def test_off_unless_enabled_on_a_hopper_gpu(monkeypatch):
    monkeypatch.setattr(l2_prefetch, "ENABLED", False)
    assert l2_prefetch.ranges_per_row(QKV_TILE, 3072, 2048, 2, 1, GPU) == 0
    monkeypatch.setattr(l2_prefetch, "ENABLED", True)
    assert l2_prefetch.ranges_per_row(QKV_TILE, 3072, 2048, 2, 1, torch.device("cpu")) == 0  # no GPU here


def test_each_thread_asks_for_about_one_range(on_hopper):
    # 4 warps (128 threads) over 32 rows: 4 ranges a row (1 KB each of a 4 KB bf16 row)
    assert l2_prefetch.ranges_per_row(QKV_TILE, 3072, 2048, 2, 1, GPU) == 4
    # split-K 8 of K = 8192: each program's row share is 1,024 inputs; 64 rows, 2 ranges a row
    assert l2_prefetch.ranges_per_row(DOWN_TILE, 2048, 8192, 2, 1, GPU) == 2
    # a range stays whole 16-byte granules: 48 fp8 inputs a row take 1 range (3 x 16 bytes), not 2 of 24
    assert l2_prefetch.ranges_per_row(Tile(16, 16, 16, 1, 4, True, 2), 64, 48, 1, 1, GPU) == 1


def test_no_prefetch_where_it_cannot_be_whole_or_would_repeat(on_hopper, monkeypatch):
    assert l2_prefetch.ranges_per_row(QKV_TILE, 3072, 2000, 2, 1, GPU) == 0  # K is not whole tiles
    assert l2_prefetch.ranges_per_row(QKV_TILE, 3072, 2048, 2, 2, GPU) == 0  # two row tiles read the same weights
    assert l2_prefetch.ranges_per_row(Tile(16, 16, 8, 1, 1, True, 2), 64, 8, 1, 1, GPU) == 0  # 8-byte rows
    monkeypatch.setattr(l2_prefetch, "MAX_WEIGHT_BYTES", 3072 * 2048 * 2 - 1)
    assert l2_prefetch.ranges_per_row(QKV_TILE, 3072, 2048, 2, 1, GPU) == 0  # over the cap


def test_a_plan_names_points_and_projections():
    from kvtriton.backend.models import weight_prefetch

    assert weight_prefetch.parse("start:o_proj,output:qkv_proj+1") == {"start": [("o_proj", 0)],
                                                                       "output": [("qkv_proj", 1)]}
    with pytest.raises(ValueError, match="points"):
        weight_prefetch.parse("middle:o_proj")


def test_a_merged_gate_up_is_asked_for_from_both_halves(monkeypatch):
    from kvtriton.backend.models import weight_prefetch

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Module()
            self.mlp.gate_up_proj = torch.nn.Linear(64, 256, bias=False).to(torch.bfloat16)  # 32 KB
            self.mlp.down_proj = torch.nn.Linear(128, 64, bias=False).to(torch.bfloat16)  # 16 KB

    monkeypatch.setattr(weight_prefetch, "LIMIT_BYTES", 8192)
    layer = Layer()
    flat = layer.mlp.gate_up_proj.weight.view(-1).view(torch.uint8)
    gate, up = weight_prefetch.WeightPrefetch._regions(layer, "gate_up_proj")
    assert gate.numel() == up.numel() == 4096
    assert gate.data_ptr() == flat.data_ptr() and up.data_ptr() == flat.data_ptr() + 16384
    (down,) = weight_prefetch.WeightPrefetch._regions(layer, "down_proj")
    assert down.numel() == 8192
