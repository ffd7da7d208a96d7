"""TritonPythonModel: the thin adapter between Triton's Python backend and LLMEngine.

- auto_complete_config(): declares the request contract (request.INPUTS, OUTPUTS)
  and decoupled mode; config.pbtxt may list them too, with the same data types.
- initialize(): config.pbtxt `parameters` are split into the adapter's
  (AdapterConfig) and the engine's (EngineConfig), both validated (a bad value
  fails the load with a message naming it); the engine thread starts.
- execute(): parses each request and hands it to the engine; returns at once
  (decoupled mode). Bad input gets an error response naming the field, with
  the FINAL flag, and touches no engine state.
- The engine thread puts outputs into each request's sink; the response thread
  sends them and, between sends, polls cancellation, aborting cancelled
  requests in the engine, which frees their KV blocks at its next step.
- finalize(): lets in-flight requests finish, then stops both threads.
"""

from __future__ import annotations

import itertools
import json
import logging

import triton_python_backend_utils as pb_utils

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.llm_engine import LLMEngine
from kvtriton.backend.triton.cancellation import CancellationWatcher
from kvtriton.backend.triton.config import AdapterConfig
from kvtriton.backend.triton.metrics import TritonMetrics
from kvtriton.backend.triton.request import INPUTS, OUTPUTS, RequestError, parse_generate_request
from kvtriton.backend.triton.sink import ResponseOutbox, TritonResponseSink


class _TritonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logger = pb_utils.Logger
        (logger.log_error if record.levelno >= logging.ERROR else
         logger.log_warn if record.levelno >= logging.WARNING else logger.log_info)(self.format(record))


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
        log = logging.getLogger("kvtriton")
        log.setLevel(logging.INFO)
        log.addHandler(_TritonLogHandler())
        model_config = json.loads(args["model_config"])
        values = {k: v["string_value"] for k, v in model_config.get("parameters", {}).items()
                  if not k.isupper()}  # upper-case keys (EXECUTION_ENV_PATH, ...) are Triton's own
        self.config, engine_values = AdapterConfig.from_parameters(values)
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.engine = LLMEngine(EngineConfig.from_mapping(engine_values),
                                metrics=TritonMetrics(pb_utils, labels)).start()
        self.cancellation = CancellationWatcher(self.engine.abort, self.config.cancel_poll_interval_s)
        self.outbox = ResponseOutbox(self.cancellation.poll_if_due, self.cancellation.interval_s)
        self._ids = itertools.count()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            request_id = f"{next(self._ids)}-{request.request_id()}"
            try:
                self._submit(request, request_id, sender)
            except (RequestError, ValueError) as exc:
                self.cancellation.forget(request_id)
                _fail(sender, pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
            except Exception as exc:  # never let one request take down execute() for the others
                self.cancellation.forget(request_id)
                logging.getLogger("kvtriton").exception("request rejected")
                _fail(sender, pb_utils.TritonError(f"internal error: {exc}", pb_utils.TritonError.INTERNAL))
        return None

    def _submit(self, request, request_id: str, sender) -> None:
        parsed = parse_generate_request(lambda name: _input(request, name), request.parameters(),
                                        self.engine.tokenizer.apply_chat_template)
        sink = TritonResponseSink(pb_utils, sender, self.outbox, parsed.stream,
                                  "" if parsed.exclude_input_in_output else parsed.prompt,
                                  self.config.stream_interval, parsed.params.logprobs is not None,
                                  on_finished=self.cancellation.forget)
        self.cancellation.watch(request_id, sender)  # before the engine can finish it: see CancellationWatcher
        self.engine.add_request(request_id, parsed.prompt, parsed.params, sink)

    def finalize(self) -> None:
        # The response thread keeps polling cancellation while the engine drains, and sends its last outputs.
        self.engine.shutdown(timeout_s=self.config.shutdown_timeout_s)
        self.outbox.close()


def _fail(sender, error) -> None:
    sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()
