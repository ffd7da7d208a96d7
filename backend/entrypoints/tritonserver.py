"""Run a real ``tritonserver`` process: start it, wait until it is ready, stop it.

``TritonServer`` owns one server process and everything it leaves behind: the
process group (the server plus its Python-backend stubs) and the shared-memory
files under a prefix unique to the instance. Which binary runs, and in what
environment, is triton_install.py's. ``main``/``serve`` are ``kvtriton serve``.
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from kvtriton.backend.entrypoints.triton_install import (
    TritonInstall,
    TritonServerError,
    find_tritonserver,
    prepare_python_stub,
    server_env,
)

# Where the server listens unless told otherwise, and how we reach it when it listens on every address:
# IPv4 loopback ("localhost" may try ::1 first).
HOST = "127.0.0.1"
_ANY_ADDRESS = ("0.0.0.0", "::")
# The APIs behind the admin key (Triton's names): they change or reveal server state. Health, metadata,
# model-config and inference stay open: clients (tritonclient, perf_analyzer, genai-perf) need them.
ADMIN_APIS = ("shared-memory", "logging", "trace", "statistics", "model-repository")
# The header that carries the admin key. Over gRPC Triton expects it as metadata
# "triton-grpc-protocol-<ADMIN_KEY_HEADER>".
ADMIN_KEY_HEADER = "kvtriton-admin-key"
# Triton gives in-flight requests this long after SIGTERM; it must stay below STOP_GRACE_S
# so a clean shutdown (models finalized, stubs gone, shm released) beats our SIGKILL.
_TRITON_EXIT_TIMEOUT_S = 10
STOP_GRACE_S = 15.0
_OWNED_FLAGS = ("--model-repository", "--backend-directory", "--http-port", "--grpc-port", "--metrics-port",
                "--http-address", "--grpc-address", "--metrics-address")
_RESTRICTION_FLAGS = ("--http-restricted-api", "--grpc-restricted-protocol")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free right now (all held open together, so they differ)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def server_command(
    install: TritonInstall,
    model_repository: str | os.PathLike,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    shm_prefix: str,
    extra_args: Sequence[str] = (),
    host: str = HOST,
    http_host: str | None = None,
    admin_key: str | None = None,
) -> list[str]:
    """The tritonserver command line; ``extra_args`` may add flags, not replace the ones we own.

    gRPC and metrics listen on ``host``, HTTP on ``http_host`` (default ``host``). With ``admin_key``, the
    ADMIN_APIS answer only requests that carry it (ADMIN_KEY_HEADER).
    """
    owned = _OWNED_FLAGS + (_RESTRICTION_FLAGS if admin_key is not None else ())
    for arg in extra_args:
        flag = arg.split("=", 1)[0]
        if flag in owned:
            raise TritonServerError(
                f"extra tritonserver argument {arg!r} would override {flag}, which kvtriton sets itself "
                "(readiness is polled on the ports it chose, the admin APIs are restricted by its key); "
                "use kvtriton serve's own option instead"
            )
    restrictions = []
    if admin_key is not None:
        if not admin_key or any(c in admin_key for c in ",:= \t\n"):
            raise TritonServerError("the admin key must be non-empty, without spaces, ',', ':' or '='")
        rule = f"{','.join(ADMIN_APIS)}:{ADMIN_KEY_HEADER}={admin_key}"
        restrictions = [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]
    return [
        str(install.binary),
        f"--model-repository={Path(model_repository).resolve()}",
        f"--backend-directory={install.backend_dir}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        f"--http-address={http_host or host}",
        f"--grpc-address={host}",
        f"--metrics-address={host}",
        *restrictions,
        # Per-instance prefix: servers side by side never share regions, and stop() can
        # remove exactly this server's files if it had to be killed.
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
        f"--exit-timeout-secs={_TRITON_EXIT_TIMEOUT_S}",
        *extra_args,
    ]


class TritonServer:
    """One tritonserver process on a model repository.

    Invariant: after ``stop()`` (or leaving the ``with`` block, or interpreter exit),
    no process of this server's group is alive and no ``/dev/shm/<shm_prefix>*``
    file remains. Ports left as None are picked free. It listens on ``host`` (loopback unless told
    otherwise; HTTP on ``http_host`` if given); with ``admin_key`` the ADMIN_APIS are restricted, and
    this object's own calls to them carry the key.
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        *,
        install: TritonInstall | None = None,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log_path: str | os.PathLike | None = None,
        extra_args: Sequence[str] = (),
        ready_timeout_s: float = 300.0,
        host: str = HOST,
        http_host: str | None = None,
        admin_key: str | None = None,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.host, self.http_host, self.admin_key = host, http_host or host, admin_key
        self.install = install if install is not None else find_tritonserver()
        picked = iter(free_ports([http_port, grpc_port, metrics_port].count(None)))
        self.http_port = http_port if http_port is not None else next(picked)
        self.grpc_port = grpc_port if grpc_port is not None else next(picked)
        self.metrics_port = metrics_port if metrics_port is not None else next(picked)
        self.shm_prefix = f"kvtriton{os.getpid()}_{secrets.token_hex(4)}_"
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.extra_args = tuple(extra_args)
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._log_offset = 0  # where this server's part of the log starts (a log file may be reused)

    @property
    def http_url(self) -> str:
        return f"http://{connect_host(self.http_host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """A gRPC target (host:port, no scheme), as tritonclient.grpc expects."""
        return f"{connect_host(self.host)}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that open the restricted ADMIN_APIS (none when they are not restricted)."""
        return {ADMIN_KEY_HEADER: self.admin_key} if self.admin_key is not None else {}

    def command(self) -> list[str]:
        return server_command(
            self.install, self.model_repository, self.http_port, self.grpc_port, self.metrics_port,
            self.shm_prefix, self.extra_args, self.host, self.http_host, self.admin_key,
        )

    def start(self) -> None:
        if self.process is not None:
            raise TritonServerError("this TritonServer was already started; make a new one")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a folder; "
                                    "pass the folder holding <model>/config.pbtxt")
        for name, port in (("HTTP", self.http_port), ("gRPC", self.grpc_port), ("metrics", self.metrics_port)):
            _check_port_free(name, port)
        command = self.command()
        prepare_python_stub(self.install)
        self._log_file = open(self.log_path, "ab")
        self._log_offset = self._log_file.tell()
        # Own session: a terminal's Ctrl-C reaches only us, so stop() alone decides how the
        # server shuts down, and killpg(pid) reaches the stubs as well.
        self.process = subprocess.Popen(
            command, env=server_env(), stdin=subprocess.DEVNULL,
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        atexit.register(self.stop)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until ``/v2/health/ready`` answers 200 from *our* live process.

        Raises at once if the process exits (e.g. a model failed to load), and after
        ``timeout_s`` if it is alive but not ready (e.g. a stub that cannot start).
        """
        if self.process is None:
            raise TritonServerError("wait_ready() before start()")
        timeout_s = self.ready_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while True:
            # Alive check both before and after the poll: another server on the same
            # port can answer ready while ours has died.
            self._raise_if_exited("before it was ready")
            if _http_status(f"{self.http_url}/v2/health/ready") == 200:
                self._raise_if_exited("before it was ready")
                return
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout_s:.0f} s (model states: {self._model_states()}); "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def ready_models(self) -> list[tuple[str, str]]:
        """(name, version) of every READY model, from the repository index."""
        index = _request_json(f"{self.http_url}/v2/repository/index", post=True, headers=self.admin_headers)
        return [(m["name"], m.get("version", "")) for m in index if m.get("state") == "READY"]

    def model_ready(self, name: str) -> bool:
        return _http_status(f"{self.http_url}/v2/models/{name}/ready") == 200

    def server_version(self) -> str:
        return _request_json(f"{self.http_url}/v2").get("version", "unknown")

    def exit_code(self) -> int | None:
        """None while the server runs; its exit status once it has exited."""
        return None if self.process is None else self.process.poll()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM, up to ``grace_s`` for a clean exit, then SIGKILL; always removes shm files. Idempotent."""
        atexit.unregister(self.stop)
        process = self.process
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(grace_s)
                except subprocess.TimeoutExpired:
                    pass
            # Stubs outlive a killed server, holding its shm (and GPU memory). Linux reuses no
            # pid while a process group of that id has members, so this reaches only our group.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            process.wait()
            # SIGKILL is asynchronous: return only once the stubs are gone, so a server started
            # next finds their memory free.
            deadline = time.monotonic() + 5.0
            while live_group_members(process.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
        for path in glob.glob(f"/dev/shm/{glob.escape(self.shm_prefix)}*"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 30) -> str:
        """Error lines of this server's log first (Triton's table dumps bury them), then its last ``lines`` lines."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                text = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log written)"
        errors = [l for l in text if (l.startswith("E") and l[1:5].isdigit()) or l.startswith("error:")]
        parts = []
        if errors:
            parts.append("errors:\n" + "\n".join(errors[-10:]))
        parts.append("last lines:\n" + "\n".join(l for l in text[-lines:] if not l.startswith(("|", "+"))))
        return "\n".join(parts)

    def _raise_if_exited(self, when: str) -> None:
        code = self.exit_code()
        if code is not None:
            raise TritonServerError(f"tritonserver exited with code {code} {when}; "
                                    f"log {self.log_path}:\n{self.log_tail()}")

    def _model_states(self) -> str:
        try:
            index = _request_json(f"{self.http_url}/v2/repository/index", post=True, headers=self.admin_headers)
        except (OSError, ValueError):
            return "unknown, HTTP is not open yet: Triton opens it once every model has loaded"
        states = (f"{m['name']}={m.get('state', '?')} {m.get('reason', '')}".strip() for m in index)
        return ", ".join(states) or "no models"

    def __enter__(self) -> "TritonServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def connect_host(host: str) -> str:
    """The address to reach a server listening on ``host``: loopback for the any-address."""
    return HOST if host in _ANY_ADDRESS else host


def live_group_members(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes in process group ``pgid``: a server and its stubs."""
    members = []
    for stat_file in glob.glob("/proc/[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses; the fields after the last ")" do not.
            state, _ppid, pgrp = Path(stat_file).read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue  # the process exited while we looked
        if int(pgrp) == pgid and state != "Z":
            members.append(int(Path(stat_file).parent.name))
    return members


def _check_port_free(name: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # SO_REUSEADDR as the server uses it: sockets in TIME_WAIT do not count as busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError as e:
            raise TritonServerError(
                f"{name} port {port} is already in use ({e.strerror}); stop whatever holds it or choose another port "
                f"(kvtriton serve --{name.lower()}-port)"
            ) from None


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def python_stubs(pgid: int) -> dict[int, tuple[str, str]]:
    """pid -> (model, instance name such as llm_0_0) of every live Python-backend stub of a server's group.

    From the stub's command line as Triton 2.51 writes it: the stub, <repository>/<model>/<version>/model.py,
    shm region, shm sizes, parent pid, backend folder, IPC handle, instance name, ...
    """
    stubs = {}
    for pid in live_group_members(pgid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[0].endswith("triton_python_backend_stub") and len(argv) > 1:
            model = Path(argv[1]).parent.parent.name
            stubs[pid] = (model, argv[8] if len(argv) > 8 else model)
    return stubs


def _request_json(url: str, post: bool = False, headers: dict[str, str] | None = None):
    data = b"{}" if post else None  # the repository index is a POST with an empty JSON body
    request = urllib.request.Request(url, data=data, headers=headers or {})
    with urllib.request.urlopen(request, timeout=5.0) as response:
        return json.loads(response.read())
