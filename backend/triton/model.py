"""TritonPythonModel: the thin adapter between Triton's Python backend and LLMEngine.

- initialize(): engine parameters come from config.pbtxt `parameters`, validated
  (a bad value fails the load with a message naming it); the engine thread starts.
- execute(): parses each request and hands it to the engine; returns at once
  (decoupled mode). Bad input gets an error response naming the field, with
  the FINAL flag, and touches no engine state.
- The engine thread streams responses through each request's sender and polls
  cancellation each step, so a cancelled request frees its KV blocks within a step.
- finalize(): lets in-flight requests finish, then stops the thread.
"""

from __future__ import annotations

import itertools
import json
import logging

import triton_python_backend_utils as pb_utils

from kvtriton.backend.engine.config import EngineConfig
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.triton.metrics import TritonMetrics
from kvtriton.backend.triton.request import RequestError, parse_generate_request
from kvtriton.backend.triton.sink import ResponseOutbox, TritonResponseSink

# config.pbtxt parameters that belong to the adapter, not the engine.
ADAPTER_PARAMETERS = {"stream_interval": 1, "shutdown_timeout_s": 30.0}


class _TritonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logger = pb_utils.Logger
        (logger.log_error if record.levelno >= logging.ERROR else
         logger.log_warn if record.levelno >= logging.WARNING else logger.log_info)(self.format(record))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        log = logging.getLogger("kvtriton")
        log.setLevel(logging.INFO)
        log.addHandler(_TritonLogHandler())
        model_config = json.loads(args["model_config"])
        values = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()
                  if not k.isupper()}  # upper-case keys (EXECUTION_ENV_PATH, ...) are Triton's own
        adapter = {k: values.pop(k, default) for k, default in ADAPTER_PARAMETERS.items()}
        try:
            self.stream_interval = int(adapter["stream_interval"])
            self.shutdown_timeout_s = float(adapter["shutdown_timeout_s"])
        except ValueError as exc:
            raise ValueError(f"config.pbtxt parameter: {exc}") from None
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        config = EngineConfig.from_mapping(values)
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.outbox = ResponseOutbox()
        self.engine = LLMEngine(config, metrics=TritonMetrics(pb_utils, labels)).start()
        self._ids = itertools.count()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                parsed = parse_generate_request(
                    lambda name: _input(request, name), request.parameters(),
                    self.engine.tokenizer.apply_chat_template)
                sink = TritonResponseSink(pb_utils, sender, self.outbox, parsed.stream,
                                          "" if parsed.exclude_input_in_output else parsed.prompt,
                                          self.stream_interval, parsed.params.logprobs is not None)
                request_id = f"{next(self._ids)}-{request.request_id()}"
                self.engine.add_request(request_id, parsed.prompt, parsed.params, sink)
            except (RequestError, ValueError) as exc:
                _fail(sender, pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
            except Exception as exc:  # never let one request take down execute() for the others
                logging.getLogger("kvtriton").exception("request rejected")
                _fail(sender, pb_utils.TritonError(f"internal error: {exc}", pb_utils.TritonError.INTERNAL))
        return None

    def finalize(self) -> None:
        self.engine.shutdown(timeout_s=self.shutdown_timeout_s)
        self.outbox.close()  # after the engine: its last outputs are in the outbox


def _fail(sender, error) -> None:
    sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
