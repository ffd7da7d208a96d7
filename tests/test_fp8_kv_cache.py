"""kv_cache_dtype fp8: KV pools of e4m3 values, stored saturated and widened to the model's dtype when read.

On the CPU the PyTorch paths run (eager and compiled decode); the Triton kernels' fp8 pools are checked in
tests/test_kernels.py, and the whole CUDA engine here with the gpu marker.
"""

from __future__ import annotations

import pytest
import torch

from kvtriton.backend.attention.kv_cache import FP8, FP8_MAX, KVCache, gather_kv, pool_dtype, write_kv
from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.sampling_params import SamplingParams

from tests.tiny_model import make_tiny_engine, make_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPTS = ["the quick brown fox", "paris is the capital of france " * 3, "blocks", "one two three four five"]
CUDA_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_pool_stores_saturate_and_read_back_widened():
    pools = KVCache.allocate(1, 4, 4, 2, 8, FP8, "cpu")
    k = torch.randn(3, 2, 8) * 4
    k[0, 0, :3] = torch.tensor([1000.0, -1e6, 448.0])  # past e4m3's range: a plain cast gives NaN
    v = torch.randn(3, 2, 8) / 64  # small values: e4m3's subnormals
    slots = torch.tensor([5, 0, 13])
    write_kv(pools.k[0], pools.v[0], slots, k, v)
    tables = torch.tensor([[1, 0, 3]])  # slot 5 is token 1 of block 1; 0 is block 0's first; 13 block 3's second
    keys = gather_kv(pools.k[0], tables, torch.float32)[0]  # (12, 2, 8)
    values = gather_kv(pools.v[0], tables, torch.float32)[0]
    for got, want in ((keys, k), (values, v)):
        stored = torch.stack([got[1], got[4], got[9]])
        assert torch.equal(stored, want.clamp(-FP8_MAX, FP8_MAX).to(FP8).float())
    assert keys[1, 0, :3].tolist() == [448.0, -448.0, 448.0] and not keys.isnan().any()


def test_kv_cache_dtype_is_checked_at_the_edge():
    assert pool_dtype("auto", torch.bfloat16) == torch.bfloat16 and pool_dtype("fp8", torch.float32) == FP8
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        EngineConfig(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="applies to the torch runner"):
        EngineConfig(kv_cache_dtype="fp8", runner="onnxruntime", engine_path="x.onnx")
    assert EngineConfig.from_mapping({"kv_cache_dtype": "fp8"}).kv_cache_dtype == "fp8"


@pytest.mark.parametrize("compiled", [False, True])
def test_fp8_pool_holds_four_times_the_tokens_of_an_fp32_pool_and_decodes_alike(tiny_folder, compiled):
    """The same memory budget: four times the blocks of an fp32 pool. Greedy output of the tiny model (its logits
    far apart) stays the float pool's, alone and batched, and every block comes back."""
    outputs, blocks = {}, {}
    for kv_cache_dtype in ("auto", "fp8"):
        torch._dynamo.reset()  # the second engine's graphs too (see conftest.fresh_dynamo)
        engine = make_tiny_engine(tiny_folder, kv_cache_dtype=kv_cache_dtype, num_kv_blocks=0,
                                  kv_cache_memory_gb=0.01, cpu_compile_decode=compiled).start()
        try:
            assert engine.runner.kv.k[0].dtype == (FP8 if kv_cache_dtype == "fp8" else torch.float32)
            blocks[kv_cache_dtype] = engine.runner.num_blocks
            solo = [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
            outputs[kv_cache_dtype] = solo + [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
            assert engine.stats().kv_usage == 0.0
        finally:
            engine.shutdown()
    assert blocks["fp8"] // 4 == blocks["auto"]  # each rounded down from the same budget
    same = sum(a == b for x, y in zip(outputs["auto"], outputs["fp8"]) for a, b in zip(x, y))
    assert same >= 0.9 * sum(map(len, outputs["auto"])), outputs


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with e4m3 conversions (compute capability 8.9+)")
@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_fp8_kv_cache_on_cuda_decodes_like_bf16(tmp_path, quantization):
    """The whole CUDA path at head_dim 64, where the Triton kernels serve: varlen prefill and decode attention
    reading fp8 pools, CUDA graphs, torch.compile'd layers; with bf16 and with fp8 weights."""
    folder = make_tiny_model(tmp_path / "tiny", hidden=256)
    prompts = ["the quick brown fox", "paris is the capital of", "one two three four"]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = {}
    for kv_cache_dtype in ("auto", "fp8"):
        torch._dynamo.reset()
        engine = make_tiny_engine(folder, device="cuda", num_kv_blocks=64, quantization=quantization,
                                  kv_cache_dtype=kv_cache_dtype).start()
        try:
            assert engine.runner.kernel_context_blocks and engine.runner.prefill_kernel
            outputs[kv_cache_dtype] = [o.token_ids for o in engine.generate(prompts, params)]
            assert engine.stats().kv_usage == 0.0
        finally:
            engine.shutdown()
    same = sum(a == b for e, g in zip(outputs["auto"], outputs["fp8"]) for a, b in zip(e, g))
    assert same >= 0.8 * sum(map(len, outputs["auto"])), outputs
