"""`kvtriton build`: a ready-to-serve model directory (config.pbtxt, shim, tokenizer files, graph, manifest)."""

from __future__ import annotations

import json

import pytest

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.entrypoints.pbtxt_parameters import read_parameters
from kvtriton.backend.models.checkpoint import checkpoint_sha256
from kvtriton.backend.runners.manifest import Manifest
from kvtriton.backend.triton.config import AdapterConfig
from kvtriton.build import cli

from tests.tiny_model import make_tiny_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def build(*argv) -> int:
    parser = cli.argparse.ArgumentParser()
    cli.add_arguments(parser)
    return cli.run(parser.parse_args([str(a) for a in argv]))


def engine_parameters(model_dir) -> dict:
    """What Triton would hand the engine: config.pbtxt's parameters, less the adapter's own."""
    return AdapterConfig.from_parameters(read_parameters(model_dir / "config.pbtxt"))[1]


def test_build_writes_a_ready_to_serve_model_that_decodes_like_torch(tiny, tmp_path, capsys):
    assert build(tiny, "--out", tmp_path / "repo", "--name", "tiny", "--block-size", 4) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("[3/3]") for line in lines) and lines[-1].startswith("ready:")
    model_dir = tmp_path / "repo" / "tiny"
    assert (model_dir / "1" / "model.py").read_text().count("TritonPythonModel") == 1
    assert {p.name for p in (model_dir / "1" / "hf").iterdir()} >= {"config.json", "tokenizer.json"}
    assert not list((model_dir / "1" / "hf").glob("*.safetensors"))  # weights live in the graph

    params = engine_parameters(model_dir)
    assert params["runner"] == "onnxruntime" and params["block_size"] == "4"
    assert params["engine_path"] == str(model_dir / "1" / "model.onnx")
    manifest = Manifest.read(model_dir / "1")
    assert manifest.source_sha256 == checkpoint_sha256(tiny) and manifest.precision == "fp32"
    assert manifest.inputs["k_cache"]["dtype"] == "FLOAT" and manifest.inputs["input_ids"]["dtype"] == "INT64"
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest.versions) and manifest.target == ["cpu", "cuda"]

    prompts = ["the quick brown fox", "paris is the capital of france"]
    served = LLMEngine(EngineConfig.from_mapping({**params, "device": "cpu"}))
    reference = LLMEngine(EngineConfig(model=str(tiny), device="cpu", block_size=4))
    try:
        assert [o.token_ids for o in served.generate(prompts, GREEDY)] == \
               [o.token_ids for o in reference.generate(prompts, GREEDY)]
    finally:
        served.shutdown()
        reference.shutdown()


def test_build_refuses_to_overwrite_and_names_the_fix(tiny, tmp_path, capsys):
    (tmp_path / "repo" / "llm").mkdir(parents=True)
    assert build(tiny, "--out", tmp_path / "repo") == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--precision", "bf16"], "--runtime tensorrt"),
    (["--name", "a b"], "--name"),
    (["--block-size", "0"], "--block-size"),
])
def test_bad_arguments_fail_with_a_message_naming_them(tiny, tmp_path, capsys, argv, message):
    assert build(tiny, "--out", tmp_path, *argv) == 2
    assert message in capsys.readouterr().err


def test_checkpoint_that_is_not_a_model_is_refused(tmp_path, capsys):
    assert build(tmp_path, "--out", tmp_path / "repo") == 2
    assert "config.json" in capsys.readouterr().err


def test_manifest_with_unknown_keys_is_refused(tiny, tmp_path):
    assert build(tiny, "--out", tmp_path, "--block-size", 4) == 0
    path = tmp_path / "llm" / "1" / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "surprise": 1}))
    with pytest.raises(ValueError, match="surprise"):
        Manifest.read(path.parent)


@pytest.mark.slow
@pytest.mark.server
def test_built_model_serves_through_tritonserver_like_the_torch_model(default_model_folder, llm_server, tmp_path):
    from tests.test_triton_llm import CAPITAL, post
    from tests.triton_fixture import start_server

    repo = tmp_path / "repo"
    assert build(default_model_folder, "--out", repo, "--name", "llm_onnx", "--max-model-len", 1024) == 0
    body = {"text_input": CAPITAL, "max_tokens": 24, "temperature": 0, "exclude_input_in_output": True}
    server = start_server(repo, timeout_s=300)
    try:
        status, built = post(server, "/v2/models/llm_onnx/generate", body)
    finally:
        server.stop()
    assert status == 200, built
    status, torch_served = post(llm_server, "/v2/models/llm/generate", body)
    assert status == 200, torch_served
    assert built["text_output"] == torch_served["text_output"] and "Paris" in built["text_output"]
