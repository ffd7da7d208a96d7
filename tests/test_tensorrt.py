"""TensorRT engines: built on the CPU with TensorRT for RTX, I/O checked against the ONNX graph; the runner
refuses what it cannot run (no GPU, Hopper with TensorRT for RTX, another TensorRT, another GPU) in one line."""

from __future__ import annotations

import dataclasses

import pytest

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.runners.manifest import Manifest
from kvtriton.backend.runners.tensorrt_module import flavour, import_tensorrt
from kvtriton.backend.runners.tensorrt_runner import check_runnable
from kvtriton.build.model_builder import BuildConfig, build_model, graph_io

from tests.tiny_model import make_tiny_model

pytest.importorskip("onnx")
pytest.importorskip("transformers")
tensorrt_engine = pytest.importorskip("kvtriton.build.tensorrt_engine")
try:
    trt = import_tensorrt()
except ImportError:
    pytest.skip("no TensorRT / TensorRT for RTX installed", allow_module_level=True)

ENGINE_IO = {  # name -> (mode, rank): the step graph's contract
    "input_ids": ("INPUT", 2), "positions": ("INPUT", 2), "k_cache": ("INPUT", 5), "v_cache": ("INPUT", 5),
    "block_tables": ("INPUT", 2), "logits": ("OUTPUT", 2), "new_k": ("OUTPUT", 5), "new_v": ("OUTPUT", 5),
}


def build(checkpoint, out, precision, **kw):
    cfg = BuildConfig(checkpoint=str(checkpoint), out=str(out), precision=precision, runtime="tensorrt", **kw)
    return build_model(cfg, say=lambda _: None)


def assert_engine_matches_graph(model_dir, kv_dtype):
    manifest = Manifest.read(model_dir / "1")
    graph = graph_io(model_dir / "1" / "model.onnx")
    assert manifest.inputs == graph["inputs"] and manifest.outputs == graph["outputs"]
    assert {k: (("INPUT" if k in graph["inputs"] else "OUTPUT"), len(v["shape"]))
            for k, v in {**graph["inputs"], **graph["outputs"]}.items()} == ENGINE_IO
    for name in ("input_ids", "positions", "block_tables"):
        assert graph["inputs"][name]["dtype"] == "INT64"  # TensorRT's parser wants int64 index bindings
    assert graph["inputs"]["k_cache"]["dtype"] == kv_dtype and graph["outputs"]["new_k"]["dtype"] == kv_dtype
    assert graph["outputs"]["logits"]["dtype"] == "FLOAT"
    assert manifest.builder == flavour(trt) and manifest.versions[manifest.builder] == trt.__version__
    decode, prefill = manifest.profiles
    assert decode["input_ids"][2] == [manifest.limits["max_num_seqs"], 1]
    assert prefill["input_ids"][2] == [1, manifest.limits["max_num_batched_tokens"]]
    assert (model_dir / "1" / "model.engine").stat().st_size > 0
    return manifest


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    folder = make_tiny_model(tmp_path_factory.mktemp("tiny"))
    model_dir = build(folder, tmp_path_factory.mktemp("repo"), "int8", block_size=4, max_num_seqs=8,
                      max_num_batched_tokens=64, max_model_len=256, num_kv_blocks=128)
    return folder, model_dir


def test_tiny_int8_engine_io_matches_the_graph(tiny_engine):
    _, model_dir = tiny_engine
    manifest = assert_engine_matches_graph(model_dir, "FLOAT16")  # auto: fp16 activations for tensorrt
    assert manifest.limits == {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_blocks_per_seq": 64,
                               "num_blocks": 128}


def test_tiny_int8_engine_with_fp32_activations_builds_too(tiny_engine, tmp_path):
    folder, _ = tiny_engine
    model_dir = build(folder, tmp_path, "int8", int8_activations="fp32", block_size=4, max_num_seqs=4,
                      max_num_batched_tokens=32, max_model_len=128, num_kv_blocks=64)
    assert_engine_matches_graph(model_dir, "FLOAT")


