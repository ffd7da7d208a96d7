"""The CPU decode step's layers in one C++ call (runners/cpu_native_decode.py, kernels/cpu_decode_layers.cpp): the
eager step's logits bit for bit, greedy output unchanged, its attention against gather + SDPA, clear errors for
bad operands, and the models it leaves to the compiled graphs."""

from __future__ import annotations

import pytest
import torch

from kvtriton.backend.attention.paged import decode_attention, decode_mask
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.models.int4 import gemv_serves
from kvtriton.backend.runners.cpu_native_decode import why_not_native

from tests.test_cpu_compiled_decode import decode_step_args
from tests.test_gguf_checkpoint import write_tiny_gguf
from tests.tiny_model import make_tiny_engine, make_tiny_model

pytestmark = [pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="needs a CPU with AVX-512 BF16"),
              pytest.mark.usefixtures("fresh_dynamo")]  # each engine compiles the same functions
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = ["the quick brown fox", "paris is the capital of france " * 3, "blocks", "one two three four five"]


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory):
    """A tiny Llama with head_dim 64 (hidden 256, 4 heads over 2 KV heads): the kernels' vector widths."""
    return make_tiny_model(tmp_path_factory.mktemp("wide"), hidden=256)




def native_engine(folder, **overrides):
    return make_tiny_engine(folder, **{"quantization": "int4", "cpu_compile_decode": True, **overrides})


# The GEMV; int8 per channel through ATen's kernel; an fp8 KV cache (written and read in C++ as torch does).
@pytest.mark.parametrize("quantization,kv_cache_dtype", [("int4", "auto"), ("int8", "auto"), ("int4", "fp8")])
def test_logits_equal_eager(wide_folder, quantization, kv_cache_dtype):
    engine = native_engine(wide_folder, cpu_dense_min_rows=12, quantization=quantization,
                           kv_cache_dtype=kv_cache_dtype)
    try:
        assert_native_equals_eager(engine.runner)
    finally:
        engine.shutdown()


# As a Q4_K_M file mixes them (llama.cpp gives some attn_v and ffn_down Q6_K, the rest Q4_K), with a Q8_0 o_proj.
K_QUANT_MIX = {
    **{f"blk.{i}.{t}.weight": "Q4_K" for i in (0, 1) for t in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                               "ffn_gate", "ffn_up", "ffn_down")},
    "blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K", "blk.1.attn_output.weight": "Q8_0",
    "token_embd.weight": "Q8_0",
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v with biases
def test_a_q4_k_m_gguf_takes_the_one_call_step_with_the_eager_steps_logits(tmp_path, arch):
    """Quantization auto keeps each GGUF tensor in no fewer bits than stored: Q4_K as int4 (the GEMV), Q6_K and Q8_0
    as int8 groups (two 4-bit planes through the GEMV), a qkv with a Q6_K part as int8 per channel (ATen's kernel).
    The C++ layers take every one of them, biases too, with the eager step's logits bit for bit."""
    write_tiny_gguf(tmp_path / "m.gguf", arch=arch, quant_types=K_QUANT_MIX, hidden=256, ffn=256, head_dim=64)
    engine = native_engine(tmp_path / "m.gguf", quantization="auto", cpu_dense_min_rows=12)
    try:
        layers = engine.runner.model.layers
        modules = (layers[0].self_attn.qkv_proj, layers[0].mlp.down_proj, layers[1].self_attn.o_proj,
                   layers[1].mlp.gate_up_proj)
        got = [(type(m).__name__, m.group_size, m.bias is not None) for m in modules]
        bias = arch == "qwen2"
        assert got == [("Int8Linear", 0, bias), ("Int8Linear", 16, False), ("Int8Linear", 32, False),
                       ("Int4Linear", 32, False)]
        assert_native_equals_eager(engine.runner)
    finally:
        engine.shutdown()


def assert_native_equals_eager(runner):
    """The one-call step's logits against the eager step's, at one sequence, a few, and 12 (the dense copies'
    rows: the compiled graph, with the C++ attention; the runner's cpu_dense_min_rows is 12)."""
    assert runner.compiled_decode.native is not None and runner.compiled_decode.native.max_batch == 11
    torch.manual_seed(0)
    for pool in runner.kv.k + runner.kv.v:
        pool.copy_(torch.randn(pool.shape))
    bs = runner.block_size
    # Contexts of 1 block (padded to 2), 2 and 5, and rows whose contexts end inside a block.
    for contexts in ([1], [3], [bs + 1], [5 * bs - 2, 2, bs + 1], [bs + 3] * 10, [2 * bs + 1] * 12):
        args = decode_step_args(bs, contexts)
        native = runner.compiled_decode(*args)
        with torch.inference_mode():
            eager = runner._decode_logits(*args)
        assert torch.equal(native, eager), contexts
    assert runner.compiled_decode.eager_steps == 0


