"""Start a real tritonserver for integration tests.

The shared conftest wraps ``start_server`` in a session-scoped fixture::

    from tests.triton_fixture import ECHO_REPOSITORY, start_server

    @pytest.fixture(scope="session")
    def echo_server():
        server = start_server(ECHO_REPOSITORY)
        yield server
        server.stop()

Each server gets free ports, its own shm prefix and its own log; it is stopped
(process group killed, shm files removed) if it fails to become ready, and at
interpreter exit if a test run dies before teardown.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvtriton.backend.entrypoints.tritonserver import TritonServer

ECHO_REPOSITORY = Path(__file__).parent / "assets" / "echo_repository"


def start_server(model_repository: str | os.PathLike, timeout_s: float = 120, **server_args) -> TritonServer:
    """A ready TritonServer on ``model_repository``; the caller must ``stop()`` it.

    ``server_args`` go to TritonServer (e.g. ``log_path``, ``extra_args``).
    Raises TritonServerError, with the server log's errors and tail, if it is not ready.
    """
    server = TritonServer(model_repository, ready_timeout_s=timeout_s, **server_args)
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server