@pytest.mark.parametrize("gguf", [False, True], ids=["float checkpoint", "gguf blocks"])
def test_tiny_int4_engine_builds_from_blocked_int4_dequantize(tiny_engine, tmp_path, monkeypatch, gguf):
    """TensorRT parses the int4 graph (symmetric INT4 blocks, opset 21; a GGUF's Q8_0 lm_head as INT8 blocks)
    and builds it, weights and all, on the CPU."""
    folder, _ = tiny_engine
    if gguf:
        from tests.test_gguf_checkpoint import write_tiny_gguf
        from tests.test_int4 import QUANT_TYPES

        write_tiny_gguf(tmp_path / "tiny.gguf", quant_types=QUANT_TYPES)
        folder = tmp_path / "tiny.gguf"
        monkeypatch.setenv("KVTRITON_CACHE", str(tmp_path / "cache"))  # where the .gguf is converted
    model_dir = build(folder, tmp_path / "repo", "int4", block_size=4, max_num_seqs=4, max_num_batched_tokens=32,
                      max_model_len=128, num_kv_blocks=64)
    manifest = assert_engine_matches_graph(model_dir, "FLOAT16")
    assert manifest.precision == "int4" and manifest.quantization["format"] == "int4"
    assert manifest.quantization["layout"] == "DequantizeLinear blocked int4 (opset 21)"
    assert all(("as stored" in source) == gguf for source in manifest.quantization["source"])
    config = EngineConfig(model=str(folder), device="cpu", block_size=4, runner="tensorrt",
                          engine_path=str(model_dir / "1" / "model.engine"))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*--precision int4 --runtime onnxruntime"):
        LLMEngine(config)  # its graph's int4 layout is TensorRT's: not a fallback for onnxruntime


def test_runner_without_a_gpu_points_to_onnxruntime(tiny_engine):
    folder, model_dir = tiny_engine
    config = EngineConfig(model=str(folder), device="cpu", block_size=4, runner="tensorrt",
                          engine_path=str(model_dir / "1" / "model.engine"))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*runner=onnxruntime with engine_path=.*model.onnx"):
        LLMEngine(config)


def test_refusals_name_the_cause_and_the_rebuild(tiny_engine):
    _, model_dir = tiny_engine
    manifest = Manifest.read(model_dir / "1")
    path = str(model_dir / "1" / "model.engine")
    if manifest.builder == "tensorrt_rtx":
        with pytest.raises(RuntimeError, match=r"cannot run on this GPU \(compute capability 9.0"):
            check_runnable(manifest, path, trt, (9, 0))  # Hopper
    other_gpu = dataclasses.replace(manifest, target=["SM89"])
    with pytest.raises(RuntimeError, match="built for SM89, this GPU is SM86.*kvtriton build .* --runtime tensorrt"):
        check_runnable(other_gpu, path, trt, (8, 6))
    other_version = dataclasses.replace(manifest, target=["SM86"],
                                        versions={**manifest.versions, manifest.builder: "0.0.1"})
    with pytest.raises(RuntimeError, match=f"built by {manifest.builder} 0.0.1, this process has .*rebuild"):
        check_runnable(other_version, path, trt, (8, 6))
    check_runnable(dataclasses.replace(manifest, target=["SM86"]), path, trt, (8, 6))  # a match passes


@pytest.mark.slow
@pytest.mark.parametrize("precision, kv_dtype", [("fp16", "FLOAT16"), ("int8", "FLOAT16"), ("int4", "FLOAT16")])
def test_default_model_engine_builds_on_the_cpu(default_model_folder, tmp_path, precision, kv_dtype):
    model_dir = build(default_model_folder, tmp_path, precision, max_model_len=2048, num_kv_blocks=1024)
    manifest = assert_engine_matches_graph(model_dir, kv_dtype)
    assert manifest.precision == precision and len(manifest.target) >= 1