def test_engine_greedy_unchanged(wide_folder):
    """Each prompt alone and all at once (decode-only and mixed steps): the same tokens as the eager engine's."""
    outputs = {}
    for compiled in (False, True):
        engine = make_tiny_engine(wide_folder, quantization="int4", cpu_compile_decode=compiled,
                                  cpu_single_openmp_team=True).start()
        try:
            if compiled:
                assert engine.runner.compiled_decode.native is not None
            solo = [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
            outputs[compiled] = solo, [out.token_ids for out in engine.generate(PROMPTS, GREEDY)]
            assert engine.stats().kv_usage == 0.0  # every block back
        finally:
            engine.shutdown()
    assert outputs[True] == outputs[False]


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.float8_e4m3fn])
def test_attention_equals_gather_and_sdpa(pool_dtype):
    """fp8 pools: read as their fp32 values, every e4m3fn number (subnormals, the largest, both signs) among them."""
    assert gemv_serves()  # loads the kernels' library
    torch.manual_seed(0)
    bs, hkv, heads, d = 4, 2, 6, 64
    k_pool, v_pool = (torch.randn(12, bs, hkv, d) * 4).to(pool_dtype), (torch.randn(12, bs, hkv, d) * 4).to(pool_dtype)
    if pool_dtype != torch.float32:
        every = torch.arange(256, dtype=torch.uint8)
        every = every[(every & 0x7F) != 0x7F].view(pool_dtype)  # all but NaN
        k_pool.view(-1)[: every.numel()] = every
        v_pool.view(-1)[-every.numel():] = every
    tables = torch.tensor([[3, 7, 1], [0, 2, 2], [9, 4, 5]])  # row 1's context ends in its 2nd block
    mask = decode_mask(torch.tensor([11, 6, 12]), tables.shape[1] * bs)
    q = torch.randn(3, heads, d) * (1 if pool_dtype == torch.float32 else 0.01)  # scores of order 1 beside 448s
    out = torch.ops.kvtriton.decode_attention(q, k_pool, v_pool, tables, mask, 0.3)
    reference = decode_attention(q, k_pool.float(), v_pool.float(), tables, mask, 0.3)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_bad_operands_are_refused_in_one_line():
    assert gemv_serves()
    q, pool = torch.zeros(1, 4, 64, dtype=torch.bfloat16), torch.zeros(2, 4, 2, 64)
    tables, mask = torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="q must be contiguous fp32"):
        torch.ops.kvtriton.decode_attention(q, pool, pool, tables, mask, 1.0)
    with pytest.raises(RuntimeError, match="mask must be contiguous bool"):
        torch.ops.kvtriton.decode_attention(q.float(), pool, pool, tables, mask[:, :3], 1.0)


@pytest.mark.parametrize("overrides,why", [
    ({"quantization": "none"}, "runs none of the CPU's int4/int8 kernels"),
])
def test_models_it_does_not_serve_keep_the_compiled_graphs(wide_folder, overrides, why):
    engine = make_tiny_engine(wide_folder, cpu_compile_decode=True, **overrides)
    try:
        assert engine.runner.compiled_decode.native is None
        assert why in why_not_native(engine.runner.model, engine.runner.kv)
    finally:
        engine.shutdown()


def test_head_dim_off_the_vector_width_keeps_the_compiled_graphs(tiny_folder):
    engine = native_engine(tiny_folder)  # head_dim 16
    try:
        assert engine.runner.compiled_decode.native is None
        assert "multiple of the kernel's vector" in why_not_native(engine.runner.model, engine.runner.kv)
    finally:
        engine.shutdown()


def test_verify_steps_take_the_one_call_step_and_speculation_keeps_the_plain_output(wide_folder, monkeypatch):
    """With speculation each verify step's tokens are decode rows of the C++ call (each attending up to its own
    position), so a verified token's logits are the bits a decode step gives it: greedy output equals the plain
    engine's exactly, proposals cut at every length (a noisy proposer) included, and every block comes back."""
    from kvtriton.backend.runners.torch_runner import TorchRunner

    from tests.test_speculative import NoisyProposer, prompts, run_stepwise

    rows_per_call = []
    native_rows = TorchRunner._native_rows

    def counting(self, step):
        rows_per_call.append(step.input_ids.shape[0] - step.num_seqs)  # > 0: a verify step's proposals
        return native_rows(self, step)

    monkeypatch.setattr(TorchRunner, "_native_rows", counting)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = []
    for spec in ({}, dict(speculative_method="ngram", num_speculative_tokens=3, speculative_disable_by_batch_size=0)):
        engine = native_engine(wide_folder, **spec)
        if spec:
            engine.proposer = NoisyProposer(engine.proposer, engine._sample_vocab)
        try:
            outputs.append(run_stepwise(engine, prompts(6), greedy))
            stats = engine.stats()
            assert stats.kv_usage == 0.0
            if spec:
                assert stats.num_spec_accepted_tokens > 0
                assert stats.num_spec_accepted_tokens < stats.num_spec_proposed_tokens  # rejections too
        finally:
            engine.shutdown()
    assert outputs[1] == outputs[0]
    assert any(extra > 0 for extra in rows_per_call)  # verify steps ran through the C++ call


def test_qwen3s_qk_norm_runs_in_the_one_call_step(tmp_path):
    """Qwen3 normalises each head of q and k before RoPE: the C++ layers do it too, with the eager step's bits."""
    folder = make_tiny_model(tmp_path / "qwen3", hidden=256, architecture="qwen3")
    engine = native_engine(folder, cpu_dense_min_rows=12)
    try:
        assert engine.runner.model.config.qk_norm
        with torch.no_grad():  # weights of their own, not HF's ones: the norms' scaling shows
            for layer in engine.runner.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
        assert_native_equals_eager(engine.runner)
    finally:
        engine.shutdown()
