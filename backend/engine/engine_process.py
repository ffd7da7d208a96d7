"""EngineProcess: LLMEngine in a process of its own, behind the LLMEngine interface (vLLM V1's EngineCore split).

Why: in Triton's Python backend every response `send()` and `is_cancelled()`
is an IPC round trip made while holding the GIL (~0.1-0.2 ms each). In one
process, the engine loop waits for the GIL behind every response the adapter
sends; at 64 streams that stalls it for most of each step. In a child process
the loop never waits for the adapter, and the adapter's threads have the
stub's GIL to themselves.

Protocol (one duplex multiprocessing Pipe, pickled tuples, never a hand-made
socket protocol):
  parent -> child: ("add", request_id, prompt_ids, params) | ("abort", request_id) | ("shutdown", timeout_s)
  child -> parent: ("ready", AdmissionLimits, model folder, EOS ids) | ("failed", message) once at start, then
                   ("outputs", rows, EngineStats, healthy) once per engine step, the step's tokens without
                   their text (token_output_processor.py has the rows' format), and
                   ("closed",) after shutdown.
Requests are admitted (tokenized, checked against the limits the child sent)
here, on the caller's thread, so a bad request fails at once as in-process. Their text is made here too
(text_outputs.py), off the child's loop, as vLLM V1's frontend process detokenizes for its EngineCore.
If the child dies, every request in flight ends with an error and
is_healthy() turns false, as for an engine that failed in-process.
"""

from __future__ import annotations

import logging
import sys
import threading

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.distributed.parallel_state import spawn_context
from kvtriton.backend.engine.admission import Admission
from kvtriton.backend.engine.generation_defaults import sampling_defaults
from kvtriton.backend.engine.llm_engine import EngineBusyError, EngineDeadError, LLMEngine, freeze_startup_heap
from kvtriton.backend.engine.outputs import OutputSink, RequestOutput, RequestStream, request_output_fields
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.stats import EngineStats
from kvtriton.backend.engine.structured_output import StructuredOutputManager
from kvtriton.backend.engine.text_outputs import TextOutputs
from kvtriton.backend.engine.tokenizer import Tokenizer

log = logging.getLogger("kvtriton")


