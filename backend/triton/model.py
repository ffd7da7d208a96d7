"""TritonPythonModel: the thin adapter between Triton's Python backend and LLMEngine.

- auto_complete_config(): declares the request contract (request.INPUTS, OUTPUTS)
  and decoupled mode; config.pbtxt may list them too, with the same data types.
- initialize(): config.pbtxt `parameters` are split into the adapter's
  (AdapterConfig) and the engine's (EngineConfig), both validated (a bad value
  fails the load with a message naming it); the engine thread starts.
- execute(): parses each request and hands it to the engine; returns at once
  (decoupled mode). Bad input gets an error response naming the field, with
  the FINAL flag, and touches no engine state; a full queue or a failed engine
  gets UNAVAILABLE; anything unexpected gets "internal error" and the request
  id, with the detail in the server log (never exception text to the client).
  Every response, these errors too, is sent by the response thread.
- The engine thread puts outputs into each request's sink; the response thread
  sends them and, between sends, polls cancellation, aborting cancelled
  requests in the engine, which frees their KV blocks at its next step.
- A failed engine (LLMEngine.is_healthy() false) has answered every request with
  an error; once those responses are sent the stub process exits
  (exit_on_engine_failure), which Triton 2.51 cannot undo for a decoupled model
  but `kvtriton serve`'s supervisor sees and heals by restarting the server.
- finalize(): lets in-flight requests finish, then stops both threads.
"""

from __future__ import annotations

import itertools
import json
import locale
import logging
import os
import time

import triton_python_backend_utils as pb_utils

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.engine_process import EngineProcess
from kvtriton.backend.engine.llm_engine import EngineBusyError, EngineDeadError, LLMEngine
from kvtriton.backend.triton import tasks
from kvtriton.backend.triton.cancellation import CancellationWatcher
from kvtriton.backend.triton.config import AdapterConfig
from kvtriton.backend.triton.metrics import TritonMetrics
from kvtriton.backend.triton.request import (
    INPUTS,
    OUTPUTS,
    RequestError,
    parse_generate_request,
    parse_prompt,
    parse_task,
)
from kvtriton.backend.triton.sink import ResponseOutbox, TritonResponseSink

log = logging.getLogger("kvtriton")
# After the engine fails: how long requests that raced with the failure get to be answered before the exit.
ENGINE_FAILURE_EXIT_GRACE_S = 0.2
ENGINE_FAILURE_EXIT_CODE = 70  # EX_SOFTWARE


class _TritonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logger = pb_utils.Logger
        (logger.log_error if record.levelno >= logging.ERROR else
         logger.log_warn if record.levelno >= logging.WARNING else logger.log_info)(self.format(record))


def use_utf8_locale() -> None:
    """The stub's embedded interpreter starts in the C locale whatever LANG says (and ignores PYTHONUTF8), so
    open() without an encoding reads ASCII there. torch's inductor opens its kernel templates that way:
    compiling inside the stub (engine_process false) failed with UnicodeDecodeError. Take the environment's
    locale for LC_CTYPE, else C.UTF-8; a process of its own (EngineProcess) starts right anyway."""
    for name in ("", "C.UTF-8"):
        if _reads_utf8():
            return
        try:
            locale.setlocale(locale.LC_CTYPE, name)
        except locale.Error:
            pass
    if not _reads_utf8():
        log.warning("no UTF-8 locale (tried LANG/LC_ALL and C.UTF-8): files are read as %s in the stub",
                    locale.getpreferredencoding(False))


