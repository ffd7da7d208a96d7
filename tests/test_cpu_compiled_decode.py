"""cpu_compile_decode: the CPU's decode step through compiled layers gives the eager step's logits bit for bit, at
every batch size and context width, for float and quantized weights and an fp8 KV cache; and the engine's greedy
output is unchanged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvtriton.backend.engine.sampling_params import SamplingParams

from tests.tiny_model import make_tiny_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = ["the quick brown fox", "paris is the capital of france " * 3, "blocks", "one two three four five"]


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def t(values):
    return torch.tensor(values, dtype=torch.int64)


def decode_step_args(block_size: int, contexts: list[int]) -> tuple:
    """A decode step's (ids, positions, slots, tables, context lengths): sequence r's blocks from 10 (r + 1) on."""
    bs, batch = block_size, len(contexts)
    tables = [list(range(10 * (r + 1), 10 * (r + 1) + -(-c // bs))) for r, c in enumerate(contexts)]
    width = max(map(len, tables))
    tables = [table + [0] * (width - len(table)) for table in tables]
    positions = [c - 1 for c in contexts]
    slots = [table[p // bs] * bs + p % bs for table, p in zip(tables, positions)]
    # As the engine passes them: a column slice (the decode width) of a wider, preallocated table.
    tables = torch.cat([t(tables), t([[0, 0]] * batch)], dim=1)[:, :width]
    return t(range(7, 7 + batch)), t(positions), t(slots), tables, t(contexts)


@pytest.mark.parametrize("quantization,kv_cache_dtype", [("none", "auto"), ("int4", "auto"), ("int8", "auto"),
                                                          ("none", "fp8")])
def test_compiled_logits_equal_eager(tiny_folder, quantization, kv_cache_dtype):
    engine = make_tiny_engine(tiny_folder, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                              cpu_compile_decode=True)
    runner = engine.runner
    try:
        assert runner.compiled_decode is not None
        torch.manual_seed(0)
        for pool in runner.kv.k + runner.kv.v:
            pool.copy_(torch.randn(pool.shape))  # an fp8 pool has no normal_

        bs = runner.block_size
        # One sequence (its own graph), a few (the batch graph), past SKINNY_ROWS (fp32's third graph); contexts
        # of 1 block (padded to 2), 2 and 5.
        for batch, contexts in ((1, [1]), (1, [3]), (1, [bs + 1]), (3, [5 * bs - 2, 2, bs + 1]), (10, [bs + 3] * 10)):
            args = decode_step_args(bs, contexts)
            compiled = runner.compiled_decode(*args)
            with torch.inference_mode():
                eager = runner._decode_logits(*args)
            assert torch.equal(compiled, eager), (quantization, kv_cache_dtype, batch, contexts)
        assert runner.compiled_decode.eager_steps == 0  # every step above ran a compiled graph
    finally:
        engine.shutdown()


LOAD_AND_DECODE_5_ROWS = """
import sys
from tests.test_cpu_compiled_decode import decode_step_args
from tests.tiny_model import make_tiny_engine
engine = make_tiny_engine(sys.argv[1], quantization="int4", cpu_compile_decode=True,
                          cpu_dense_min_rows=int(sys.argv[2]), max_num_seqs=8)
engine.runner.compiled_decode(*decode_step_args(engine.runner.block_size, [5] * 5))
print("eager steps", engine.runner.compiled_decode.eager_steps)
engine.shutdown()
"""


def test_batches_stay_compiled_when_the_dense_copies_row_count_changes_between_loads(tiny_folder, tmp_path):
    """5 rows are above one load's cpu_dense_min_rows (4) and below the next's (6). Each load is a process of
    its own sharing one on-disk compile cache, as a server's restarts do: the second's graphs must still cover 5
    rows (the cache replayed the first load's guard, batch <= 3, and such steps ran eagerly)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}
    for rows in (4, 6):
        run = subprocess.run([sys.executable, "-c", LOAD_AND_DECODE_5_ROWS, str(tiny_folder), str(rows)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert "eager steps 0" in run.stdout, (rows, run.stdout, run.stderr[-2000:])


def test_engine_greedy_unchanged(tiny_folder):
    """Each prompt alone (one-sequence steps) and all at once (batches, then their tails): the same tokens
    with compiled decode steps as eagerly."""
    outputs = {}
    for compiled in (False, True):
        engine = make_tiny_engine(tiny_folder, cpu_compile_decode=compiled, cpu_single_openmp_team=True).start()
        try:
            solo = [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
            batched = [out.token_ids for out in engine.generate(PROMPTS, GREEDY)]
            outputs[compiled] = solo, batched
            assert engine.stats().kv_usage == 0.0  # every block back
            if compiled:
                assert engine.runner.compiled_decode.eager_steps == 0
        finally:
            engine.shutdown()
    assert outputs[True] == outputs[False]


def test_step_that_fits_no_graph_runs_eagerly_and_is_counted(tiny_folder):
    engine = make_tiny_engine(tiny_folder, cpu_compile_decode=True)
    runner = engine.runner
    try:
        norm = runner.model.layers[0].input_layernorm  # a module of a type the graphs were not compiled for
        norm.__class__ = type("OtherNorm", (type(norm),), {})
        args = (t([7]), t([0]), t([40]), t([[10, 11]]), t([1]))
        with torch.inference_mode():
            eager = runner._decode_logits(*args)
        assert torch.equal(runner.compiled_decode(*args), eager)
        assert runner.compiled_decode.eager_steps == 1
    finally:
        engine.shutdown()


def test_off_by_default(tiny_folder):
    engine = make_tiny_engine(tiny_folder)
    try:
        assert engine.runner.compiled_decode is None
    finally:
        engine.shutdown()
