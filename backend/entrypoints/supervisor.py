"""Supervisor: keeps one tritonserver serving. It starts it, watches it, and restarts it with backoff.

What it watches, every POLL_INTERVAL_S:
- the server process: an exit while serving (a crash such as SIGSEGV, an OOM kill) is a failure;
- its Python-backend stubs. Triton 2.51 does not restart the stub of a decoupled model (its Python
  backend leaves "restart on decoupled" as a TODO): after the stub dies the model stays READY, its
  in-flight requests never end and new ones fail. So a stub that is gone while its model is still
  ready is a failure. The llm model's stub exits on purpose when its engine has failed
  (kvtriton.backend.triton.model), which lands here too.

On a failure it says why (with the server log's error lines), stops what is left of the server (its
clients get a connection error, not silence), waits out the backoff and starts a new server on the same
ports. The first restart is immediate; failures in a row wait 1, 2, 4 ... up to `max_delay_s`; a server
that stayed up for `reset_after_s` starts the count again.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import Callable

from kvtriton.backend.entrypoints.triton_install import TritonServerError
from kvtriton.backend.entrypoints.tritonserver import TritonServer, python_stubs

POLL_INTERVAL_S = 0.25
# A server being replaced after a failure gets this long to exit on SIGTERM before SIGKILL: its in-flight
# requests may be stuck on a dead stub, and every second here is downtime.
RESTART_STOP_GRACE_S = 1.0


@dataclass(frozen=True)
class RestartPolicy:
    max_delay_s: float = 30.0
    reset_after_s: float = 60.0

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait before restart number `attempt` of a run of failures (0: the first)."""
        return 0.0 if attempt == 0 else min(self.max_delay_s, 2.0 ** (attempt - 1))


class Supervisor:
    """Owns the current TritonServer (`server`), made by `make_server()` for the first start and every restart."""

    def __init__(self, make_server: Callable[[], TritonServer], say: Callable[[str], None],
                 policy: RestartPolicy = RestartPolicy(), restart: bool = True):
        self._make_server, self._say, self.policy, self.restart = make_server, say, policy, restart
        self.server: TritonServer | None = None
        self.recovery_times_s: list[float] = []  # failure seen -> new server ready, per restart
        self._stubs: dict[int, tuple[str, str]] = {}

    def start(self) -> TritonServer:
        """The first start: raises TritonServerError (with the log) if the server does not get ready."""
        self.server = self._make_server()
        self.server.start()
        self.server.wait_ready()
        self._stubs = python_stubs(self.server.process.pid)
        return self.server

    def run(self) -> None:
        """Watch and restart, until interrupted (a signal handler raising); raises TritonServerError on a
        failure when restarts are off."""
        attempt, up_since = 0, time.monotonic()
        while True:
            reason = self.failure()
            if reason is None:
                time.sleep(POLL_INTERVAL_S)
                continue
            failed_at = time.monotonic()
            if failed_at - up_since >= self.policy.reset_after_s:
                attempt = 0
            server = self.server
            if not self.restart:
                raise TritonServerError(f"{reason}; log {server.log_path}:\n{server.log_tail()}")
            self._say(f"kvtriton serve: {reason}; log {server.log_path}:\n{server.log_tail(lines=10)}")
            server.stop(grace_s=RESTART_STOP_GRACE_S)
            attempt = self._restart(attempt, failed_at)
            up_since = time.monotonic()

    def failure(self) -> str | None:
        """Why the current server is not serving, or None; one look."""
        server = self.server
        code = server.exit_code()
        if code is not None:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            return f"tritonserver {how} while serving"
        stubs = python_stubs(server.process.pid)
        live_instances = set(stubs.values())
        for pid, (model, instance) in self._stubs.items():
            if pid in stubs or (model, instance) in live_instances:
                continue
            if server.exit_code() is None and server.model_ready(model):
                return (f"the Python stub of model {model} (instance {instance}, pid {pid}) is gone while Triton "
                        "still reports the model ready (Triton 2.51 does not restart it)")
        self._stubs = stubs
        return None

    def _restart(self, attempt: int, failed_at: float) -> int:
        """Start servers until one is ready; returns the attempt count of this run of failures."""
        while True:
            delay = self.policy.delay_s(attempt)
            attempt += 1
            self._say(f"kvtriton serve: restarting tritonserver{f' in {delay:g} s' if delay else ''} "
                      f"(restart {len(self.recovery_times_s) + 1})")
            time.sleep(delay)
            server = self.server = self._make_server()
            try:
                server.start()
                server.wait_ready()
            except TritonServerError as exc:
                self._say(f"kvtriton serve: the restarted tritonserver did not get ready: {exc}")
                server.stop(grace_s=RESTART_STOP_GRACE_S)
                continue
            self._stubs = python_stubs(server.process.pid)
            self.recovery_times_s.append(time.monotonic() - failed_at)
            self._say(f"kvtriton serve: tritonserver is ready again, {self.recovery_times_s[-1]:.1f} s after the "
                      "failure")
            return attempt

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