def _reads_utf8() -> bool:
    return locale.getpreferredencoding(False).lower().replace("-", "") == "utf8"


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        """Adds every contract input/output that config.pbtxt lacks; one it declares with another data type
        or shape fails the load, so a config cannot drift from what the adapter parses."""
        declared = auto_complete_model_config.as_dict()
        for kind, specs, add in (("input", INPUTS, auto_complete_model_config.add_input),
                                 ("output", OUTPUTS, auto_complete_model_config.add_output)):
            have = {entry["name"]: entry for entry in declared.get(kind, [])}
            for spec in specs:
                entry = have.get(spec.name)
                if entry is None:
                    add(spec.as_config())
                elif (entry["data_type"], [int(d) for d in entry["dims"]]) != (spec.data_type, list(spec.dims)):
                    raise ValueError(
                        f"config.pbtxt declares {kind} {spec.name!r} as {entry['data_type']} dims "
                        f"{list(entry['dims'])}, but the llm model's contract (kvtriton.backend.triton.request) "
                        f"is {spec.data_type} dims {list(spec.dims)}: fix or remove that {kind} entry")
        auto_complete_model_config.set_max_batch_size(0)  # the engine batches in flight, request by request
        auto_complete_model_config.set_model_transaction_policy(dict(decoupled=True))
        return auto_complete_model_config

    def initialize(self, args: dict) -> None:
        log.setLevel(logging.INFO)
        log.addHandler(_TritonLogHandler())
        use_utf8_locale()  # after the handler: its warning goes to Triton's log
        model_config = json.loads(args["model_config"])
        values = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()
                  if not k.isupper()}  # upper-case keys (EXECUTION_ENV_PATH, ...) are Triton's own
        self.config, engine_values = AdapterConfig.from_parameters(values)
        labels = {"model": args["model_name"], "version": args["model_version"]}
        engine_class = EngineProcess if self.config.engine_process else LLMEngine
        engine_config = EngineConfig.from_mapping(engine_values)
        self.engine = engine_class(engine_config, metrics=TritonMetrics(
            pb_utils, labels, speculative_method=engine_config.speculative_method,
            lora_names=tuple(engine_config.lora_adapters))).start()
        self.cancellation = CancellationWatcher(self.engine.abort, self.config.cancel_poll_interval_s)
        self.outbox = ResponseOutbox(self._between_sends, self.cancellation.interval_s)
        self._ids = itertools.count()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            request_id = f"{next(self._ids)}-{request.request_id()}"
            try:
                self._submit(request, request_id, sender)
            except (RequestError, ValueError) as exc:  # the request's own fault: the message names the field
                self._refuse(request_id, sender, pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
            except (EngineBusyError, EngineDeadError) as exc:
                self._refuse(request_id, sender, pb_utils.TritonError(str(exc), pb_utils.TritonError.UNAVAILABLE))
            except Exception:  # never let one request take down execute() for the others
                log.exception("request %s failed", request_id)
                self._refuse(request_id, sender, pb_utils.TritonError(
                    f"internal error (request {request_id}); the server log has the details",
                    pb_utils.TritonError.INTERNAL))
        return None

    def _submit(self, request, request_id: str, sender) -> None:
        get_input = lambda name: _input(request, name)  # noqa: E731
        task = parse_task(get_input)
        if task != "generate":  # tokenize / detokenize: answered now, without the engine (tasks.py)
            prompt = parse_prompt(get_input, self.engine.tokenizer.apply_chat_template, self.engine.max_prompt_bytes())
            self.outbox.put(_send_final, sender, tasks.answer(pb_utils, self.engine.admission, task, prompt))
            return
        parsed = parse_generate_request(get_input, request.parameters(), self.engine.tokenizer.apply_chat_template,
                                        self.engine.max_prompt_bytes(), self.engine.sampling_defaults)
        prompt = parsed.prompt
        if isinstance(prompt, list) and not parsed.exclude_input_in_output:  # the echoed prompt is text
            prompt = self.engine.tokenizer.decode(prompt, skip_special_tokens=False)
        # A rendered chat goes as ids: its template wrote its special tokens (Tokenizer.encode_chat_prompt).
        engine_prompt = self.engine.admission.tokenize(parsed.prompt, chat=True) if parsed.chat else parsed.prompt
        sink = TritonResponseSink(pb_utils, sender, self.outbox, parsed.stream,
                                  "" if parsed.exclude_input_in_output else prompt,
                                  self.config.stream_interval, parsed.params.logprobs is not None,
                                  on_finished=self.cancellation.forget, token_text=self._token_text)
        self.cancellation.watch(request_id, sender)  # before the engine can finish it: see CancellationWatcher
        self.engine.add_request(request_id, engine_prompt, parsed.params, sink)

    def _refuse(self, request_id: str, sender, error) -> None:
        """Forget, then send the final error on the outbox thread, never here: a cancellation poll running
        there may hold this sender from before the forget, and asking a sender whose final response went
        out segfaults tritonserver 2.51 (TRITONBACKEND_ResponseFactoryIsCancelled on a released factory).
        Polls and sends share that thread, so the poll ends before this send starts."""
        self.cancellation.forget(request_id)
        self.outbox.put(_fail, sender, error)

    def _token_text(self, token_id: int) -> str:
        """One token's text in logprobs (special tokens too: a logprob of <|im_end|> names it)."""
        return self.engine.tokenizer.decode([token_id], skip_special_tokens=False)

    def _between_sends(self, sent: bool) -> None:
        """On the response thread, after each send (sent) and when idle."""
        self.cancellation.poll_if_due(sent)
        if self.config.exit_on_engine_failure and not self.engine.is_healthy():
            self._exit_once_answered()

    _engine_failed_at: float | None = None

    def _exit_once_answered(self) -> None:
        """The engine has put an error for every request it held into the outbox before it reported itself
        unhealthy; exit once the outbox has sent them (this runs on its thread, between sends)."""
        now = time.monotonic()
        if self._engine_failed_at is None:
            self._engine_failed_at = now
            log.critical("the engine failed: exiting the model's stub process once its requests are answered, so "
                         "that the server is restarted (kvtriton serve does; with tritonserver alone, restart it)")
        if now - self._engine_failed_at >= ENGINE_FAILURE_EXIT_GRACE_S and self.outbox.is_empty():
            self._exit(ENGINE_FAILURE_EXIT_CODE)

    _exit = staticmethod(os._exit)  # no cleanup: the engine's threads and state are not to be trusted

    def finalize(self) -> None:
        # The response thread keeps polling cancellation while the engine drains, and sends its last outputs.
        self.engine.shutdown(timeout_s=self.config.shutdown_timeout_s)
        self.outbox.close()


def _fail(sender, error) -> None:
    _send_final(sender, pb_utils.InferenceResponse(error=error))


def _send_final(sender, response) -> None:
    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
