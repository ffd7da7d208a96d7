"""Test-only model.py: the shipped llm adapter plus one fault hook, for tests/test_reliability.py.

A request whose text_input is FAULT_PROMPT breaks the engine: in its own process (engine_process, the
default) the engine process is killed; in-process, its scheduler is broken so that the next step fails
outside the engine's own error handling. Either is the fault the adapter must not survive silently.
Nothing else differs from kvtriton.backend.triton.model.
"""

import os
import signal

import triton_python_backend_utils as pb_utils

from kvtriton.backend.triton.model import TritonPythonModel as ShippedModel

FAULT_PROMPT = b"kvtriton test: break the engine"


class TritonPythonModel(ShippedModel):
    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input")
            if text is not None and text.as_numpy().reshape(-1)[0] == FAULT_PROMPT:
                if hasattr(self.engine, "pid"):  # EngineProcess
                    os.kill(self.engine.pid, signal.SIGKILL)
                else:
                    self.engine.scheduler.schedule = _broken
        return super().execute(requests)


def _broken():
    raise MemoryError("injected by tests/test_reliability.py")
