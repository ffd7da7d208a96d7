"""The Triton adapter's errors, without a server: each kind of failure gets its own error code and a message
that names the field or says "internal error" with the request id (never exception text); a failed engine
makes the stub exit once its requests are answered."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from kvtriton.backend.engine.llm_engine import EngineBusyError, EngineDeadError
from kvtriton.backend.triton.cancellation import CancellationWatcher
from kvtriton.backend.triton.config import AdapterConfig
from kvtriton.backend.triton.sink import ResponseOutbox

from tests import fake_pb_utils
from tests.fake_pb_utils import FINAL, Engine, Request, flush


def make_adapter(monkeypatch, **config):
    """A TritonPythonModel as initialize() leaves it, on a fake engine and fake pb_utils."""
    model = fake_pb_utils.import_model(monkeypatch).TritonPythonModel()
    model.config = AdapterConfig(cancel_poll_interval_s=0.01, **config)
    model.engine = Engine()
    model.cancellation = CancellationWatcher(model.engine.abort, model.config.cancel_poll_interval_s)
    model.outbox = ResponseOutbox(model._between_sends, 0.01)
    model._ids = iter(range(100))
    return model


@pytest.fixture
def adapter(monkeypatch):
    model = make_adapter(monkeypatch)
    yield model
    model.finalize()


def text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.object_)


def only_error(adapter, request):
    flush(adapter.outbox)
    [(response, flags)] = request.sender.sent
    assert flags == FINAL
    return response.error


@pytest.mark.parametrize("exc", [EngineBusyError("server busy: 256 requests are already waiting"),
                                 EngineDeadError("the engine has failed and is being restarted; retry shortly")])
def test_a_busy_or_failed_engine_is_unavailable(adapter, exc):
    def refuse(*args):
        raise exc
    adapter.engine.add_request = refuse
    request = Request(text_input=text("Hi"))
    adapter.execute([request])
    error = only_error(adapter, request)
    assert error.code == "UNAVAILABLE" and error.message == str(exc) and len(adapter.cancellation) == 0


def test_an_unexpected_failure_says_internal_error_and_the_request_id_only(adapter):
    def crash(*args):
        raise TypeError("can only concatenate str (not \"list\") to str")
    adapter.engine.add_request = crash
    request = Request("client-7", text_input=text("Hi"))
    adapter.execute([request])
    error = only_error(adapter, request)
    assert error.code == "INTERNAL"
    assert error.message == "internal error (request 0-client-7); the server log has the details"


@pytest.mark.parametrize("inputs, message", [
    ({"messages": text(json.dumps([{"role": "user", "content": ["Hi"]}]))},
     "messages[0].content must be a string, got list"),
    ({"messages": text(json.dumps([{"role": 1, "content": "Hi"}]))}, "messages[0].role must be a string, got int"),
    ({"text_input": text("Hi"), "sampling_parameters": text('{"stop": ' + "[" * 100_000 + "]" * 100_000 + "}")},
     "sampling_parameters must be at most 65536 bytes, got 200010"),
    ({"text_input": text("Hi"), "sampling_parameters": text('{"stop": ' + "[" * 20_000 + "]" * 20_000 + "}")},
     "sampling_parameters is not valid JSON: nested too deeply"),
    ({"text_input": text("é" * 501)}, "text_input must be at most 1000 bytes (max_prompt_bytes), got 1002"),
    ({"messages": text(json.dumps([{"role": "user", "content": "x" * 1000}]))},
     "messages must be at most 1000 bytes (max_prompt_bytes), got 1033"),
])
def test_bad_content_is_refused_naming_the_field(adapter, inputs, message):
    request = Request(**inputs)
    adapter.execute([request])
    error = only_error(adapter, request)
    assert error.code == "INVALID_ARG" and error.message.startswith(message), error.message
    assert adapter.engine.added == {}


def test_a_failed_engine_makes_the_stub_exit_once_its_responses_are_sent(monkeypatch):
    model = make_adapter(monkeypatch)
    exits = []
    exited = threading.Event()
    model._exit = lambda code: (exits.append((code, time.monotonic())), exited.set())
    request = Request(text_input=text("Hi"))
    model.execute([request])
    [(request_id, (_, _, sink))] = model.engine.added.items()
    failed_at = time.monotonic()
    model.engine.healthy = False  # as LLMEngine does, after it has put an error for every request
    from kvtriton.backend.engine.outputs import RequestOutput
    sink.put(RequestOutput(request_id, [], "", finished=True, finish_reason="error", error="internal error (...)"))
    assert exited.wait(5)
    [(code, at)] = exits[:1]
    assert code == 70 and at - failed_at >= 0.2
    assert request.sender.sent[0][0].error.message == "internal error (...)"  # sent before the exit
    model.outbox.close()


def test_without_exit_on_engine_failure_the_stub_stays(monkeypatch):
    model = make_adapter(monkeypatch, exit_on_engine_failure=False)
    model._exit = lambda code: pytest.fail("exited")
    model.engine.healthy = False
    time.sleep(0.4)
    model.finalize()
