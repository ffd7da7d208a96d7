"""`kvtriton serve`: start tritonserver on a model repository, wait for readiness, serve until Ctrl-C.

Locally the binary comes from the nvidia-pytriton wheel; in NVIDIA's image it
is the `tritonserver` on PATH (see kvtriton.backend.entrypoints.tritonserver). With
`--demo PROMPT`, once the models are ready one streamed answer from the `llm`
model is printed through the server itself, as the README's first command shows.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from kvtriton.backend.entrypoints.tritonserver import TritonServer, TritonServerError, find_tritonserver


class ServeError(ValueError):
    """A ``kvtriton serve`` option that cannot work; the message names the option."""


@dataclass(frozen=True)
class ServeOptions:
    model_repository: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    timeout_s: float = 300.0
    log_file: Path | None = None
    extra_args: tuple[str, ...] = ()  # passed to tritonserver as they are
    demo: str | None = None  # a prompt to answer through the server once it is ready

    def __post_init__(self) -> None:
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        for flag, port in ports.items():
            if not 1 <= port <= 65535:
                raise ServeError(f"{flag} {port} is not a TCP port; use 1-65535")
        if len(set(ports.values())) != 3:
            raise ServeError(f"--http-port, --grpc-port and --metrics-port must differ, got {list(ports.values())}")
        if not self.timeout_s > 0:
            raise ServeError(f"--timeout {self.timeout_s} must be a positive number of seconds")
        repo = Path(self.model_repository)
        if not repo.is_dir():
            what = "is not a folder" if repo.exists() else "does not exist"
            raise ServeError(
                f"--model-repository {repo.resolve()} {what}; pass the folder that holds <model>/config.pbtxt "
                "(kvtriton build writes one)"
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtriton serve",
        description="Start tritonserver on a model repository, wait until its models are ready, serve until Ctrl-C.",
        epilog="Arguments after -- go to tritonserver unchanged, e.g. -- --log-verbose=1",
    )
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"),
                        help="folder of <model>/config.pbtxt (default: ./model_repository)")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness (default 300)")
    parser.add_argument("--log-file", type=Path, default=None, help="tritonserver's output (default: a temp file)")
    parser.add_argument("--demo", metavar="PROMPT", default=None,
                        help="once ready, stream the llm model's answer to PROMPT (chat template) through the server")
    return parser


def parse_args(argv: Sequence[str]) -> ServeOptions:
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    ns = build_parser().parse_args(argv[:cut])
    return ServeOptions(
        model_repository=ns.model_repository, http_port=ns.http_port, grpc_port=ns.grpc_port,
        metrics_port=ns.metrics_port, timeout_s=ns.timeout, log_file=ns.log_file, extra_args=tuple(argv[cut + 1:]),
        demo=ns.demo,
    )


class _ShutdownRequested(BaseException):
    """Raised from the SIGINT/SIGTERM handler; BaseException so no ``except Exception`` swallows it."""


def _request_shutdown(signum, frame) -> None:
    raise _ShutdownRequested(signal.Signals(signum).name)


def serve(options: ServeOptions, on_ready: Callable[[TritonServer], None] | None = None) -> int:
    """Run tritonserver until SIGINT/SIGTERM (exit 0) or until it dies (TritonServerError).

    ``on_ready(server)`` runs once the models are ready, e.g. for a demo request.
    Signal handlers are installed only when called from the main thread.
    """
    install = find_tritonserver()
    server = TritonServer(
        options.model_repository, install=install, http_port=options.http_port, grpc_port=options.grpc_port,
        metrics_port=options.metrics_port, log_path=options.log_file, extra_args=options.extra_args,
        ready_timeout_s=options.timeout_s,
    )
    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _request_shutdown) for s in handled} if in_main else {}
    try:
        started = time.monotonic()
        server.start()
        server.wait_ready()
        _print_endpoints(server, time.monotonic() - started)
        if on_ready is not None:
            on_ready(server)
        while True:
            try:
                code = server.process.wait(1.0)
            except subprocess.TimeoutExpired:
                continue
            raise TritonServerError(f"tritonserver exited with code {code} while serving; log {server.log_path}:\n{server.log_tail()}")
    except _ShutdownRequested as e:
        print(f"kvtriton serve: {e}: stopping tritonserver", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not interrupt the shutdown that guarantees cleanup.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _print_endpoints(server: TritonServer, ready_after_s: float) -> None:
    models = ", ".join(f"{name} (v{version})" for name, version in server.ready_models()) or "none"
    print(
        f"kvtriton serve: tritonserver {server.server_version()} ({server.install.source}) ready in {ready_after_s:.1f} s\n"
        f"  HTTP     {server.http_url}\n"
        f"  gRPC     {server.grpc_url}\n"
        f"  metrics  {server.metrics_url}\n"
        f"  models   {models}\n"
        f"  log      {server.log_path}\n"
        "Ctrl-C stops the server.",
        flush=True,
    )


def main(argv: Sequence[str] | None = None, demo: Callable[[str, str], None] | None = None) -> int:
    """``kvtriton serve``: returns the process exit status.

    ``demo(grpc_url, prompt)`` answers ``--demo PROMPT`` once the models are ready; the ``kvtriton`` command
    passes the client's (this layer imports no client code).
    """
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
        on_ready = None
        if options.demo is not None:
            if demo is None:
                raise ServeError("--demo needs a client: run it as `kvtriton serve --demo PROMPT`")
            on_ready = lambda server: demo(server.grpc_url, options.demo)  # noqa: E731
        return serve(options, on_ready)
    except (ServeError, TritonServerError) as e:
        print(f"kvtriton serve: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
