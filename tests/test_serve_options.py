"""`kvtriton serve`'s secure defaults and its supervisor's policy, without starting a server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvtriton.backend.entrypoints import serve as serve_cmd
from kvtriton.backend.entrypoints import triton_install as ti
from kvtriton.backend.entrypoints import tritonserver as ts
from kvtriton.backend.entrypoints.pbtxt_parameters import read_parameters
from kvtriton.backend.entrypoints.repository_overlay import grouped, overlay_repository
from kvtriton.backend.entrypoints.supervisor import RestartPolicy


def test_defaults_are_loopback_guarded_and_supervised(tmp_path, monkeypatch):
    monkeypatch.delenv("KVTRITON_ADMIN_KEY", raising=False)
    options = serve_cmd.parse_args(["--model-repository", str(tmp_path)])
    assert (options.host, options.http_guard, options.restart, options.admin_key) == ("127.0.0.1", True, True, None)
    assert options.http_max_body_mb == 64.0


def test_the_admin_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file-0123456789\n")
    monkeypatch.setenv("KVTRITON_ADMIN_KEY", "from-the-environment-0123")
    assert serve_cmd.parse_args(["--model-repository", str(tmp_path)]).admin_key == "from-the-environment-0123"
    options = serve_cmd.parse_args(["--model-repository", str(tmp_path), "--admin-key-file", str(key_file)])
    assert options.admin_key == "from-a-file-0123456789"
    with pytest.raises(serve_cmd.ServeError, match="--admin-key-file .*nowhere"):
        serve_cmd.parse_args(["--model-repository", str(tmp_path), "--admin-key-file", str(tmp_path / "nowhere")])


def test_the_openai_api_key_comes_with_the_openai_port(tmp_path, monkeypatch):
    key_file, repo = tmp_path / "key", ["--model-repository", str(tmp_path)]
    key_file.write_text("sk-local-1\n")
    monkeypatch.setenv("KVTRITON_API_KEY", "sk-from-env")
    assert serve_cmd.parse_args(repo).api_key is None  # no frontend, nothing to protect
    assert serve_cmd.parse_args([*repo, "--openai-port", "9000"]).api_key == "sk-from-env"
    from_file = serve_cmd.parse_args([*repo, "--openai-port", "9000", "--api-key-file", str(key_file)])
    assert from_file.api_key == "sk-local-1"
    with pytest.raises(serve_cmd.ServeError, match="--api-key-file is the OpenAI frontend's: give --openai-port"):
        serve_cmd.parse_args([*repo, "--api-key-file", str(key_file)])
    monkeypatch.setenv("KVTRITON_API_KEY", "two words")
    with pytest.raises(serve_cmd.ServeError, match="one word"):
        serve_cmd.parse_args([*repo, "--openai-port", "9000"])


def test_parse_args_defaults_and_passthrough(tmp_path):
    options = serve_cmd.parse_args(["--model-repository", str(tmp_path), "--", "--log-verbose=1", "--timeout", "5"])
    assert (options.http_port, options.grpc_port, options.metrics_port, options.timeout_s) == (8000, 8001, 8002, 300.0)
    assert options.extra_args == ("--log-verbose=1", "--timeout", "5")  # after --: tritonserver's, untouched


@pytest.mark.parametrize("argv, message", [
    (["--host", "localhost"], "--host 'localhost' is not an IP address"),
    (["--http-max-body-mb", "0"], "--http-max-body-mb 0.0 must be a positive"),
    (["--http-port", "70000"], "--http-port 70000 is not a TCP port"),
    (["--grpc-port", "8000"], "must differ"),
    (["--timeout", "0"], "--timeout 0.0 must be a positive"),
])
def test_bad_options_are_named(tmp_path, argv, message):
    with pytest.raises(serve_cmd.ServeError, match=message):
        serve_cmd.parse_args(["--model-repository", str(tmp_path), *argv])


def small_repository(root: Path) -> Path:
    """An llm model (config.pbtxt with one parameter, 1/model.py) and another model beside it."""
    for model in ("llm", "other"):
        (root / model / "1").mkdir(parents=True)
        (root / model / "config.pbtxt").write_text(
            'backend: "python"\nparameters { key: "max_num_seqs" value: { string_value: "64" } }\n')
        (root / model / "1" / "model.py").write_text("# the shim\n")
    return root


def test_model_and_engine_args_set_parameters_over_the_repository(tmp_path):
    repo = small_repository(tmp_path / "repo")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    gguf = str(tmp_path / "m.gguf")
    options = serve_cmd.parse_args(["--model-repository", str(repo), "--model", gguf, "--engine-arg",
                                    "scheduling_policy=priority", "--engine-arg", "other/max_num_seqs=8"])
    assert options.engine_args == (("llm", "model", str((tmp_path / "m.gguf").resolve())),
                                   ("llm", "scheduling_policy", "priority"), ("other", "max_num_seqs", "8"))
    overlay = overlay_repository(repo, grouped(options.engine_args))
    try:
        assert read_parameters(overlay / "llm" / "config.pbtxt") == {
            "max_num_seqs": "64", "model": str((tmp_path / "m.gguf").resolve()), "scheduling_policy": "priority"}
        assert read_parameters(overlay / "other" / "config.pbtxt") == {"max_num_seqs": "8"}
        assert (overlay / "llm" / "1").is_symlink()
        assert (overlay / "llm" / "1" / "model.py").read_text() == "# the shim\n"
        assert read_parameters(repo / "llm" / "config.pbtxt") == {"max_num_seqs": "64"}  # the original untouched
    finally:
        shutil.rmtree(overlay)
    assert (repo / "llm" / "1" / "model.py").is_file()  # removing the overlay removed links only
    untouched = overlay_repository(repo, {"llm": {"max_num_seqs": "2"}})
    assert (untouched / "other").is_symlink()  # a model without overrides is linked whole
    shutil.rmtree(untouched)


@pytest.mark.parametrize("arg, message", [
    ("max_num_seqs", "write KEY=VALUE"),
    ("max num=3", "write KEY=VALUE"),
    ('model=a"b', "cannot hold a quote"),
    ("draft/model=x", "names model 'draft', which .* does not hold \\(it holds: llm, other\\)"),
])
def test_bad_engine_args_are_named(tmp_path, arg, message):
    repo = small_repository(tmp_path)
    with pytest.raises(serve_cmd.ServeError, match=message):
        serve_cmd.parse_args(["--model-repository", str(repo), "--engine-arg", arg])


def test_a_short_admin_key_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTRITON_ADMIN_KEY", "short")
    with pytest.raises(serve_cmd.ServeError, match="at least 16 characters"):
        serve_cmd.parse_args(["--model-repository", str(tmp_path)])


def test_the_command_binds_the_host_and_restricts_the_admin_apis():
    install = ti.TritonInstall(binary=Path("/x/bin/tritonserver"), backend_dir=Path("/x/backends"), source="PATH")
    command = ts.server_command(install, "/repo", 1, 2, 3, "p_", host="0.0.0.0", http_host="127.0.0.1",
                                admin_key="k" * 20)
    assert {"--http-address=127.0.0.1", "--grpc-address=0.0.0.0", "--metrics-address=0.0.0.0"} <= set(command)
    rule = "shared-memory,logging,trace,statistics,model-repository:kvtriton-admin-key=" + "k" * 20
    assert f"--http-restricted-api={rule}" in command and f"--grpc-restricted-protocol={rule}" in command
    plain = ts.server_command(install, "/repo", 1, 2, 3, "p_")
    assert "--http-address=127.0.0.1" in plain and not any("restricted" in arg for arg in plain)
    for flag in ("--http-address=0.0.0.0", "--grpc-restricted-protocol=health:a=b"):
        with pytest.raises(ts.TritonServerError, match="would override"):
            ts.server_command(install, "/repo", 1, 2, 3, "p_", extra_args=(flag,), admin_key="k" * 20)


def test_a_server_reached_on_any_address_is_asked_on_loopback(tmp_path):
    server = ts.TritonServer("/", install=ti.TritonInstall(Path("/x"), Path("/y"), "PATH"), http_port=1, grpc_port=2,
                             metrics_port=3, host="0.0.0.0", admin_key="k" * 20, log_path=tmp_path / "log")
    assert (server.http_url, server.grpc_url) == ("http://127.0.0.1:1", "127.0.0.1:2")
    assert server.admin_headers == {"kvtriton-admin-key": "k" * 20}


def test_restart_backoff_is_immediate_then_doubles_up_to_the_cap():
    policy = RestartPolicy(max_delay_s=30.0)
    assert [policy.delay_s(i) for i in range(8)] == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
