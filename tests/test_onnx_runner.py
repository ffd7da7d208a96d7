"""The exported step graph in onnxruntime decodes token for token like the torch runner (fp32)."""

from __future__ import annotations

import collections

import pytest
import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.models.loader import load_model
from kvtriton.backend.runners.graph_spec import read_spec
from kvtriton.backend.runners.step_graph import INPUT_NAMES, StepGraph, example_inputs
from kvtriton.build.onnx_export import export_step_graph

from tests.tiny_model import make_tiny_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
BLOCK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    path = folder / "step.onnx"
    export_step_graph(load_model(folder), path, block_size=BLOCK, precision="fp32")
    return folder, path


def engine(folder, **overrides):
    cfg = dict(model=str(folder), device="cpu", block_size=BLOCK, num_kv_blocks=256, max_num_seqs=16,
               max_num_batched_tokens=64)
    return LLMEngine(EngineConfig(**{**cfg, **overrides})).start()


def prompts(n=10):
    words = "the quick brown fox jumps over the lazy dog paris capital france blocks".split()
    return [" ".join(words[: 1 + (i * 5) % len(words)]) * (1 + i % 3) for i in range(n)]


def greedy(folder, prompt_list, **overrides):
    eng = engine(folder, **overrides)
    try:
        return [out.token_ids for out in eng.generate(prompt_list, GREEDY)]
    finally:
        eng.shutdown()


def test_graph_uses_plain_onnx_ops_and_carries_its_spec(tiny):
    _, path = tiny
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {op.domain for op in proto.opset_import} <= {"", "ai.onnx"}
    ops = collections.Counter(node.op_type for node in proto.graph.node)
    assert "OneHot" not in ops and ops["Softmax"] == 2  # one attention per layer
    spec = read_spec(path)
    assert (spec.block_size, spec.num_layers, spec.kv_dtype, spec.precision) == (BLOCK, 2, "float32", "fp32")


def test_graph_matches_torch_step_function_with_old_context(tiny):
    """Rows with cached context (positions start at 1) and new tokens: onnxruntime == the traced torch function."""
    folder, path = tiny
    model = load_model(folder)
    inputs = list(example_inputs(model, batch=3, tokens=5, num_blocks=6, block_size=BLOCK, table_width=2))
    gen = torch.Generator().manual_seed(1)
    inputs[0] = torch.randint(0, model.config.vocab_size, (3, 5), generator=gen)
    inputs[2] = torch.randn(inputs[2].shape, generator=gen)
    inputs[3] = torch.randn(inputs[3].shape, generator=gen)
    with torch.no_grad():
        expected = StepGraph(model)(*inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: t.numpy() for n, t in zip(INPUT_NAMES, inputs)})
    for g, e in zip(got, expected):
        assert g.shape == tuple(e.shape)
        assert abs(g - e.numpy()).max() < 1e-4


@pytest.mark.parametrize("overrides", [
    dict(),  # prefix caching + chunked prefill
    dict(num_kv_blocks=24, max_num_batched_tokens=16),  # preemption by recompute
])
def test_onnxruntime_greedy_equals_torch(tiny, overrides):
    folder, path = tiny
    batch = prompts()
    expected = greedy(folder, batch, **overrides)
    got = greedy(folder, batch, runner="onnxruntime", engine_path=str(path), **overrides)
    assert got == expected


@pytest.mark.parametrize("precision, dtype", [("fp16", torch.float16), ("int8", torch.float32)])
def test_fp16_and_int8_graphs_decode_through_the_engine(tiny, tmp_path, precision, dtype):
    """Not bit-exact by design; on the tiny model's sharp logits the greedy tokens still agree with fp32."""
    folder, _ = tiny
    path = tmp_path / f"{precision}.onnx"
    export_step_graph(load_model(folder, dtype=dtype), path, block_size=BLOCK, precision=precision)
    batch = prompts(4)
    expected = greedy(folder, batch)
    got = greedy(folder, batch, runner="onnxruntime", engine_path=str(path))
    agree = sum(a == b for g, e in zip(got, expected) for a, b in zip(g, e)) / sum(map(len, expected))
    assert agree >= 0.9, agree


def test_runner_refuses_a_graph_of_another_block_size(tiny):
    folder, path = tiny
    with pytest.raises(ValueError, match="block_size 4"):
        LLMEngine(EngineConfig(model=str(folder), device="cpu", block_size=16, runner="onnxruntime",
                               engine_path=str(path)))


def test_runner_without_engine_path_says_what_to_do(tiny):
    folder, _ = tiny
    with pytest.raises(ValueError, match="engine_path"):
        LLMEngine(EngineConfig(model=str(folder), device="cpu", runner="onnxruntime"))


@pytest.mark.slow
def test_default_model_onnxruntime_equals_torch(default_model_folder, tmp_path):
    path = tmp_path / "smollm2.onnx"
    export_step_graph(load_model(default_model_folder), path, block_size=16, precision="fp32")
    chats = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def run(**overrides):
        eng = LLMEngine(EngineConfig(model=str(default_model_folder), device="cpu", num_kv_blocks=64,
                                     **overrides)).start()
        try:
            return [o.token_ids for o in eng.generate(chats, params)]
        finally:
            eng.shutdown()

    assert run(runner="onnxruntime", engine_path=str(path)) == run()
