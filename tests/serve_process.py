"""Test helper: `kvtriton serve` as a child process (as compose runs it), its output collected as it comes.

    with ServeProcess(repository, tmp_path, extra=["--no-http-guard"]) as serve:
        serve.http_url, serve.grpc_url, serve.metrics_url
        serve.wait_for_output("restarting tritonserver")
        serve.tritonserver_pid(), serve.stub_pids()

Stopped with SIGTERM (what `docker stop` sends), so that serve stops its tritonserver itself.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from kvtriton.backend.entrypoints import tritonserver as ts

ADMIN_KEY = "test-admin-key-0123456789"


class ServeProcess:
    def __init__(self, repository: Path, log_dir: Path, extra: list[str] = (), timeout_s: float = 240,
                 admin_key: str | None = ADMIN_KEY):
        self.repository = Path(repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = ts.free_ports(3)
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = Path(log_dir) / f"tritonserver-{self.http_port}.log"
        self.command = [sys.executable, "-m", "kvtriton.backend.entrypoints.serve",
                        "--model-repository", str(self.repository), "--http-port", str(self.http_port),
                        "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
                        "--log-file", str(self.log_path), "--timeout", str(timeout_s), *extra]
        self.env = {k: v for k, v in os.environ.items() if k != "KVTRITON_ADMIN_KEY"}
        if admin_key is not None:
            self.env["KVTRITON_ADMIN_KEY"] = admin_key
        self.timeout_s = timeout_s
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServeProcess":
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        threading.Thread(target=self._collect, daemon=True).start()
        try:
            self.wait_for_output("Ctrl-C stops the server", timeout_s=self.timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _collect(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_output(self, text: str, timeout_s: float = 120, after: int = 0) -> float:
        """Seconds until `text` appears in the output (from line `after` on); fails if serve exits first."""
        started = time.monotonic()
        while not any(text in line for line in self.lines[after:]):
            if self.proc.poll() is not None:
                time.sleep(0.2)  # the reader thread may still hold the last lines
                raise AssertionError(f"kvtriton serve exited ({self.proc.returncode}) before {text!r}:\n{self.output}")
            if time.monotonic() - started > timeout_s:
                raise AssertionError(f"no {text!r} after {timeout_s} s:\n{self.output}")
            time.sleep(0.05)
        return time.monotonic() - started

    def tritonserver_pid(self) -> int:
        """The tritonserver serving now (serve restarts it under a new pid)."""
        for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                argv = Path(cmdline).read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"tritonserver") and f"--grpc-port={self.grpc_port}".encode() in argv:
                return int(Path(cmdline).parent.name)
        raise AssertionError("no tritonserver of this kvtriton serve is running")

    def stub_pids(self) -> dict[int, tuple[str, str]]:
        return ts.python_stubs(self.tritonserver_pid())

    def http(self, path: str, body: bytes | None = None, headers: dict | None = None,
             timeout: float = 60) -> tuple[int, dict | str]:
        request = urllib.request.Request(self.http_url + path, data=body, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            # serve did not stop its tritonserver: take the whole tree down.
            try:
                ts_pid = self.tritonserver_pid()
                os.killpg(ts_pid, signal.SIGKILL)
            except (AssertionError, ProcessLookupError):
                pass
            self.proc.kill()
            self.proc.wait()
