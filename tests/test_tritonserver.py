"""kvtriton.backend.entrypoints.tritonserver: finding, starting, streaming through and stopping a real tritonserver."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kvtriton.backend.entrypoints import serve as serve_cmd
from kvtriton.backend.entrypoints import triton_install as ti
from kvtriton.backend.entrypoints import tritonserver as ts

from tests.triton_fixture import ECHO_REPOSITORY, start_server

TEXT = "hello streaming  world, from echo"
PIECES = ["hello ", "streaming  ", "world, ", "from ", "echo"]


# --- finding and preparing the server (no process started) ------------------------------------


def _fake_prefix(root: Path, with_backends: bool = True) -> Path:
    """A folder shaped like /opt/tritonserver with an executable bin/tritonserver."""
    binary = root / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    if with_backends:
        (root / "backends" / "python").mkdir(parents=True)
    return binary


def test_find_prefers_tritonserver_on_path(tmp_path, monkeypatch):
    binary = _fake_prefix(tmp_path / "opt")
    monkeypatch.setenv("PATH", f"{binary.parent}{os.pathsep}{os.environ['PATH']}")
    install = ti.find_tritonserver()
    assert install == ti.TritonInstall(binary=binary.resolve(), backend_dir=(tmp_path / "opt" / "backends").resolve(),
                                       source="PATH")


def test_find_rejects_path_install_without_backends(tmp_path, monkeypatch):
    binary = _fake_prefix(tmp_path / "opt", with_backends=False)
    monkeypatch.setenv("PATH", str(binary.parent))
    with pytest.raises(ti.TritonServerError, match="no backends folder"):
        ti.find_tritonserver()


def test_find_falls_back_to_the_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tritonserver here
    install = ti.find_tritonserver()
    assert install.source == "nvidia-pytriton"
    assert install.binary.is_file() and os.access(install.binary, os.X_OK)
    assert (install.backend_dir / "python" / "libtriton_python.so").is_file()


def test_find_without_any_install_names_both_ways_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pytriton" else real_find_spec(name, *a))
    with pytest.raises(ti.TritonServerError) as err:
        ti.find_tritonserver()
    message = str(err.value)
    assert "PATH" in message and "nvidia-pytriton==0.7.0" in message and "\n" not in message


def _fake_wheel(root: Path, versions: list[str]) -> ti.TritonInstall:
    for version in versions:
        stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        stub.parent.mkdir(parents=True)
        stub.write_bytes(f"stub for {version}".encode())
        stub.chmod(0o755)
    (root / "backends" / "python").mkdir(parents=True)
    return ti.TritonInstall(binary=root / "bin" / "tritonserver", backend_dir=root / "backends",
                            source="nvidia-pytriton")


def test_prepare_python_stub_copies_the_matching_stub_once(tmp_path):
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = _fake_wheel(tmp_path, ["3.8", version])
    dest = ti.prepare_python_stub(install)
    assert dest == tmp_path / "backends" / "python" / "triton_python_backend_stub"
    assert dest.read_bytes() == f"stub for {version}".encode() and os.access(dest, os.X_OK)
    before = dest.stat().st_mtime_ns
    time.sleep(0.01)
    ti.prepare_python_stub(install)
    assert dest.stat().st_mtime_ns == before  # idempotent: not copied again
    assert sorted(p.name for p in dest.parent.iterdir()) == ["triton_python_backend_stub"]  # no temp file left


def test_prepare_python_stub_replaces_a_stub_for_another_python(tmp_path):
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    install = _fake_wheel(tmp_path, [version])
    (tmp_path / "backends" / "python" / "triton_python_backend_stub").write_bytes(b"stale stub")
    assert ti.prepare_python_stub(install).read_bytes() == f"stub for {version}".encode()


def test_prepare_python_stub_without_a_stub_for_this_python_says_which_exist(tmp_path):
    install = _fake_wheel(tmp_path, ["3.8", "3.9"])
    with pytest.raises(ti.TritonServerError, match=r"no Python backend stub for Python 3\.\d+ \(it has: 3\.8, 3\.9\)"):
        ti.prepare_python_stub(install)


def test_free_ports_are_distinct_and_bindable():
    ports = ts.free_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as s:
            s.bind(("0.0.0.0", port))


def test_server_command_and_env(tmp_path, monkeypatch):
    install = ti.TritonInstall(binary=Path("/x/bin/tritonserver"), backend_dir=Path("/x/backends"), source="PATH")
    command = ts.server_command(install, tmp_path, 1, 2, 3, "pfx_", extra_args=("--log-verbose=1",))
    assert command[0] == "/x/bin/tritonserver"
    assert f"--model-repository={tmp_path.resolve()}" in command
    assert {"--backend-directory=/x/backends", "--http-port=1", "--grpc-port=2", "--metrics-port=3"} <= set(command)
    assert "--backend-config=python,shm-region-prefix-name=pfx_" in command
    assert command[-1] == "--log-verbose=1"
    with pytest.raises(ti.TritonServerError, match="would override --http-port"):
        ts.server_command(install, tmp_path, 1, 2, 3, "pfx_", extra_args=("--http-port=9",))

    monkeypatch.setenv("LD_LIBRARY_PATH", "/already/there")
    env = ti.server_env()
    assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == ["/already/there", sysconfig.get_config_var("LIBDIR")]


def test_start_refuses_a_busy_port_before_launching(tmp_path):
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        server = ts.TritonServer(ECHO_REPOSITORY, http_port=busy.getsockname()[1], log_path=tmp_path / "log")
        with pytest.raises(ts.TritonServerError, match=rf"HTTP port {busy.getsockname()[1]} is already in use"):
            server.start()
        assert server.process is None


# --- kvtriton serve options -------------------------------------------------------------------


def test_main_with_missing_repository_exits_nonzero_and_says_why(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert serve_cmd.main(["--model-repository", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"--model-repository {missing} does not exist" in err and "config.pbtxt" in err


# --- a real server ----------------------------------------------------------------------------


def _shm_files(server: ts.TritonServer) -> list[str]:
    return glob.glob(f"/dev/shm/{server.shm_prefix}*")


@pytest.fixture(scope="module")
def echo_server():
    server = start_server(ECHO_REPOSITORY)
    yield server
    server.stop()


@pytest.mark.server
def test_grpc_stream_returns_the_text_in_pieces(echo_server):
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(echo_server.grpc_url)
    text_input = grpcclient.InferInput("text_input", [1], "BYTES")
    text_input.set_data_from_numpy(np.array([TEXT.encode()], dtype=np.object_))
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("echo", [text_input], enable_empty_final_response=True)
        pieces = []
        while True:
            result, error = results.get(timeout=10)
            assert error is None, error
            output = result.as_numpy("text_output")
            if output is not None:
                pieces.append(output.reshape(-1)[0].decode())
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    assert pieces == PIECES


@pytest.mark.server
def test_http_sse_stream_returns_the_text_in_pieces(echo_server):
    request = urllib.request.Request(
        f"{echo_server.http_url}/v2/models/echo/generate_stream",
        data=json.dumps({"text_input": TEXT}).encode(), headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(line[len(b"data: "):]) for line in response if line.startswith(b"data: ")]
    assert [event["text_output"] for event in events] == PIECES


@pytest.mark.server
def test_health_and_metrics_endpoints_answer(echo_server):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/echo/ready"):
        with urllib.request.urlopen(echo_server.http_url + path, timeout=5) as response:
            assert response.status == 200, path
    with urllib.request.urlopen(echo_server.metrics_url, timeout=5) as response:
        metrics = response.read().decode()
    assert 'nv_inference_request_success{model="echo",version="1"}' in metrics
    assert echo_server.ready_models() == [("echo", "1")]


@pytest.mark.server
def test_stop_leaves_no_process_and_no_shm(tmp_path):
    with ts.TritonServer(ECHO_REPOSITORY, log_path=tmp_path / "server.log", ready_timeout_s=60) as server:
        pid = server.process.pid
        assert _shm_files(server), "the Python backend should have made its shm region under our prefix"
        assert len(ts.live_group_members(pid)) >= 2  # server + the echo model's stub
    assert server.exit_code() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert ts.live_group_members(pid) == []
    assert _shm_files(server) == []


def _repository_with(tmp_path: Path, initialize_body: str) -> Path:
    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    (model / "1" / "model.py").write_text(
        f"class TritonPythonModel:\n    def initialize(self, args):\n        {initialize_body}\n")
    return tmp_path / "repo"


@pytest.mark.server
def test_a_model_that_fails_to_initialize_fails_start_fast_with_the_log(tmp_path):
    server = ts.TritonServer(_repository_with(tmp_path, 'raise RuntimeError("broken on purpose")'),
                             log_path=tmp_path / "log")
    started = time.monotonic()
    server.start()
    try:
        never_ready = r"(?s)exited with code 1 before it was ready.*broken on purpose"
        with pytest.raises(ts.TritonServerError, match=never_ready):
            server.wait_ready(timeout_s=60)
        assert time.monotonic() - started < 30
    finally:
        server.stop()
    assert _shm_files(server) == []


@pytest.mark.server
def test_a_server_that_never_gets_ready_times_out_and_is_killed_cleanly(tmp_path):
    server = ts.TritonServer(_repository_with(tmp_path, "import time; time.sleep(600)"), log_path=tmp_path / "log")
    server.start()
    try:
        with pytest.raises(ts.TritonServerError, match=r"(?s)not ready after 3 s .*loading: broken:1"):
            server.wait_ready(timeout_s=3)
    finally:
        server.stop(grace_s=2)  # Triton waits for the loading model; SIGKILL must clean up anyway
    assert ts.live_group_members(server.process.pid) == []
    assert _shm_files(server) == []


@pytest.mark.server
def test_serve_calls_on_ready_with_the_live_server_and_returns_zero_on_ctrl_c(tmp_path, capsys):
    seen = {}

    def on_ready(server):
        seen["models"] = server.ready_models()
        seen["server"] = server
        os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C in the terminal does
        time.sleep(5)  # the handler interrupts this

    http, grpc, metrics = ts.free_ports(3)
    options = serve_cmd.parse_args(["--model-repository", str(ECHO_REPOSITORY), "--log-file", str(tmp_path / "log"),
                             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)])
    previous = signal.getsignal(signal.SIGINT)
    assert serve_cmd.serve(options, on_ready=on_ready) == 0
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored
    assert seen["models"] == [("echo", "1")]
    assert seen["server"].exit_code() is not None and _shm_files(seen["server"]) == []
    assert "SIGINT: stopping tritonserver" in capsys.readouterr().out


@pytest.mark.server
def test_serve_as_a_process_stops_cleanly_on_sigterm(tmp_path):
    """What `docker stop` does to the container's `kvtriton serve`."""
    http, grpc, metrics = ts.free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvtriton.backend.entrypoints.serve", "--model-repository", str(ECHO_REPOSITORY),
         "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
         "--log-file", str(tmp_path / "server.log"), "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        banner = []
        for line in proc.stdout:
            banner.append(line)
            if line.startswith("Ctrl-C stops the server"):
                break
        output = "".join(banner)
        assert f"HTTP     http://127.0.0.1:{http}" in output, output
        assert f"gRPC     127.0.0.1:{grpc}" in output and f"metrics  http://127.0.0.1:{metrics}/metrics" in output
        assert "models   echo (v1)" in output
        assert ts._http_status(f"http://127.0.0.1:{http}/v2/health/ready") == 200
        proc.send_signal(signal.SIGTERM)
        rest = proc.stdout.read()
        assert proc.wait(timeout=30) == 0, rest
    finally:
        if proc.poll() is None:  # SIGTERM first: a SIGKILLed serve would orphan its tritonserver
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert "SIGTERM: stopping tritonserver" in rest
    assert ts._http_status(f"http://127.0.0.1:{http}/v2/health/ready") is None  # nothing listens any more
