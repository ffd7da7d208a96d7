"""Test helper: stand-ins for what the Triton adapter uses of Triton's Python backend, so that it runs
without a server: pb_utils (Tensor, InferenceResponse, TritonError, ...), a request, its response sender,
and an engine that records what it is given."""

from __future__ import annotations

import importlib
import sys
import threading
import types

import numpy as np

FINAL = 1  # TRITONSERVER_RESPONSE_COMPLETE_FINAL


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self.tensors = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class TritonError:
    INVALID_ARG, INTERNAL, UNAVAILABLE = "INVALID_ARG", "INTERNAL", "UNAVAILABLE"

    def __init__(self, message: str, code: str = "INTERNAL"):
        self.message, self.code = message, code


def pb_utils_module() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor, pb.InferenceResponse, pb.TritonError = Tensor, InferenceResponse, TritonError
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    pb.get_input_tensor_by_name = lambda request, name: next((t for t in request.inputs() if t.name() == name), None)
    return pb


def import_model(monkeypatch) -> types.ModuleType:
    """kvtriton.backend.triton.model, imported against the fake pb_utils (removed again at teardown)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils_module())
    # Absent before: the undo at teardown removes the module imported here against the fake.
    monkeypatch.delitem(sys.modules, "kvtriton.backend.triton.model", raising=False)
    return importlib.import_module("kvtriton.backend.triton.model")


class Sender:
    """A response sender: records (response, flags); `cancelled` is what is_cancelled() answers.
    `asked_after_final` counts is_cancelled() calls after the final response: Triton 2.51 segfaults there."""

    def __init__(self):
        self.sent: list[tuple[InferenceResponse, int]] = []
        self.cancelled = False
        self.asked = 0
        self.asked_after_final = 0

    def send(self, response, flags=0) -> None:
        self.sent.append((response, flags))

    def is_cancelled(self) -> bool:
        self.asked += 1
        self.asked_after_final += any(flags & FINAL for _, flags in self.sent)
        return self.cancelled


def flush(outbox) -> None:
    """Waits until the outbox has sent everything enqueued so far (it sends in order)."""
    done = threading.Event()
    outbox.put(done.set)
    assert done.wait(5), "the outbox did not drain"


class Request:
    def __init__(self, request_id: str = "r", parameters: str = "{}", **inputs: np.ndarray):
        self._id, self._parameters = request_id, parameters
        self._inputs = [Tensor(name, array) for name, array in inputs.items()]
        self.sender = Sender()

    def inputs(self):
        return self._inputs

    def request_id(self) -> str:
        return self._id

    def parameters(self) -> str:
        return self._parameters

    def get_response_sender(self) -> Sender:
        return self.sender


class Tokenizer:
    """A character per token (its code point), and BOS (id 1) added as Llama's tokenizers add it."""

    BOS = 1

    @staticmethod
    def apply_chat_template(messages, tools=None, **options) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.BOS] * add_special_tokens + [ord(c) for c in text]

    def encode_chat_prompt(self, rendered: str) -> list[int]:
        return self.encode(rendered, add_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join("<s>" if i == self.BOS else chr(i) for i in ids if not (skip_special_tokens and i == self.BOS))


class Engine:
    """Records add_request's sinks and abort's ids; the test plays the engine thread through the sinks. Its
    admission is the real one, over Tokenizer."""

    tokenizer = Tokenizer()
    sampling_defaults: dict = {}

    def __init__(self):
        from kvtriton.backend.engine.admission import Admission, AdmissionLimits

        self.added: dict[str, tuple] = {}  # request_id -> (prompt, params, sink)
        self.aborted: list[str] = []
        self.abort_seen = threading.Event()
        self.admission = Admission(self.tokenizer, AdmissionLimits(
            max_model_len=64, vocab_size=1000, num_kv_blocks=16, block_size=16, max_prompt_bytes=1000))

    healthy = True

    def is_healthy(self) -> bool:
        return self.healthy

    def max_prompt_bytes(self) -> int:
        return 1000

    def add_request(self, request_id, prompt, params, sink):
        self.added[request_id] = (prompt, params, sink)
        return sink

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.abort_seen.set()

    def shutdown(self, timeout_s: float) -> None:
        pass
