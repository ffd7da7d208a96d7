"""cpu_compile_decode: the CPU's decode step through compiled layers gives the eager step's logits bit for bit, at
every batch size and context width, for float and quantized weights; and the engine's greedy output is unchanged."""

from __future__ import annotations

import pytest
import torch

from kvtriton.backend.engine.sampling_params import SamplingParams

from tests.tiny_model import make_tiny_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = ["the quick brown fox", "paris is the capital of france " * 3, "blocks", "one two three four five"]


@pytest.mark.parametrize("quantization", ["none", "int4", "int8"])
def test_compiled_logits_equal_eager(tiny_folder, quantization):
    engine = make_tiny_engine(tiny_folder, quantization=quantization, cpu_compile_decode=True)
    runner = engine.runner
    try:
        assert runner.compiled_decode is not None
        torch.manual_seed(0)
        for pool in runner.kv.k + runner.kv.v:
            pool.normal_()

        def t(values):
            return torch.tensor(values, dtype=torch.int64)

        bs = runner.block_size
        # One sequence (its own graph), a few (the batch graph), past SKINNY_ROWS (fp32's third graph); contexts
        # of 1 block (padded to 2), 2 and 5.
        for batch, contexts in ((1, [1]), (1, [3]), (1, [bs + 1]), (3, [5 * bs - 2, 2, bs + 1]), (10, [bs + 3] * 10)):
            tables = [list(range(10 * (r + 1), 10 * (r + 1) + -(-c // bs))) for r, c in enumerate(contexts)]
            width = max(map(len, tables))
            tables = [table + [0] * (width - len(table)) for table in tables]
            positions = [c - 1 for c in contexts]
            slots = [table[p // bs] * bs + p % bs for table, p in zip(tables, positions)]
            # As the engine passes them: a column slice (the decode width) of a wider, preallocated table.
            tables = torch.cat([t(tables), t([[0, 0]] * batch)], dim=1)[:, :width]
            args = (t(range(7, 7 + batch)), t(positions), t(slots), tables, t(contexts))
            compiled = runner.compiled_decode(*args)
            with torch.inference_mode():
                eager = runner._decode_logits(*args)
            assert torch.equal(compiled, eager), (quantization, batch, contexts)
        assert runner.compiled_decode.eager_steps == 0  # every step above ran a compiled graph
    finally:
        engine.shutdown()


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
        def t(values):
            return torch.tensor(values, dtype=torch.int64)

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
