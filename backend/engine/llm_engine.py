"""LLMEngine: the decoding loop. Each step: schedule -> prepare -> execute -> sample -> update -> emit.

- schedule: the Scheduler picks {sequence: num_tokens} under one token budget and allocates blocks;
- prepare: the step's packed inputs (backend/runners/step_input.py);
- execute: the runner's forward pass, logits of each sequence's last new token;
- sample: the Sampler, for the sequences that caught up with their tokens (sampling_batch.py);
- update: Scheduler.update_from_output advances, appends, stops by token, frees;
- emit: each request's RequestState turns its token into text (stop strings) for its sink (output_processor.py).

The engine builds the parts, takes requests and runs the loop; StepExecutor (step_executor.py) runs each
step, overlapped with the next, or a verify step when sequences speculate.

Threading contract: one engine thread owns every Sequence, the scheduler, the
block manager and the runner. Other threads (Triton's execute(), asyncio
code, the CLI) only call `add_request` and `abort`, which validate on the
caller's thread and then post to the engine's inbox; the loop drains the
inbox at the start of each step. No locks guard engine state because no other
thread touches it. The engine knows nothing of Triton: whoever owns a
client's connection (the Triton adapter) watches for cancellation and calls
`abort`.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.admission import PROMPT_BYTES_PER_TOKEN, Admission, AdmissionLimits
from kvtriton.backend.engine.block_manager import BlockManager
from kvtriton.backend.engine.generation_defaults import describe, sampling_defaults
from kvtriton.backend.engine.openmp_threads import use_one_openmp_thread
from kvtriton.backend.engine.output_processor import OutputProcessor, fail_request
from kvtriton.backend.engine.outputs import OutputSink, RequestOutput, RequestStream
from kvtriton.backend.engine.sampler import Sampler
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.scheduler import Scheduler, SchedulerConfig
from kvtriton.backend.engine.sequence import Sequence, stop_token_ids
from kvtriton.backend.engine.speculative import create_proposer
from kvtriton.backend.engine.speculative.policy import proposal_cap
from kvtriton.backend.engine.stats import EngineStats
from kvtriton.backend.engine.step_executor import StepExecutor, on_forward_thread
from kvtriton.backend.engine.structured_output import StructuredOutputManager
from kvtriton.backend.engine.token_limits import bad_words_token_ids
from kvtriton.backend.engine.token_output_processor import TokenOutputProcessor
from kvtriton.backend.engine.tokenizer import Tokenizer
from kvtriton.backend.models import host_memory
from kvtriton.backend.models.checkpoint import resolve_checkpoint
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.runners.factory import create_runner, resolve_device_and_dtype

log = logging.getLogger("kvtriton")


class EngineBusyError(RuntimeError):
    """The waiting queue is full (max_num_waiting): the request is refused at once; retrying later may succeed."""


class EngineDeadError(RuntimeError):
    """The engine failed beyond one step and answers no more requests; whoever owns it must restart it."""


# How often the loop looks for requests past max_queue_time_s / max_request_time_s.
EXPIRY_CHECK_INTERVAL_S = 0.1

# Idle this long after work, the loop gives the heap's freed pages back to the OS once (glibc's malloc_trim):
# prompts of many lengths leave freed activations in glibc's heap, resident. On the 2-core VM the shipped CPU
# engine grew 1,457 -> 1,633 MB over 150 prompt lengths and the trim gave 100 MB of it back, in 7 ms. Only after
# a second's idleness, so that no step waits for it (ctypes releases the GIL; a request arriving meanwhile is
# picked up a few milliseconds later at worst).
HEAP_TRIM_IDLE_S = 1.0


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, metrics=None, make_text: bool = True):
        """make_text False: the outputs carry token ids and no text, for a process that makes it (an engine process's
        parent: token_output_processor.py); a request with stop strings is still detokenized here."""
        self.config = config = config or EngineConfig()
        self.folder = folder = resolve_checkpoint(config.model)
        self.model_config = ModelConfig.from_pretrained(folder)
        self.tokenizer = Tokenizer.from_pretrained(folder)
        # What a request's unset sampling keys become (the adapter merges them): the checkpoint's, as vLLM.
        self.sampling_defaults = sampling_defaults(folder, config.generation_config)
        self.device, self.dtype = resolve_device_and_dtype(config)
        limit = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        # CUDA queues work and returns at once; a CPU computes as it is called, so overlapping host work
        # with its forward pass needs a thread that does nothing else (torch releases the GIL in its ops).
        self._forward_thread = (ThreadPoolExecutor(1, "kvtriton-forward") if self.device.type == "cpu" and (
            config.enable_async_scheduling or config.cpu_single_openmp_team) else None)
        # libgomp gives each thread that opens a parallel region a team of its own, and once the teams' threads
        # outnumber the cores it stops spin-waiting between regions. Loading on the forward thread leaves one
        # team, which spins: 2-core VM, int4, quiet, one stream 28 -> 57 tok/s, 32 in flight 159 -> 190; on a
        # shared CPU a spinning team can be 10x slower (README "CPU threads").
        load = partial(on_forward_thread, self._forward_thread if config.cpu_single_openmp_team else None)
        try:
            self.runner = load(create_runner, config, self.model_config, folder, self.device, self.dtype,
                               self.max_model_len)
        except BaseException:
            if self._forward_thread is not None:
                self._forward_thread.shutdown(wait=False)
            raise
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        _say_if_pool_is_short(config, self.runner.num_blocks, self.max_model_len, self.device)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill,
                            self.max_model_len, config.scheduling_policy),
            self.block_manager,
        )
        self.sampler = Sampler()
        # Checkpoints may pad the embedding past the tokenizer's vocabulary (Qwen2 does): those ids
        # have no text, so sampling sees only the ids the tokenizer knows.
        self._sample_vocab = min(self.model_config.vocab_size, self.tokenizer.vocab_size)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.model_config.eos_token_ids)
        self.admission = Admission(self.tokenizer, AdmissionLimits(
            max_model_len=self.max_model_len, vocab_size=self._sample_vocab, num_kv_blocks=self.runner.num_blocks,
            block_size=config.block_size,
            max_prompt_bytes=config.max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * self.max_model_len,
            num_speculative_tokens=config.num_speculative_tokens,
            prompt_logprobs_refusal=_prompt_logprobs_refusal(config), scheduling_policy=config.scheduling_policy,
            lora_names=tuple(config.lora_adapters)))
        self.structured_output = StructuredOutputManager(self.tokenizer, self.eos_token_ids)
        self.structured_output.warm_up()
        self.tokenizer.token_bytes()  # the detokenizers' byte table (~0.1 s) now, not in the first request's TTFT
        self.output_processor = (OutputProcessor(self.scheduler, self.tokenizer) if make_text else
                                 TokenOutputProcessor(self.scheduler, self.tokenizer))
        self.metrics = metrics  # optional: observe_output(RequestOutput), observe_step(EngineStats)
        # Speculative decoding (None: off): proposes tokens that verify steps check (README "Speculative decoding").
        self.proposer = load(create_proposer, config, self.tokenizer, self.runner.num_blocks, self.device,
                             self.dtype, self.max_model_len, self._sample_vocab,
                             getattr(self.runner, "quantization", None))
        self.step_executor = StepExecutor(config, self.runner, self.scheduler, self.sampler, self.output_processor,
                                          self.structured_output, self._sample_vocab, self.device,
                                          self._forward_thread)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # The CPU thread count is logged: an embedding process (Triton's stub, a container's CPU quota) may cap it.
        threads = f", {torch.get_num_threads()} torch threads" if self.device.type == "cpu" else ""
        log.info("engine ready: %s on %s (%s%s), %d KV blocks of %d tokens, max_model_len %d",
                 folder, self.device, str(self.dtype).removeprefix("torch."), threads, self.runner.num_blocks,
                 config.block_size, self.max_model_len)
        log.info(describe(self.sampling_defaults))
        freeze_startup_heap()
        if self.device.type == "cuda":  # from here on a Triton compile stalls a step: say so (kernels/compile_watch.py)
            from kvtriton.backend.kernels.compile_watch import watch_compiles

            watch_compiles()

    @property
    def metrics(self):
        return self.output_processor.metrics

    @metrics.setter
    def metrics(self, metrics) -> None:
        # The output processor reports each output; settable at any time, as a plain attribute would be.
        self.output_processor.metrics = metrics

    # ---- requests (any thread) ---------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    sink: OutputSink | None = None) -> OutputSink:
        """Validate and enqueue. Raises ValueError with a user-facing message for a request that can never run,
        EngineBusyError when the waiting queue is full, EngineDeadError once the engine has failed."""
        if self._fatal is not None:
            raise EngineDeadError("the engine has failed and is being restarted; retry shortly")
        params = params or SamplingParams.from_dict({}, self.sampling_defaults)
        limit = self.config.max_num_waiting
        if limit and len(self.scheduler.waiting) + self._inbox.qsize() >= limit:
            raise EngineBusyError(f"server busy: {limit} requests are already waiting (max_num_waiting); "
                                  "retry later")
        ids = self.admission.admit(prompt, params)
        grammar = self.structured_output.matcher_for(params)  # compiled here, on the caller's thread
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        # A guided request does not speculate: its grammar must see each token before the next is proposed
        # (nor one with allowed_token_ids or bad_words, whose mask the sampler applies as a grammar's); nor one that
        # asks for prompt logprobs (a verify step computes one row a prefill).
        bad_words = bad_words_token_ids(self.tokenizer, params.bad_words)
        speculates = grammar is None and not (params.allowed_token_ids or bad_words) and params.prompt_logprobs is None
        seq = Sequence(request_id, ids, params, stop_token_ids(params, self.eos_token_ids), generator=generator,
                       grammar=grammar, num_speculative_tokens=self._speculative_tokens(params) if speculates else 0,
                       bad_words_token_ids=bad_words, lora_adapter=self._lora_adapter(params))
        sink = sink if sink is not None else RequestStream(request_id)
        self._inbox.put(("add", seq, sink))
        self._wakeup.set()
        return sink

    def _lora_adapter(self, params: SamplingParams) -> int:
        """The request's adapter, 1-based (0: the base model); admission checked its name."""
        names = self.admission.limits.lora_names
        return 0 if params.lora_name is None else names.index(params.lora_name) + 1

    def _speculative_tokens(self, params: SamplingParams) -> int:
        """The request's k: the server's unless it asks for fewer (0: none; more was refused by admission)."""
        k = params.num_speculative_tokens
        return self.config.num_speculative_tokens if k is None else k

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step; its blocks are freed and its stream ends with finish_reason 'abort'."""
        self._inbox.put(("abort", request_id, None))
        self._wakeup.set()

    def max_prompt_bytes(self) -> int:
        """The longest prompt text accepted, in UTF-8 bytes (checked before tokenizing)."""
        return self.admission.limits.max_prompt_bytes

    def is_healthy(self) -> bool:
        """False once the engine has failed beyond one step (or its thread has died): it then answers every
        request with an error, and whoever owns it should restart it."""
        return self._fatal is None and (self._thread is None or self._thread.is_alive() or self._stopping)

    # ---- the loop (engine thread) ------------------------------------------------------------
    def start(self) -> "LLMEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kvtriton-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Let in-flight requests finish (up to timeout_s), abort the rest, stop the thread, and free the
        runner's device memory (so that the process can start another engine)."""
        deadline = time.monotonic() + timeout_s
        while self._thread and self._fatal is None and self.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopping = True
        self._wakeup.set()
        if self._thread:
            self._thread.join(timeout=10)
            if self._thread.is_alive():  # a step is stuck: its runner must stay
                return
            self._thread = None
        self.runner.close()
        gc.unfreeze()  # so that this engine's objects can be collected (a process may start another engine)
        if self.proposer is not None:
            self.proposer.close()
        if self._forward_thread is not None:
            self._forward_thread.shutdown(wait=False)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or not self._inbox.empty() or self.step_executor.pending is not None

    # Set on the engine thread only: a description of the failure that stopped the engine (None: healthy).
    _fatal: str | None = None
    _next_expiry_check = 0.0

    def _run(self) -> None:
        """The loop. A failed step fails its own requests (step()); anything that escapes step() leaves the
        engine's state unknown, so the engine stops serving: `_fail_engine` answers every request."""
        try:
            if self._forward_thread is not None and not use_one_openmp_thread():
                log.warning("the engine thread's torch ops may open an OpenMP team of their own beside the forward "
                            "thread's (no OpenMP runtime found to set): CPU steps may sleep between parallel regions")
            last_busy = None  # when the loop last stepped, until the heap is trimmed after it (HEAP_TRIM_IDLE_S)
            while not self._stopping:
                if not self.has_work():
                    self._check_runner()
                    if self.metrics is not None:  # let gauges settle at idle values
                        self.metrics.observe_step(self.stats())
                    if last_busy is not None and time.monotonic() - last_busy >= HEAP_TRIM_IDLE_S:
                        host_memory.release_freed_heap()
                        last_busy = None
                    self._wakeup.wait(timeout=0.1)
                    self._wakeup.clear()
                    continue
                self.step()
                last_busy = time.monotonic()
                self._expire_requests()
            self._drain_inbox()
            self.output_processor.finish_all("abort", "engine shut down")
        except BaseException as exc:  # noqa: BLE001 - the thread must never end silently
            self._fail_engine(exc)

    def _expire_requests(self) -> None:
        """End requests past max_queue_time_s (not started yet) or max_request_time_s, with an error."""
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + EXPIRY_CHECK_INTERVAL_S
        self.output_processor.expire(now, self.config.max_queue_time_s, self.config.max_request_time_s)

    def _fail_engine(self, exc: BaseException) -> None:
        """Answer every in-flight, queued and later request with an error, until shutdown().

        Engine state (scheduler, blocks) is not trusted any more, so outputs go straight to the sinks."""
        log.critical("engine failed; every request gets an error until the model is restarted", exc_info=exc)
        self.output_processor.fail_all()
        # Only now, so that whoever sees is_healthy() false knows that every request held has been answered.
        self._fatal = f"{type(exc).__name__}: {exc}"
        self._flush_failed()
        while True:  # requests that raced with the failure still reach the inbox
            while True:
                try:
                    kind, item, sink = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    fail_request(item.request_id, sink)
                    self._flush_failed()
            if self._stopping:
                return
            self._wakeup.wait(timeout=0.1)
            self._wakeup.clear()

    def _flush_failed(self) -> None:
        """The metrics hook sees a step after the failure: an engine in a process of its own (EngineProcess) sends
        the errors just put into its sinks, with is_healthy() false, only then."""
        if self.metrics is not None:
            try:
                self.metrics.observe_step(self.stats())
            except Exception:
                log.exception("could not flush the failed engine's errors")

    def step(self) -> None:
        """One step of the loop, after the inbox's requests and aborts are in: a round of the overlapped loop
        (StepExecutor.overlapped_step), or a verify step when sequences speculate, run without overlap
        (StepExecutor.speculative_step). A failed step fails its requests only: the loop and the other
        requests go on."""
        self._drain_inbox()
        running = self.scheduler.running
        # Guided rows take their grammar's mask and advance it one token at a time: a step with one does not
        # speculate (the verify path samples without masks); nor a step that may prefill a prompt whose logprobs
        # are asked for (the verify path takes one logits row a prefill).
        if (self.proposer is not None and proposal_cap(self.config, len(running))
                and any(seq.num_speculative_tokens for seq in running)
                and not any(seq.grammar is not None for seq in running)
                and not any(seq.needs_prompt_logprobs for seq in self.scheduler.prompt_logprob_seqs)):
            self.step_executor.speculative_step(self.proposer)
        else:
            self.step_executor.overlapped_step()
        if self.metrics is not None:
            self.metrics.observe_step(self.stats())

    def _check_runner(self) -> None:
        """A runner that can run no further step (a tensor-parallel rank died) fails the engine, even when idle."""
        check_health = getattr(self.runner, "check_health", None)
        if check_health is not None:
            check_health()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item, sink = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.output_processor.add(item, sink)
            else:
                self.output_processor.abort(item)

    # ---- observation ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm, verifier = self.block_manager, self.step_executor.verifier
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=bm.usage, num_kv_blocks=bm.num_blocks, num_free_kv_blocks=bm.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions, num_prompt_tokens=self.scheduler.num_prompt_tokens,
            num_generation_tokens=self.scheduler.num_generation_tokens,
            num_prefix_cache_queries=bm.prefix_queries, num_prefix_cache_hits=bm.prefix_hits,
            num_spec_proposed_tokens=verifier.num_proposed_tokens,
            num_spec_accepted_tokens=verifier.num_accepted_tokens, num_spec_drafts=verifier.num_drafts,
        )

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Convenience for scripts and tests: run prompts to completion on the engine thread."""
        self.start()
        streams = [self.add_request(f"gen-{time.monotonic_ns()}-{i}", p, params) for i, p in enumerate(prompts)]
        return [s.result() for s in streams]


def freeze_startup_heap() -> None:
    """Move every object alive after start-up (the model, compiled graphs, tokenizer, modules) into the permanent
    generation, which the garbage collector never scans, as vLLM does once its engine is warm (freeze_gc_heap).
    Otherwise a full collection walks them all while serving: an H200 host, 1B-class model, 64 requests, one
    stall of 320 ms. Collecting first, so that no garbage of the start-up is made permanent."""
    gc.collect()
    gc.freeze()


def _say_if_pool_is_short(config: EngineConfig, num_blocks: int, max_model_len: int, device: torch.device) -> None:
    """One line at load where the KV pool holds fewer tokens than max_model_len (vLLM stops there; here the
    model serves, and Admission refuses each request that needs more, naming the pool): what sizes the pool."""
    tokens = num_blocks * config.block_size
    if tokens >= max_model_len:
        return
    sized_by = ("num_kv_blocks sets it" if config.num_kv_blocks else
                f"kv_cache_memory_gb ({config.kv_cache_memory_gb:g} GiB) sizes it" if device.type != "cuda" else
                f"gpu_memory_utilization ({config.gpu_memory_utilization:g}) leaves it")
    log.warning("KV pool: %d tokens (%d blocks of %d), fewer than max_model_len %d: a request whose prompt and "
                "max_tokens need more is refused; %s (raise it, or lower max_model_len)", tokens, num_blocks,
                config.block_size, max_model_len, sized_by)


def _prompt_logprobs_refusal(config: EngineConfig) -> str:
    """Admission's reason to refuse prompt_logprobs on this engine ("": none)."""
    if config.runner != "torch":
        return f"the {config.runner} runner's graph computes only each sequence's last logits; use the torch runner"
    if config.tensor_parallel_size > 1:
        return "a tensor-parallel step sends one logits row a sequence; use tensor_parallel_size 1"
    if not config.enable_chunked_prefill:
        return ("such a prompt is prefilled max_num_seqs tokens a step, which needs enable_chunked_prefill (the "
                "logits of every prompt token at once could exhaust the device's memory)")
    return ""
