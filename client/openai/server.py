"""uvicorn serving the OpenAI app: in the foreground (`kvtriton openai`) or in a thread beside
tritonserver (`kvtriton serve --openai-port`).

The listening socket is bound (and listens) here, before uvicorn starts, so that a port in use is an error
naming the port (uvicorn alone logs it and exits the thread, which `kvtriton serve` could not report), and
a client that connects while uvicorn starts waits in the backlog instead of being refused.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import uvicorn

from kvtriton.client.api import DEFAULT_CONNECT_RETRIES, DEFAULT_MODEL, DEFAULT_TIMEOUT_S, AsyncLLMClient
from kvtriton.client.openai.app import create_app

DEFAULT_PORT = 9000
DEFAULT_HOST = "127.0.0.1"
# The frontend's API key when no file names one (vLLM's is VLLM_API_KEY); `kvtriton serve` reads the same
# variable on its side of the layers (backend/entrypoints/serve.py), which imports no client code.
API_KEY_ENV = "KVTRITON_API_KEY"


class FrontendError(OSError):
    """The frontend cannot start (its port); the message names the option."""


def api_key_from(path: Path | None) -> str | None:
    """The API key in `path` (stripped), else $KVTRITON_API_KEY, else None (the API is open)."""
    if path is None:
        key = os.environ.get(API_KEY_ENV) or None
    else:
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise FrontendError(f"--api-key-file {path}: {exc.strerror}") from None
    if key is not None and (not key or any(c.isspace() for c in key)):
        raise FrontendError("the API key must be one word: no spaces or line breaks inside it")
    return key


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FrontendError(f"the OpenAI port {port} cannot be bound on {host} ({exc.strerror}); "
                            "choose another port") from None
    sock.listen(2048)  # from here on connections queue until uvicorn accepts them: no window of refusals
    sock.set_inheritable(True)
    return sock


def make_server(grpc_url: str, host: str, port: int, model: str = DEFAULT_MODEL, served_model_name: str | None = None,
                timeout_s: float = DEFAULT_TIMEOUT_S, connect_retries: int = DEFAULT_CONNECT_RETRIES,
                tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                api_key: str | None = None) -> tuple[uvicorn.Server, socket.socket]:
    client = AsyncLLMClient(grpc_url, protocol="grpc", model=model, timeout_s=timeout_s,
                            connect_retries=connect_retries)
    app = create_app(client, served_model_name or model, tool_call_parser, reasoning_parser, api_key)
    sock = bind(host, port)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    return uvicorn.Server(config), sock


class FrontendThread:
    """The OpenAI frontend on its own thread and event loop; `stop()` lets in-flight responses end first
    (up to uvicorn's graceful-shutdown timeout)."""

    def __init__(self, grpc_url: str, host: str, port: int, **options):
        self.server, self._sock = make_server(grpc_url, host, port, **options)
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1"
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="kvtriton-openai", daemon=True)

    def start(self) -> "FrontendThread":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self._sock.close()
