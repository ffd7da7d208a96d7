"""Test-only model.py: the shipped llm adapter plus one fault hook, for tests/test_reliability.py.

A request whose text_input is FAULT_PROMPT breaks the engine's scheduler, so that the engine's next step
fails outside its own error handling: the fault the engine must not survive silently. Nothing else differs
from kvtriton.backend.triton.model.
"""

import triton_python_backend_utils as pb_utils

from kvtriton.backend.triton.model import TritonPythonModel as ShippedModel

FAULT_PROMPT = b"kvtriton test: break the engine"


class TritonPythonModel(ShippedModel):
    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input")
            if text is not None and text.as_numpy().reshape(-1)[0] == FAULT_PROMPT:
                self.engine.scheduler.schedule = _broken
        return super().execute(requests)


def _broken():
    raise MemoryError("injected by tests/test_reliability.py")
