"""`kvtriton serve`: start tritonserver on a model repository, wait for readiness, serve until Ctrl-C.

Locally the binary comes from the nvidia-pytriton wheel; in NVIDIA's image it
is the `tritonserver` on PATH (see kvtriton.backend.entrypoints.tritonserver). With
`--demo PROMPT`, once the models are ready one streamed answer from the `llm`
model is printed through the server itself, as the README's first command shows.
With `--openai-port PORT` the OpenAI-compatible frontend (kvtriton.client.openai, passed in by the
`kvtriton` command) serves on that port too, forwarding to the server's gRPC port.

Secure and self-healing by default:
- every port listens on 127.0.0.1 unless `--host` says otherwise (compose passes 0.0.0.0);
- Triton's admin APIs (tritonserver.ADMIN_APIS: shared memory, logging, trace, statistics, model
  repository) answer only requests carrying the admin key (KVTRITON_ADMIN_KEY or --admin-key-file;
  without one, a random key that nobody knows closes them);
- the HTTP port is an HttpGuard in front of Triton's HTTP endpoint on loopback (one request body can
  crash Triton 2.51's HTTP server: see http_guard);
- a Supervisor restarts tritonserver when it dies or a Python model's stub dies (`--no-restart`: exit).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from kvtriton.backend.entrypoints.http_guard import HttpGuard
from kvtriton.backend.entrypoints.repository_overlay import (
    DEFAULT_MODEL,
    check_models,
    grouped,
    overlay_repository,
    parse_engine_arg,
)
from kvtriton.backend.entrypoints.supervisor import Supervisor
from kvtriton.backend.entrypoints.triton_install import TritonServerError, find_tritonserver
from kvtriton.backend.entrypoints.tritonserver import (
    ADMIN_APIS,
    ADMIN_KEY_HEADER,
    HOST,
    TritonServer,
    connect_host,
    free_ports,
)

ADMIN_KEY_ENV = "KVTRITON_ADMIN_KEY"
# The OpenAI frontend's API key, as the client layer reads it too (kvtriton.client.openai.server.API_KEY_ENV).
API_KEY_ENV = "KVTRITON_API_KEY"


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
    host: str = HOST  # the address every port listens on
    admin_key: str | None = field(default=None, repr=False)  # None: a random one, which closes the admin APIs
    http_guard: bool = True
    http_max_body_mb: float = 64.0
    restart: bool = True
    openai_port: int | None = None  # None: no OpenAI-compatible frontend
    tool_call_parser: str | None = None  # the OpenAI frontend's, for tool_choice "auto" (the client checks the name)
    reasoning_parser: str | None = None  # the OpenAI frontend's, for reasoning_content (the client checks the name)
    api_key: str | None = field(default=None, repr=False)  # the OpenAI frontend's bearer token (None: open)
    # (model, config.pbtxt parameter, value) set over the repository's (--model, --engine-arg)
    engine_args: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        ports = {"--http-port": self.http_port, "--grpc-port": self.grpc_port, "--metrics-port": self.metrics_port}
        if self.openai_port is not None:
            ports["--openai-port"] = self.openai_port
        for flag, port in ports.items():
            if not 1 <= port <= 65535:
                raise ServeError(f"{flag} {port} is not a TCP port; use 1-65535")
        if len(set(ports.values())) != len(ports):
            raise ServeError(f"{', '.join(ports)} must differ, got {list(ports.values())}")
        for flag, value in (("--tool-call-parser", self.tool_call_parser),
                            ("--reasoning-parser", self.reasoning_parser)):
            if value is not None and self.openai_port is None:
                raise ServeError(f"{flag} is the OpenAI frontend's: give --openai-port too")
        if not self.timeout_s > 0:
            raise ServeError(f"--timeout {self.timeout_s} must be a positive number of seconds")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ServeError(f"--host {self.host!r} is not an IP address; use 127.0.0.1 (this machine only) or "
                             "0.0.0.0 (every interface)") from None
        if not self.http_max_body_mb > 0:
            raise ServeError(f"--http-max-body-mb {self.http_max_body_mb} must be a positive number of megabytes")
        if self.api_key is not None and any(c.isspace() for c in self.api_key):
            raise ServeError("the API key must be one word: no spaces or line breaks inside it")
        if self.admin_key is not None and (len(self.admin_key) < 16 or any(c in self.admin_key for c in ",:= \t\n")):
            raise ServeError("the admin key must be at least 16 characters, without spaces, ',', ':' or '='")
        repo = Path(self.model_repository)
        if not repo.is_dir():
            what = "is not a folder" if repo.exists() else "does not exist"
            raise ServeError(
                f"--model-repository {repo.resolve()} {what}; pass the folder that holds <model>/config.pbtxt "
                "(kvtriton build writes one)"
            )
        try:
            check_models(repo, grouped(self.engine_args))
        except ValueError as exc:
            raise ServeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvtriton serve",
        description="Start tritonserver on a model repository, wait until its models are ready, serve until Ctrl-C.",
        epilog="Arguments after -- go to tritonserver unchanged, e.g. -- --log-verbose=1\n\n"
               "examples:\n"
               "  kvtriton serve                                   # ./model_repository, this machine only\n"
               "  kvtriton serve --model-repository my_repository --host 0.0.0.0 --admin-key-file key.txt\n"
               "  kvtriton serve --model Llama-3.2-1B-Instruct-Q4_K_M.gguf --engine-arg max_num_seqs=32\n"
               "  kvtriton serve --demo \"What is the capital of France?\" -- --log-verbose=1",
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    parser.add_argument("--openai-port", type=int, default=None, metavar="PORT",
                        help="also serve the OpenAI-compatible API (/v1/chat/completions, ...) on PORT, "
                             "as `kvtriton openai` does")
    parser.add_argument("--tool-call-parser", default=None, metavar="NAME",
                        help="with --openai-port: how tool_choice \"auto\" finds tool calls in the output "
                             "(hermes, llama3_json, pythonic, mistral), as `kvtriton openai --tool-call-parser`")
    parser.add_argument("--reasoning-parser", default=None, metavar="NAME",
                        help="with --openai-port: send a thinking model's <think>...</think> as reasoning_content "
                             "(deepseek_r1, qwen3), as `kvtriton openai --reasoning-parser`")
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                        help="with --openai-port: file holding the key OpenAI clients must send as Authorization: "
                             f"Bearer <key> (default: ${API_KEY_ENV}; without either that API is open), as "
                             "`kvtriton openai --api-key-file`")
    parser.add_argument("--host", default=HOST,
                        help=f"address every port listens on (default {HOST}: this machine only; 0.0.0.0: all)")
    parser.add_argument("--admin-key-file", type=Path, default=None,
                        help=f"file holding the key that opens Triton's admin APIs ({', '.join(ADMIN_APIS)}) "
                             f"through header {ADMIN_KEY_HEADER} (default: ${ADMIN_KEY_ENV}; without either "
                             "they are closed)")
    parser.add_argument("--http-max-body-mb", type=float, default=64.0,
                        help="largest HTTP request body accepted (default 64)")
    parser.add_argument("--no-http-guard", dest="http_guard", action="store_false",
                        help="let clients reach Triton's HTTP endpoint directly (a 4 MB form-encoded body then "
                             "crashes Triton 2.51)")
    parser.add_argument("--model", default=None, metavar="CHECKPOINT",
                        help=f"serve this checkpoint (an HF folder, a .gguf file, or default) as the {DEFAULT_MODEL} "
                             "model, whatever its config.pbtxt names (the same as --engine-arg model=CHECKPOINT)")
    parser.add_argument("--engine-arg", dest="engine_args", action="append", default=[], metavar="KEY=VALUE",
                        help=f"set a config.pbtxt parameter of the {DEFAULT_MODEL} model (MODEL/KEY=VALUE: of "
                             "another) for this run, the repository untouched; repeatable, e.g. "
                             "scheduling_policy=priority (README \"Configuration\" lists the keys)")
    parser.add_argument("--no-restart", dest="restart", action="store_false",
                        help="exit when tritonserver or a model's stub dies instead of restarting it")
    return parser


def parse_args(argv: Sequence[str]) -> ServeOptions:
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    ns = build_parser().parse_args(argv[:cut])
    return ServeOptions(
        model_repository=ns.model_repository, http_port=ns.http_port, grpc_port=ns.grpc_port,
        metrics_port=ns.metrics_port, timeout_s=ns.timeout, log_file=ns.log_file, extra_args=tuple(argv[cut + 1:]),
        demo=ns.demo, host=ns.host, admin_key=_secret(ns.admin_key_file, "--admin-key-file", ADMIN_KEY_ENV),
        http_guard=ns.http_guard, http_max_body_mb=ns.http_max_body_mb, restart=ns.restart, openai_port=ns.openai_port,
        tool_call_parser=ns.tool_call_parser, reasoning_parser=ns.reasoning_parser,
        api_key=_openai_key(ns.api_key_file, ns.openai_port), engine_args=_engine_args(ns.model, ns.engine_args),
    )


def _engine_args(model: str | None, args: list[str]) -> tuple[tuple[str, str, str], ...]:
    """--model and --engine-arg as (model, key, value); a checkpoint path that exists is made absolute (the
    engine resolves paths against tritonserver's working directory, not the caller's)."""
    try:
        parsed = [parse_engine_arg(arg) for arg in args]
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    if model is not None:
        parsed.insert(0, (DEFAULT_MODEL, "model", str(Path(model).resolve()) if Path(model).exists() else model))
    return tuple(parsed)


def _secret(path: Path | None, flag: str, env: str) -> str | None:
    """The key in `path` (stripped), else in $env, else None."""
    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise ServeError(f"{flag} {path}: {exc.strerror}") from None
    return os.environ.get(env) or None


def _openai_key(path: Path | None, openai_port: int | None) -> str | None:
    if path is not None and openai_port is None:
        raise ServeError("--api-key-file is the OpenAI frontend's: give --openai-port too")
    return _secret(path, "--api-key-file", API_KEY_ENV) if openai_port is not None else None


class _ShutdownRequested(BaseException):
    """Raised from the SIGINT/SIGTERM handler; BaseException so no ``except Exception`` swallows it."""


def _request_shutdown(signum, frame) -> None:
    raise _ShutdownRequested(signal.Signals(signum).name)


def serve(options: ServeOptions, on_ready: Callable[[TritonServer], None] | None = None) -> int:
    """Run tritonserver until SIGINT/SIGTERM (exit 0); restart it when it dies (unless options.restart is off:
    then TritonServerError). A first start that fails raises TritonServerError.

    ``on_ready(server)`` runs once the models are first ready, e.g. for a demo request.
    Signal handlers are installed only when called from the main thread.
    """
    install = find_tritonserver()
    log_path = options.log_file
    if log_path is None:  # one log for every server this run starts
        fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    guard = None
    triton_http_port = options.http_port
    if options.http_guard:
        triton_http_port = free_ports(1)[0]  # Triton's own HTTP endpoint: loopback only, behind the guard
        guard = HttpGuard(options.host, options.http_port, triton_http_port,
                          int(options.http_max_body_mb * 1024 * 1024))
    admin_key = options.admin_key or secrets.token_urlsafe(32)
    overrides = grouped(options.engine_args)
    repository = overlay_repository(options.model_repository, overrides) if overrides else options.model_repository
    for model, values in overrides.items():
        print(f"kvtriton serve: {model}: {', '.join(f'{k}={v}' for k, v in values.items())} (over its config.pbtxt)",
              file=sys.stderr, flush=True)

    def make_server() -> TritonServer:
        return TritonServer(
            repository, install=install, http_port=triton_http_port, grpc_port=options.grpc_port,
            metrics_port=options.metrics_port, log_path=log_path, extra_args=options.extra_args,
            ready_timeout_s=options.timeout_s, host=options.host, http_host=HOST if guard else None,
            admin_key=admin_key,
        )

    supervisor = Supervisor(make_server, say=lambda message: print(message, file=sys.stderr, flush=True),
                            restart=options.restart)
    handled = (signal.SIGINT, signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _request_shutdown) for s in handled} if in_main else {}
    try:
        if guard is not None:
            try:
                guard.start()
            except OSError as exc:
                raise TritonServerError(f"HTTP port {options.http_port} cannot be bound on {options.host} "
                                        f"({exc.strerror}); choose another with --http-port") from None
        started = time.monotonic()
        server = supervisor.start()
        http_url = f"http://{connect_host(options.host)}:{options.http_port}"
        _print_endpoints(server, http_url, time.monotonic() - started, options)
        if on_ready is not None:
            on_ready(server)
        supervisor.run()
        return 0  # not reached: run() returns only by an exception
    except _ShutdownRequested as e:
        print(f"kvtriton serve: {e}: stopping tritonserver", flush=True)
        return 0
    finally:
        # A second Ctrl-C must not interrupt the shutdown that guarantees cleanup.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        supervisor.stop()
        if guard is not None:
            guard.stop()
        if repository != options.model_repository:
            shutil.rmtree(repository, ignore_errors=True)  # the overlay's links and copied config.pbtxt files
        for s, handler in previous.items():
            signal.signal(s, handler)


def _print_endpoints(server: TritonServer, http_url: str, ready_after_s: float, options: ServeOptions) -> None:
    try:
        models = ", ".join(f"{name} (v{version})" for name, version in server.ready_models()) or "none"
    except (OSError, ValueError) as exc:  # the banner must not take the server down
        models = f"unknown ({exc})"
    admin = (f"open with header {ADMIN_KEY_HEADER} (the key you gave)" if options.admin_key else
             f"closed (give a key in ${ADMIN_KEY_ENV} or --admin-key-file to open them)")
    guard = f" (bodies up to {options.http_max_body_mb:g} MB)" if options.http_guard else " (unguarded)"
    access = "API key required" if options.api_key else f"open: no API key (${API_KEY_ENV} or --api-key-file)"
    openai = (f"  OpenAI   http://{connect_host(options.host)}:{options.openai_port}/v1 ({access})\n"
              if options.openai_port is not None else "")
    print(
        f"kvtriton serve: tritonserver {server.server_version()} ({server.install.source}) "
        f"ready in {ready_after_s:.1f} s\n"
        f"  HTTP     {http_url}{guard}\n"
        f"  gRPC     {server.grpc_url}\n"
        f"  metrics  {server.metrics_url}\n"
        f"{openai}"
        f"  models   {models}\n"
        f"  admin    {', '.join(ADMIN_APIS)}: {admin}\n"
        f"  log      {server.log_path}\n"
        "Ctrl-C stops the server.",
        flush=True,
    )


def main(argv: Sequence[str] | None = None, demo: Callable[[str, str], None] | None = None,
         openai: Callable[..., Callable[[], None]] | None = None) -> int:
    """``kvtriton serve``: returns the process exit status.

    ``demo(grpc_url, prompt)`` answers ``--demo PROMPT`` once the models are ready, and
    ``openai(grpc_url, host, port, tool_call_parser=..., reasoning_parser=..., api_key=...)`` starts the
    OpenAI-compatible frontend for ``--openai-port`` and returns its stop function (ValueError: an option it
    does not take); the
    ``kvtriton`` command passes the client's (this layer imports no client code).
    """
    stops: list[Callable[[], None]] = []
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
        if options.demo is not None and demo is None:
            raise ServeError("--demo needs a client: run it as `kvtriton serve --demo PROMPT`")
        if options.openai_port is not None:
            if openai is None:
                raise ServeError("--openai-port needs the client: run it as `kvtriton serve --openai-port PORT`")
            # Before tritonserver: a port in use fails at once, and the frontend listens by the time the banner
            # shows it (it answers 503 until the model is ready, and reaches every restarted server alike).
            try:
                stops.append(openai(f"{connect_host(options.host)}:{options.grpc_port}", options.host,
                                    options.openai_port, tool_call_parser=options.tool_call_parser,
                                    reasoning_parser=options.reasoning_parser, api_key=options.api_key))
            except (OSError, ValueError) as exc:  # the port, a parser name: the frontend's message names it
                raise ServeError(str(exc)) from None
        on_ready = None
        if options.demo is not None:
            on_ready = lambda server: demo(server.grpc_url, options.demo)  # noqa: E731
        return serve(options, on_ready)
    except (ServeError, TritonServerError) as e:
        print(f"kvtriton serve: error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        for stop in stops:
            stop()


if __name__ == "__main__":
    sys.exit(main())
