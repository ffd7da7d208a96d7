"""The Triton adapter without a server: its config, the response sink's coalescing, the response thread,
and cancellation (a cancelled client's request is aborted in the engine; a finished one is forgotten)."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from kvtriton.backend.engine.llm_engine import EngineBusyError
from kvtriton.backend.engine.outputs import RequestOutput
from kvtriton.backend.triton import cancellation
from kvtriton.backend.triton.cancellation import CancellationWatcher
from kvtriton.backend.triton.config import AdapterConfig
from kvtriton.backend.triton.request import OUTPUTS
from kvtriton.backend.triton.sink import ResponseOutbox, TritonResponseSink

from tests import fake_pb_utils
from tests.fake_pb_utils import FINAL, Engine, Request, Sender, flush


# ---- AdapterConfig ---------------------------------------------------------------------------------------
def test_from_parameters_takes_the_adapters_keys_and_leaves_the_engines():
    config, rest = AdapterConfig.from_parameters(
        {"stream_interval": "4", "cancel_poll_interval_s": "0.02", "model": "default", "max_num_seqs": "8"})
    assert config == AdapterConfig(stream_interval=4, cancel_poll_interval_s=0.02)
    assert rest == {"model": "default", "max_num_seqs": "8"}


def test_defaults():
    config, rest = AdapterConfig.from_parameters({})
    assert (config.stream_interval, config.cancel_poll_interval_s, config.shutdown_timeout_s) == (1, 0.0, 30.0)
    assert rest == {}


@pytest.mark.parametrize("values, message", [
    ({"stream_interval": "0"}, "stream_interval must be >= 1"),
    ({"stream_interval": "two"}, "stream_interval must be a int, got 'two'"),
    ({"cancel_poll_interval_s": "-1"}, "cancel_poll_interval_s must be >= 0"),
    ({"shutdown_timeout_s": "-5"}, "shutdown_timeout_s must be >= 0"),
])
def test_bad_values_fail_naming_the_parameter(values, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig.from_parameters(values)


# ---- TritonResponseSink ----------------------------------------------------------------------------------
class SyncOutbox:
    """Sends at once, on the caller's thread: the sink's output is then deterministic."""

    def put(self, send, *args) -> None:
        send(*args)


def output(text: str, finished: bool = False, error: str | None = None, request_id: str = "r") -> RequestOutput:
    return RequestOutput(request_id, [1] if text else [], text, finished=finished,
                         finish_reason=("stop" if error is None else "error") if finished else None,
                         num_prompt_tokens=5, error=error)


def sink(sender, stream=True, prefix="", stream_interval=1, want_logprobs=False, on_finished=lambda _: None):
    return TritonResponseSink(fake_pb_utils.pb_utils_module(), sender, SyncOutbox(), stream, prefix,
                              stream_interval, want_logprobs, on_finished)


def sent(sender) -> list[tuple[str, int, str, int]]:
    """(text, num_output_tokens, finish_reason, flags) of each response sent."""
    return [(r.tensors["text_output"][0].decode(), int(r.tensors["num_output_tokens"][0]),
             r.tensors["finish_reason"][0].decode(), flags) for r, flags in sender.sent]


def test_streaming_coalesces_stream_interval_tokens_per_response():
    sender = Sender()
    s = sink(sender, stream_interval=3)
    for word in ["a", "b", "c", "d", "e", "f"]:
        s.put(output(word))
    s.put(output("g", finished=True))
    assert sent(sender) == [("abc", 3, "", 0), ("def", 3, "", 0), ("g", 1, "stop", FINAL)]


def test_streaming_one_token_per_response_by_default():
    sender = Sender()
    s = sink(sender)
    s.put(output("a"))
    s.put(output("", finished=True))  # a final output without a token still ends the stream
    assert sent(sender) == [("a", 1, "", 0), ("", 0, "stop", FINAL)]


def test_non_streaming_sends_one_final_response_with_the_prompt_echoed():
    sender = Sender()
    s = sink(sender, stream=False, prefix="Q: ", stream_interval=1)
    for word in ["a", "b"]:
        s.put(output(word))
    s.put(output("c", finished=True))
    assert sent(sender) == [("Q: abc", 3, "stop", FINAL)]
    assert int(sender.sent[0][0].tensors["num_input_tokens"][0]) == 5


def test_responses_carry_exactly_the_contract_outputs():
    sender = Sender()
    sink(sender).put(output("a", finished=True))
    # prompt_logprobs only on the first response of a request that asked for them (below); token_ids and
    # max_model_len only on a tokenize task's answer (test_triton_tasks.py)
    assert set(sender.sent[0][0].tensors) == {spec.name for spec in OUTPUTS} - {"prompt_logprobs", "token_ids",
                                                                                 "max_model_len"}
    assert sender.sent[0][0].tensors["num_output_tokens"].dtype == np.uint32  # TYPE_UINT32


def test_an_error_output_is_one_final_error_response():
    sender = Sender()
    sink(sender).put(output("", finished=True, error="boom"))
    [(response, flags)] = sender.sent
    assert response.error.message == "boom" and flags == FINAL


def test_logprobs_are_sent_only_when_asked():
    from kvtriton.backend.engine.outputs import TokenLogprob

    out = output("a", finished=True)
    out.logprobs = [TokenLogprob(1, -0.5, [(1, -0.5)])]
    for want, expected in [(True, [{"token_id": 1, "logprob": -0.5, "top": [[1, -0.5]]}]), (False, None)]:
        sender = Sender()
        sink(sender, want_logprobs=want).put(out)
        raw = sender.sent[0][0].tensors["logprobs"][0].decode()
        assert (json.loads(raw) if raw else None) == expected


def test_prompt_logprobs_ride_on_the_first_response_only():
    from kvtriton.backend.engine.outputs import TokenLogprob

    sender = Sender()
    target = sink(sender)
    first = output("a")
    first.prompt_logprobs = [TokenLogprob(7, None), TokenLogprob(8, -1.5, [(9, -0.5)])]
    target.put(first)
    target.put(output("b", finished=True))
    raw = [r.tensors.get("prompt_logprobs") for r, _ in sender.sent]
    assert json.loads(raw[0][0].decode()) == [{"token_id": 7, "logprob": None, "top": []},
                                              {"token_id": 8, "logprob": -1.5, "top": [[9, -0.5]]}]
    assert raw[1:] == [None]  # no tensor at all on the others: a streamed token's response costs what it did


def test_logprobs_carry_token_text_when_the_sink_can_decode():
    """The OpenAI frontend has no tokenizer: the server names each token (and each top token) by its text."""
    from kvtriton.backend.engine.outputs import TokenLogprob

    out = output("a", finished=True)
    out.logprobs = [TokenLogprob(1, -0.5, [(1, -0.5), (2, -1.5)])]
    sender = Sender()
    TritonResponseSink(fake_pb_utils.pb_utils_module(), sender, SyncOutbox(), True, "", 1, True,
                       token_text={1: "a", 2: " b"}.__getitem__).put(out)
    [entry] = json.loads(sender.sent[0][0].tensors["logprobs"][0].decode())
    assert entry == {"token_id": 1, "logprob": -0.5, "top": [[1, -0.5], [2, -1.5]], "token": "a",
                     "top_tokens": ["a", " b"]}


def test_the_final_output_calls_on_finished_once_with_the_request_id():
    finished = []
    s = sink(Sender(), on_finished=finished.append)
    s.put(output("a", request_id="r7"))
    s.put(output("b", finished=True, request_id="r7"))
    assert finished == ["r7"]


# ---- ResponseOutbox --------------------------------------------------------------------------------------
def test_outbox_sends_in_order_and_runs_between_sends_even_when_idle():
    calls = []
    ticked = threading.Event()
    outbox = ResponseOutbox(lambda sent: ticked.set(), idle_wakeup_s=0.01)
    for i in range(5):
        outbox.put(calls.append, i)
    assert ticked.wait(2)
    ticked.clear()
    assert ticked.wait(2)  # nothing left to send: the thread still wakes up
    outbox.close()
    assert calls == [0, 1, 2, 3, 4]


def test_outbox_survives_a_failing_send():
    calls = []
    outbox = ResponseOutbox()
    outbox.put(lambda: 1 / 0)
    outbox.put(calls.append, "after")
    outbox.close()
    assert calls == ["after"]


# ---- CancellationWatcher ---------------------------------------------------------------------------------
def test_a_cancelled_request_is_aborted_once_and_forgotten():
    engine = Engine()
    watcher = CancellationWatcher(engine.abort, interval_s=0.0)
    a, b = Sender(), Sender()
    watcher.watch("a", a)
    watcher.watch("b", b)
    watcher.poll()
    assert engine.aborted == []
    a.cancelled = True
    watcher.poll()
    watcher.poll()
    assert engine.aborted == ["a"] and "a" not in watcher and "b" in watcher


def test_zero_interval_polls_at_the_floor_not_in_a_spin():
    sender = Sender()
    watcher = CancellationWatcher(lambda request_id: None, interval_s=0.0)
    assert watcher.interval_s == CancellationWatcher.MIN_INTERVAL_S
    watcher.watch("a", sender)
    for _ in range(100):
        watcher.poll_if_due()
    assert sender.asked == 1


def test_polls_follow_the_responses_and_idle_ones_come_at_the_idle_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(cancellation.time, "monotonic", lambda: clock[0])
    sender = Sender()
    watcher = CancellationWatcher(lambda request_id: None, interval_s=0.0)
    watcher.watch("a", sender)
    watcher.poll_if_due(sent=False)  # the first poll is due at once
    assert sender.asked == 1
    for _ in range(10):  # idle (no response went out): the outbox wakes every 5 ms, no poll
        clock[0] += 0.005
        watcher.poll_if_due(sent=False)
    assert sender.asked == 1
    clock[0] += 0.005
    watcher.poll_if_due(sent=True)  # a response went out: the engine stepped, so poll
    assert sender.asked == 2
    clock[0] += CancellationWatcher.IDLE_INTERVAL_S
    watcher.poll_if_due(sent=False)  # idle for the idle interval: poll anyway
    assert sender.asked == 3


def test_a_slow_poll_is_followed_by_a_pause_of_four_times_its_length(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(cancellation.time, "monotonic", lambda: clock[0])
    sender = Sender()
    slow = sender.is_cancelled

    def ask():  # each round trip takes 10 ms
        clock[0] += 0.010
        return slow()

    sender.is_cancelled = ask
    watcher = CancellationWatcher(lambda request_id: None, interval_s=0.0)
    watcher.watch("a", sender)
    watcher.poll_if_due(sent=True)
    assert sender.asked == 1
    clock[0] += 0.039
    watcher.poll_if_due(sent=True)  # responses go out, but the poll took 10 ms: 40 ms of pause first
    assert sender.asked == 1
    clock[0] += 0.002
    watcher.poll_if_due(sent=True)
    assert sender.asked == 2


def test_a_sender_that_fails_to_answer_does_not_stop_the_others():
    engine = Engine()
    watcher = CancellationWatcher(engine.abort, interval_s=0.0)
    broken, cancelled = Sender(), Sender()
    broken.is_cancelled = lambda: 1 / 0
    cancelled.cancelled = True
    watcher.watch("broken", broken)
    watcher.watch("cancelled", cancelled)
    watcher.poll()
    assert engine.aborted == ["cancelled"] and "broken" in watcher


# ---- the adapter: execute() -> engine, cancellation through the response thread --------------------------
@pytest.fixture
def adapter(monkeypatch):
    """A TritonPythonModel as initialize() leaves it, on a fake engine and fake pb_utils."""
    model = fake_pb_utils.import_model(monkeypatch).TritonPythonModel()
    model.config = AdapterConfig(cancel_poll_interval_s=0.01)
    model.engine = Engine()
    model.cancellation = CancellationWatcher(model.engine.abort, model.config.cancel_poll_interval_s)
    model.outbox = ResponseOutbox(model.cancellation.poll_if_due, model.cancellation.interval_s)
    model._ids = iter(range(100))
    yield model
    model.finalize()


def text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.object_)


def test_a_client_that_cancels_gets_its_request_aborted_in_the_engine(adapter):
    request = Request("client-1", text_input=text("Hi"), stream=np.array([True]))
    adapter.execute([request])
    [request_id] = adapter.engine.added
    assert request_id.endswith("client-1") and request_id in adapter.cancellation
    request.sender.cancelled = True
    assert adapter.engine.abort_seen.wait(2), "the response thread did not abort the cancelled request"
    assert adapter.engine.aborted == [request_id] and request_id not in adapter.cancellation


def test_a_finished_request_leaves_the_registry(adapter):
    request = Request(text_input=text("Hi"))
    adapter.execute([request])
    [(request_id, (_, _, sink))] = adapter.engine.added.items()
    sink.put(output("Hello", finished=True, request_id=request_id))  # as the engine thread would
    assert request_id not in adapter.cancellation and len(adapter.cancellation) == 0
    request.sender.cancelled = True  # too late: nothing is asked or aborted any more
    time.sleep(0.1)
    assert adapter.engine.aborted == []


def test_a_bad_request_gets_an_invalid_arg_error_and_is_not_watched(adapter):
    request = Request(text_input=text("Hi"), parameters=json.dumps({"temperature": -1}))
    adapter.execute([request])
    flush(adapter.outbox)
    [(response, flags)] = request.sender.sent
    assert response.error.code == "INVALID_ARG" and "temperature" in response.error.message and flags == FINAL
    assert adapter.engine.added == {} and len(adapter.cancellation) == 0


def test_a_request_the_engine_refuses_is_forgotten(adapter):
    def refuse(*args):
        raise ValueError("prompt is empty")

    adapter.engine.add_request = refuse
    request = Request(text_input=text("Hi"))
    adapter.execute([request])
    flush(adapter.outbox)
    assert request.sender.sent[0][0].error.message == "prompt is empty" and len(adapter.cancellation) == 0



def test_tokens_join_a_response_still_waiting_in_the_outbox():
    """Adaptive coalescing: while one response waits to be sent, later tokens ride with it, in order."""

    class HeldOutbox:  # sends only when drained: its thread is busy with other requests meanwhile
        def __init__(self):
            self.items = []

        def put(self, send, *args):
            self.items.append((send, args))

        def drain(self):
            items, self.items = self.items, []
            for send, args in items:
                send(*args)

    outbox, sender = HeldOutbox(), Sender()
    s = TritonResponseSink(fake_pb_utils.pb_utils_module(), sender, outbox, True, "", 1, False)
    for word in ["a", "b", "c"]:
        s.put(output(word))
    assert len(outbox.items) == 1  # one send queued, carrying all three tokens
    outbox.drain()
    s.put(output("d", finished=True))
    outbox.drain()
    assert sent(sender) == [("abc", 3, "", 0), ("d", 1, "stop", FINAL)]


def test_a_refused_request_is_never_asked_about_cancellation_after_its_final_error(adapter):
    """The race that crashed tritonserver: a poll on the response thread holds the senders it read before
    execute() refused a request; the refusal's final error must not go out before that poll ends. Slow
    refusals and slow asks make the poll overlap each refusal."""
    class SlowSender(Sender):
        def is_cancelled(self) -> bool:
            time.sleep(0.03)
            return super().is_cancelled()

    def refuse(*args):
        time.sleep(0.02)  # longer than the poll interval: a poll reads this request's sender meanwhile
        raise EngineBusyError("server busy")

    adapter.engine.add_request = refuse
    requests = [Request(f"c{i}", text_input=text("Hi")) for i in range(5)]
    for request in requests:
        request.sender = SlowSender()
        adapter.execute([request])
    flush(adapter.outbox)
    assert all(len(r.sender.sent) == 1 for r in requests)
    assert sum(r.sender.asked for r in requests) > 0, "no poll overlapped a refusal: the test shows nothing"
    assert sum(r.sender.asked_after_final for r in requests) == 0