class EngineProcess:
    def __init__(self, config: EngineConfig | None = None, metrics=None):
        self.config = config = config or EngineConfig()
        self.metrics = metrics  # observe_output(RequestOutput), observe_step(EngineStats), in this process
        context = spawn_context()  # never fork a process with threads (and CUDA)
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_engine, args=(config, child), name="kvtriton-engine",
                                        daemon=True)
        self._process.start()
        child.close()
        try:
            message = self._conn.recv()
        except EOFError:
            raise RuntimeError(f"the engine process exited while loading (exit code {self._process.exitcode}); "
                               "its log has the reason") from None
        if message[0] == "failed":
            self._process.join(10)
            raise RuntimeError(f"the engine process could not start: {message[1]}")
        _, limits, folder, eos_token_ids = message
        self.tokenizer = Tokenizer.from_pretrained(folder)
        self.tokenizer.token_bytes()  # the detokenizers' byte table (~0.1 s) now, not in the first request's TTFT
        self.sampling_defaults = sampling_defaults(folder, config.generation_config)  # the child logs them
        self.admission = Admission(self.tokenizer, limits)
        # Compiles guided_* constraints here too, only to answer an invalid one at once (the child compiles its own).
        self.structured_output = StructuredOutputManager(self.tokenizer, eos_token_ids)  # the child's EOS ids
        self.structured_output.warm_up()
        self._outputs = TextOutputs(self.tokenizer, eos_token_ids)  # each request's sink and text
        self._lock = threading.Lock()  # guards _num_waiting (execute() thread vs receiver)
        self._send_lock = threading.Lock()
        self._num_waiting = 0  # the child's last count plus the requests sent since
        self._stats = EngineStats()  # the child's last, sent with each step's outputs
        self._healthy = True
        self._closing = False
        self._receiver = threading.Thread(target=self._receive, name="kvtriton-engine-outputs", daemon=True)
        self._receiver.start()
        # This process reads every step's outputs: a full garbage collection here (57 ms over the heap of a process
        # that imported torch, on the 2-core VM) stops the reading, the child blocks on the full socket, and the
        # whole batch waits. Frozen as in the child, collections scan only what came after start-up.
        freeze_startup_heap()

    # ---- the LLMEngine interface the adapter uses ------------------------------------------------
    def start(self) -> "EngineProcess":
        return self  # the child's loop started with it

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    sink: OutputSink | None = None) -> OutputSink:
        if not self.is_healthy():
            raise EngineDeadError("the engine has failed and is being restarted; retry shortly")
        params = params or SamplingParams.from_dict({}, self.sampling_defaults)
        limit = self.config.max_num_waiting
        if limit and self._num_waiting >= limit:
            raise EngineBusyError(f"server busy: {limit} requests are already waiting (max_num_waiting); "
                                  "retry later")
        ids = self.admission.admit(prompt, params)
        self.structured_output.matcher_for(params)
        sink = sink if sink is not None else RequestStream(request_id)
        self._outputs.add(request_id, ids, params, sink)
        with self._lock:
            self._num_waiting += 1
        self._send(("add", request_id, ids, params))
        return sink

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    @property
    def pid(self) -> int:
        """The engine process's id (for supervision and fault tests)."""
        return self._process.pid

    def max_prompt_bytes(self) -> int:
        return self.admission.limits.max_prompt_bytes

    def stats(self) -> EngineStats:
        """The child's counters as of the last step whose outputs arrived (a finished request's last output
        comes with the step that finished it, so its counts are in)."""
        return self._stats

    def is_healthy(self) -> bool:
        return self._healthy and (self._closing or self._process.is_alive())

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Let the child finish its requests (up to timeout_s), deliver their last outputs, and stop it."""
        self._closing = True
        self._send(("shutdown", timeout_s))
        self._receiver.join(timeout_s + 20)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()

    # ---- outputs (receiver thread) -----------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, ValueError):  # the child is gone: the receiver fails its requests
                pass

    def _receive(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "closed":
                    return
                _, rows, stats, healthy = message
                self._deliver(rows, stats)
                self._healthy = healthy
        except (EOFError, OSError):
            if not self._closing:
                log.error("the engine process exited (code %s): failing its requests", self._process.exitcode)
        finally:
            self._healthy = self._healthy and self._closing
            self._fail_all()

    def _deliver(self, rows: list, stats: EngineStats) -> None:
        with self._lock:
            self._num_waiting = stats.num_waiting
        self._stats = stats  # before the outputs: a caller woken by a finished one reads stats that count it
        for request_id in self._outputs.deliver(rows, self.metrics):  # their text failed here: ended with an error
            self.abort(request_id)
        if self.metrics is not None:
            self.metrics.observe_step(stats)

    def _fail_all(self) -> None:
        self._outputs.fail_all("the engine stopped; retry")


class _StepOutputs:
    """The child's one sink and metrics: a step's rows (the engine's TokenOutputProcessor's, then the outputs put
    here: admission errors, a failed engine's errors), sent to the parent in one message."""

    def __init__(self, conn, engine_ref: list):
        self._conn, self._engine_ref = conn, engine_ref
        self._outputs: list[RequestOutput] = []
        self._lock = threading.Lock()  # the engine thread puts; the main thread puts admission errors

    def put(self, out: RequestOutput) -> None:
        with self._lock:
            self._outputs.append(out)

    def observe_output(self, out: RequestOutput) -> None:
        pass  # the parent observes what it delivers

    def observe_step(self, stats: EngineStats, force: bool = False) -> None:
        engine = self._engine_ref[0] if self._engine_ref else None
        rows = engine.output_processor.take_rows() if engine is not None else []
        with self._lock:
            outputs, self._outputs = self._outputs, []
        rows += [request_output_fields(out) for out in outputs]
        # Sent even when idle (the engine calls this every 0.1 s then): the parent's gauges flush on a timer
        # and must see the idle values.
        self._conn.send(("outputs", rows, stats, engine is None or engine.is_healthy()))


def _serve_engine(config: EngineConfig, conn) -> None:
    """The child process: build the engine, then obey the parent until told to shut down or orphaned."""
    logging.basicConfig(level=logging.INFO, format="kvtriton-engine: %(message)s", stream=sys.stderr)
    engine_ref: list[LLMEngine] = []
    step_outputs = _StepOutputs(conn, engine_ref)
    try:
        engine = LLMEngine(config, metrics=step_outputs, make_text=False)  # the parent makes the text
    except Exception as exc:
        log.exception("the engine could not start")
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    engine_ref.append(engine)
    conn.send(("ready", engine.admission.limits, str(engine.folder), engine.eos_token_ids))
    engine.start()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone: nobody is left to answer
            engine.shutdown(timeout_s=0)
            return
        if message[0] == "add":
            _, request_id, ids, params = message
            try:
                engine.add_request(request_id, ids, params, step_outputs)
            except Exception as exc:  # raced with a failure, or the queue filled: the parent's request ends
                step_outputs.put(RequestOutput(request_id, [], "", finished=True, finish_reason="error",
                                               error=str(exc) if isinstance(exc, (ValueError, EngineBusyError,
                                                                                  EngineDeadError))
                                               else f"internal error (request {request_id})"))
        elif message[0] == "abort":
            engine.abort(message[1])
        elif message[0] == "shutdown":
            engine.shutdown(timeout_s=message[1])
            step_outputs.observe_step(engine.stats(), force=True)  # the outputs of the last aborts
            conn.send(("closed",))
            return
