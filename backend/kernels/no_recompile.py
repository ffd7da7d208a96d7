"""Calling torch.compile'd code while serving: a call that would need a new graph must not stall the step.

Compiling takes seconds on a CPU, so the CPU's compiled steps compile every graph they need at load (their
warm-ups) and then call under dynamo's "fail_on_recompile" stance: a call that fits no graph raises instead
of compiling, and the caller runs its eager path and says so.
"""

from __future__ import annotations

import torch


def without_recompile(fn, *args):
    """(fn(*args), None), or (None, why) when a compiled function it calls fits no graph compiled so far (why:
    dynamo's message, naming the guard that failed)."""
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            return fn(*args), None
    except RuntimeError as exc:
        if not str(exc).startswith("Detected recompile"):
            raise
        return None, str(exc)
