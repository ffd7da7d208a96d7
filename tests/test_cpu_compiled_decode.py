"""cpu_compile_decode: the CPU's one-sequence decode step through compiled layers gives the eager step's logits
within fp32 rounding (inductor's fused RMSNorm reduces in another order), at every context width, for float and
quantized weights; and the engine's greedy output is unchanged."""

from __future__ import annotations

import pytest
import torch

from kvtriton.backend.engine.sampling_params import SamplingParams

from tests.tiny_model import make_tiny_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = ["the quick brown fox", "paris is the capital of france " * 3, "blocks"]


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
        for context in (1, 3, bs + 1, 5 * bs - 2):  # tables of 1 (padded), 1, 2 and 5 blocks
            table = list(range(10, 10 + -(-context // bs)))
            position = context - 1
            args = (t([7]), t([position]), t([table[-1] * bs + position % bs]), t([table]), t([context]))
            compiled = runner.compiled_decode(*args)
            with torch.inference_mode():
                eager = runner._decode_logits(*args)
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5, msg=f"{quantization}, context {context}")
    finally:
        engine.shutdown()


def test_engine_greedy_unchanged(tiny_folder):
    outputs = {}
    for compiled in (False, True):
        engine = make_tiny_engine(tiny_folder, cpu_compile_decode=compiled, cpu_single_openmp_team=True).start()
        try:
            outputs[compiled] = [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
            assert engine.stats().kv_usage == 0.0  # every block back
        finally:
            engine.shutdown()
    assert outputs[True] == outputs[False]


def test_off_by_default_and_not_on_other_paths(tiny_folder):
    engine = make_tiny_engine(tiny_folder)
    try:
        assert engine.runner.compiled_decode is None
    finally:
        engine.shutdown()
