"""kernels/tile_config.py: which calls found a measured tile, and the names of those that did not."""

from __future__ import annotations

import pytest

from kvtriton.backend.kernels import tile_config
from kvtriton.backend.kernels.tile_config import Tile, lookup, rows_bucket, unmeasured_shapes

TABLE = {("fp8", 8, 2048, 2048): (16, 32, 128, 2, 4, True, 3)}


@pytest.fixture(autouse=True)
def fresh_record(monkeypatch):
    monkeypatch.setattr(tile_config, "UNMEASURED", set())


def test_a_call_takes_its_row_buckets_entry_and_is_not_recorded():
    assert [rows_bucket(m) for m in (1, 3, 5, 8, 9, 64, 65)] == [1, 4, 8, 8, 16, 64, 64]
    assert lookup(TABLE, "fp8", 5, 2048, 2048) == Tile(16, 32, 128, 2, 4, True, 3)
    assert not tile_config.UNMEASURED


def test_missing_buckets_are_recorded_and_named_a_line_per_shape():
    for m in (1, 2, 16, 3):
        assert lookup(TABLE, "fp8", m, 2048, 2048) is None
    assert lookup(TABLE, "int4", 8, 576, 1536) is None
    assert unmeasured_shapes() == ["fp8 N=2048 K=2048 at 1/2/4/16 rows", "int4 N=576 K=1536 at 8 rows"]
