"""Test helper: the `figures` fixture, where reliability tests record what they measured (requests, cancels,
errors, leaks, recovery times). At the end of the module they are printed to the terminal, and appended as
one JSON line to $KVTRITON_RELIABILITY_FIGURES when that is set.

Import the fixture into a test module: `from tests.reliability_figures import figures  # noqa: F401`.
"""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture(scope="module")
def figures(request):
    recorded: dict[str, object] = {}
    yield recorded
    if not recorded:
        return
    module = request.module.__name__.rsplit(".", 1)[-1]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # past pytest's output capture, to the terminal
            reporter.write_line("")
            reporter.write_line(f"{module} figures:")
            for key, value in recorded.items():
                reporter.write_line(f"  {key}: {value}")
    path = os.environ.get("KVTRITON_RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"module": module, **recorded}) + "\n")
