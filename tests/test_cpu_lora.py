"""LoRA adapters on the CPU's kernels (kernels/cpu_lora.cpp): the addition against its definition, and the one-call
decode step (runners/cpu_native_decode.py) taking adapted rows with the eager step's logits bit for bit, so greedy
output does not depend on which kind of step decoded a token."""

from __future__ import annotations

import pytest
import torch

from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.models.int4 import gemv_serves
from kvtriton.backend.models.lora import StepAdapters
from kvtriton.backend.runners.cpu_native_decode import NativeDecodeLayers

from tests.lora_adapters import ALL_TARGETS, make_adapter
from tests.test_cpu_compiled_decode import decode_step_args
from tests.tiny_model import make_tiny_engine, make_tiny_model

pytestmark = [pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="needs a CPU with AVX-512 BF16"),
              pytest.mark.usefixtures("fresh_dynamo")]  # each engine compiles the same functions
PROMPTS = ["the quick brown fox", "paris is the capital of france " * 3, "blocks", "one two three four five"]


@pytest.fixture(scope="module")
def wide_lora(tmp_path_factory):
    """A tiny Llama the one-call decode serves (head_dim 64) and two adapters of it: every projection at rank 8,
    and v, o and up at rank 4 (parts of the fused qkv and gate_up left alone)."""
    root = tmp_path_factory.mktemp("wide-lora")
    folder = make_tiny_model(root / "model", hidden=256)
    modules = {"all": make_adapter(root / "all", folder, targets=ALL_TARGETS, rank=8, alpha=16, seed=2),
               "vou": make_adapter(root / "vou", folder, targets=("v_proj", "o_proj", "up_proj"), scale=2, seed=1)}
    return folder, ",".join(f"{name}={path}" for name, path in modules.items())


def reference_delta(x, a, b_t, columns, token_adapters, block):
    """The definition in float64: each token's (x A_s^T) B_s^T over its adapter's rows that reach some column."""
    out = torch.zeros(x.shape[0], b_t.shape[1], dtype=torch.float64)
    for t, s in enumerate(token_adapters.tolist()):
        rows = [r for r in range((s - 1) * block, s * block) if s and columns[r, 0] < columns[r, 1]]
        out[t] = (x[t].double() @ a[rows].double().T) @ b_t[rows].double()
    return out


def test_the_addition_equals_its_definition_and_each_token_its_own_alone():
    assert gemv_serves()  # loads the kernels' library
    torch.manual_seed(0)
    adapters, block, n_in, n_out = 3, 12, 100, 530  # neither a multiple of the vector width
    a, b_t = torch.randn(adapters * block, n_in), torch.randn(adapters * block, n_out)
    columns = torch.zeros(adapters * block, 2, dtype=torch.int64)
    columns[:, 1] = n_out
    columns[5:12] = torch.tensor([0, 0])  # padding rows of adapter 1 (B rows zero there, as attach_adapters leaves)
    b_t[5:12] = 0
    columns[12:18] = torch.tensor([300, 530])  # adapter 2: its rows reach one part's columns only
    b_t[12:18, :300] = 0
    x = torch.randn(7, n_in)
    token_adapters = torch.tensor([0, 1, 2, 3, 2, 0, 1])
    delta = torch.ops.kvtriton.lora_delta(x, a, b_t, columns, token_adapters, block)
    torch.testing.assert_close(delta.double(), reference_delta(x, a, b_t, columns, token_adapters, block),
                               rtol=1e-5, atol=1e-4)
    assert not delta[0].any() and not delta[5].any()  # base-model tokens: exactly nothing
    for t in range(7):  # a token's numbers are its own: the same bits alone as in the batch
        alone = torch.ops.kvtriton.lora_delta(x[t:t + 1], a, b_t, columns, token_adapters[t:t + 1], block)
        assert torch.equal(alone[0], delta[t]), t
    with pytest.raises(RuntimeError, match=r"a token's adapter is outside 0 \.\. 3"):
        torch.ops.kvtriton.lora_delta(x[:1], a, b_t, columns, torch.tensor([4]), block)
    with pytest.raises(RuntimeError, match="block must divide"):
        torch.ops.kvtriton.lora_delta(x[:1], a, b_t, columns, torch.tensor([1]), 7)


def test_one_call_decode_with_adapters_equals_the_eager_step(wide_lora):
    folder, modules = wide_lora
    engine = make_tiny_engine(folder, quantization="int4", cpu_compile_decode=True, cpu_dense_min_rows=12,
                              lora_modules=modules)
    runner = engine.runner
    try:
        decode = runner.compiled_decode
        assert decode.native is not None and decode.serves_rows(11) and not decode.serves_rows(12)
        torch.manual_seed(0)
        for pool in runner.kv.k + runner.kv.v:
            pool.copy_(torch.randn(pool.shape))
        bs = runner.block_size
        for contexts, rows in (([1], [1]), ([bs + 1], [2]), ([5 * bs - 2, 2, bs + 1, 3], [0, 2, 1, 1])):
            args = decode_step_args(bs, contexts)
            token_adapters = torch.tensor(rows)
            native = decode(*args, token_adapters)
            with torch.inference_mode():
                eager = runner._decode_logits(*args, StepAdapters.of_rows(token_adapters, rows))
                base = runner._decode_logits(*args)
            assert torch.equal(native, eager), rows
            for r, adapter in enumerate(rows):  # the adapters change their rows' logits, and only theirs
                assert torch.equal(native[r], base[r]) == (adapter == 0), (rows, r)
    finally:
        engine.shutdown()


def test_adapted_decode_steps_take_the_one_call_step_and_greedy_output_is_unchanged(wide_lora, monkeypatch):
    """Each prompt on each adapter alone, and all of them in flight together (decode-only and mixed steps): the
    same tokens as the eager engine's, the decode steps through the C++ call."""
    folder, modules = wide_lora
    adapted_calls = []
    call = NativeDecodeLayers.__call__

    def counting(self, x, rope, slots, tables, mask, token_adapters=None):
        adapted_calls.append(token_adapters is not None)
        return call(self, x, rope, slots, tables, mask, token_adapters)

    monkeypatch.setattr(NativeDecodeLayers, "__call__", counting)
    outputs = {}
    for compiled in (False, True):
        engine = make_tiny_engine(folder, quantization="int4", cpu_compile_decode=compiled, lora_modules=modules,
                                  cpu_single_openmp_team=True).start()
        try:
            requests = [(p, name) for p in PROMPTS for name in (None, "all", "vou")]
            params = [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, lora_name=name)
                      for _, name in requests]
            solo = [engine.generate([p], sp)[0].token_ids for (p, _), sp in zip(requests, params)]
            streams = [engine.add_request(f"r{compiled}-{i}", p, sp) for i, ((p, _), sp) in enumerate(zip(requests,
                                                                                                        params))]
            outputs[compiled] = solo, [s.result().token_ids for s in streams]
            assert engine.stats().kv_usage == 0.0
        finally:
            engine.shutdown()
    assert outputs[True] == outputs[False]
    assert outputs[True][0] == outputs[True][1]  # in flight together, each as alone
    assert sum(adapted_calls) > 0
