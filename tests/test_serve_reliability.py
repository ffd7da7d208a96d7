"""`kvtriton serve` against faults, on the echo model (fast): the oversize HTTP body, a crashed tritonserver,
a killed stub, the admin APIs behind the key, and the loopback-only default. Each test ends with a good
request answered."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import time

import pytest

from kvtriton.backend.entrypoints import tritonserver as ts

from tests.reliability_figures import figures  # noqa: F401 (a fixture)
from tests.serve_process import ADMIN_KEY, ServeProcess
from tests.triton_fixture import ECHO_REPOSITORY

pytestmark = [pytest.mark.server, pytest.mark.reliability]

# Over half of an 8 MB thread stack: the size at which Triton 2.51's HTTP server crashes on a form body.
OVERSIZE = 4 * 1024 * 1024 + 100


def good_request(serve: ServeProcess, text: str = "still serving") -> None:
    status, body = serve.http("/v2/models/echo/generate_stream", json.dumps({"text_input": text}).encode(),
                              {"Content-Type": "application/json"})
    assert status == 200, body


def form_body(size: int) -> bytes:
    """What `curl --data-binary @body.json` sends: JSON under curl's default form content type."""
    return json.dumps({"text_input": "x" * (size - 20)}).encode()


def post_form(serve: ServeProcess, body: bytes):
    return serve.http("/v2/models/echo/generate", body, {"Content-Type": "application/x-www-form-urlencoded"})


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    with ServeProcess(ECHO_REPOSITORY, tmp_path_factory.mktemp("guarded"), extra=["--http-max-body-mb", "8"]) as serve:
        yield serve


def test_an_oversize_form_encoded_body_is_answered_and_the_server_lives(guarded, figures):
    started = time.monotonic()
    status, body = post_form(guarded, form_body(OVERSIZE))
    figures["oversize body (4 MB, form-encoded): answered in s"] = round(time.monotonic() - started, 2)
    assert status == 200 and len(body["text_output"]) == OVERSIZE - 20  # read as the JSON it is
    status, body = post_form(guarded, form_body(9 * 1024 * 1024))  # over --http-max-body-mb
    assert status == 413 and "at most 8388608" in body["error"]
    assert ts.python_stubs(guarded.tritonserver_pid())  # the same server, still there
    assert "restarting" not in guarded.output
    good_request(guarded)


def test_without_the_guard_that_body_crashes_triton_and_the_supervisor_restarts_it(tmp_path, figures):
    """The cause, shown: Triton's own HTTP endpoint dies on the body; serve logs why and restarts it."""
    with ServeProcess(ECHO_REPOSITORY, tmp_path, extra=["--no-http-guard"]) as serve:
        first = serve.tritonserver_pid()
        with pytest.raises(OSError):  # the connection dies with the server
            post_form(serve, form_body(OVERSIZE))
        crashed = time.monotonic()
        serve.wait_for_output("tritonserver was killed by SIGSEGV while serving")
        serve.wait_for_output("tritonserver is ready again")
        figures["tritonserver crash (SIGSEGV): back in s"] = round(time.monotonic() - crashed, 2)
        assert serve.tritonserver_pid() != first
        good_request(serve)


def test_a_killed_stub_is_seen_and_the_server_restarted(guarded, figures):
    lines = len(guarded.lines)
    [(pid, (model, instance))] = guarded.stub_pids().items()
    assert (model, instance) == ("echo", "echo_0_0")
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    guarded.wait_for_output("the Python stub of model echo (instance echo_0_0", after=lines)
    detected = time.monotonic() - killed
    guarded.wait_for_output("tritonserver is ready again", after=lines)
    figures["echo stub killed: detected in s"] = round(detected, 2)
    figures["echo stub killed: back in s"] = round(time.monotonic() - killed, 2)
    assert detected < 2
    good_request(guarded)


def test_admin_apis_need_the_key_and_the_rest_stays_open(guarded):
    index = "/v2/repository/index"
    status, body = guarded.http(index, b"{}")
    assert status == 403 and "kvtriton-admin-key" in body["error"]
    status, body = guarded.http(index, b"{}", {"kvtriton-admin-key": ADMIN_KEY})
    assert status == 200 and body[0]["name"] == "echo"
    for path in ("/v2/logging", "/v2/systemsharedmemory/status", "/v2/models/echo/stats", "/v2/trace/setting"):
        assert guarded.http(path)[0] == 403, path
    for path in ("/v2/health/ready", "/v2/models/echo", "/v2/models/echo/config", "/v2"):
        assert guarded.http(path)[0] == 200, path
    assert "models   echo (v1)" in guarded.output  # serve's own use of the repository API carries the key
    assert "admin    shared-memory, logging, trace, statistics, model-repository: open with header" in guarded.output

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(guarded.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_model_repository_index()
    key = {"triton-grpc-protocol-kvtriton-admin-key": ADMIN_KEY}
    assert client.get_model_repository_index(headers=key).models[0].name == "echo"
    assert client.is_model_ready("echo")
    client.close()


def _listening_addresses(port: int) -> set[str]:
    """The local addresses of TCP sockets listening on `port`, from /proc/net/tcp and tcp6 (IPv4-mapped IPv6
    addresses as IPv4)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for row in list(f)[1:]:
                local, state = row.split()[1], row.split()[3]
                hex_address, hex_port = local.split(":")
                if state != "0A" or int(hex_port, 16) != port:
                    continue
                # The kernel prints each 32-bit word in host (little-endian) order.
                raw = b"".join(bytes.fromhex(hex_address[i:i + 8])[::-1] for i in range(0, len(hex_address), 8))
                address = ipaddress.ip_address(raw)
                found.add(str(getattr(address, "ipv4_mapped", None) or address))
    return found


def test_every_port_listens_on_loopback_only_by_default(guarded):
    for port in (guarded.http_port, guarded.grpc_port, guarded.metrics_port):
        assert _listening_addresses(port) == {"127.0.0.1"}, port
    good_request(guarded)
