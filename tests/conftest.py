"""Shared fixtures: the default model, one real tritonserver per test session, and int4 on PyTorch's kernels."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kvtriton.backend.entrypoints.pbtxt_parameters import set_parameters

from tests.tiny_model import make_tiny_model
from tests.triton_fixture import start_server

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama (tests/tiny_model.py), one per test module."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def torch_int4_kernels(monkeypatch):
    """int4 layers built in the test pack for PyTorch's int4 kernel, as where kvtriton's CPU GEMV cannot be built."""
    import kvtriton.backend.models.int4 as int4

    monkeypatch.setattr(int4, "gemv_serves", lambda: False)


@pytest.fixture
def fresh_dynamo():
    """Every engine compiles the same layer functions, and dynamo keeps each code object's graphs until reset, up to
    its recompile_limit (8; fullgraph: past it a load fails). A server loads one engine; a test process loads many, so
    tests that build compiled engines start from a reset."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def default_model_folder() -> Path:
    from kvtriton.backend.models.default_model import ensure_default_model

    return ensure_default_model(progress=lambda *_: None)


def _variant(src: Path, dst: Path, **parameters: str) -> None:
    """Copy a model directory, overriding config.pbtxt parameters."""
    shutil.copytree(src, dst)
    set_parameters(dst / "config.pbtxt", parameters)


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory, default_model_folder) -> Path:
    """A random LoRA adapter of the default model (every projection, rank 8), saved as PEFT saves one."""
    from tests.lora_adapters import ALL_TARGETS, make_adapter

    return make_adapter(tmp_path_factory.mktemp("lora") / "test-lora", default_model_folder, targets=ALL_TARGETS,
                        rank=8, alpha=16, scale=0.5, seed=7)


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory, default_model_folder, lora_adapter):
    """tritonserver on the shipped `llm` model serving one LoRA adapter beside it (`test-lora`; base-model
    requests run as without it), plus `llm_small_kv`: the same model with a KV pool of 24 blocks (384 tokens),
    to show that requests queue when the pool is exhausted, scheduled by priority."""
    repo = tmp_path_factory.mktemp("model_repository")
    _variant(MODEL_REPOSITORY / "llm", repo / "llm", lora_modules=f"test-lora={lora_adapter}")
    _variant(MODEL_REPOSITORY / "llm", repo / "llm_small_kv", num_kv_blocks="24", max_model_len="384",
             max_num_seqs="8", scheduling_policy="priority")
    server = start_server(repo, timeout_s=300)
    yield server
    server.stop()
