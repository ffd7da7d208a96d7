"""LLMEngine: the decoding loop. Each step: schedule -> prepare -> execute -> sample -> update -> emit.

- schedule: the Scheduler picks {sequence: num_tokens} under one token budget and allocates blocks;
- prepare: the step's packed inputs (backend/runners/step_input.py);
- execute: the runner's forward pass, logits of each sequence's last new token;
- sample: the Sampler, for the sequences that caught up with their tokens;
- update: Scheduler.update_from_output advances, appends, stops by token, frees;
- emit: each request's RequestState turns its token into text (stop strings) for its sink.

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
from dataclasses import dataclass

import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.admission import PROMPT_BYTES_PER_TOKEN, Admission, AdmissionLimits
from kvtriton.backend.engine.block_manager import BlockManager
from kvtriton.backend.engine.outputs import OutputSink, RequestOutput, RequestStream, TokenLogprob, merge_outputs
from kvtriton.backend.engine.request_state import RequestState
from kvtriton.backend.engine.sampler import Sampler, SamplingMetadata
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from kvtriton.backend.engine.sequence import Sequence, SequenceStatus
from kvtriton.backend.engine.speculative import create_proposer
from kvtriton.backend.engine.speculative.policy import proposal_cap, proposal_lengths
from kvtriton.backend.engine.speculative.verification import VerifyRows, accepted_runs
from kvtriton.backend.engine.structured_output import StructuredOutputManager
from kvtriton.backend.engine.tokenizer import Tokenizer
from kvtriton.backend.kernels.device_copy import to_device
from kvtriton.backend.models.checkpoint import resolve_checkpoint
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.runners.decode_inputs import DecodeInputs
from kvtriton.backend.runners.factory import create_runner, resolve_device_and_dtype
from kvtriton.backend.runners.step_input import StepInput, prepare_step
from kvtriton.backend.runners.tensor_parallel_runner import RunnerFailedError

log = logging.getLogger("kvtriton")


class EngineBusyError(RuntimeError):
    """The waiting queue is full (max_num_waiting): the request is refused at once; retrying later may succeed."""


class EngineDeadError(RuntimeError):
    """The engine failed beyond one step and answers no more requests; whoever owns it must restart it."""


# How often the loop looks for requests past max_queue_time_s / max_request_time_s.
EXPIRY_CHECK_INTERVAL_S = 0.1


@dataclass(frozen=True)
class EngineStats:
    """EngineStats(): an engine that has done nothing yet."""

    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use
    num_kv_blocks: int = 0
    num_free_kv_blocks: int = 0
    num_preemptions: int = 0  # since start
    num_prompt_tokens: int = 0  # computed prompt tokens since start (prefix hits excluded)
    num_generation_tokens: int = 0  # since start
    # Speculative decoding, since start: proposals verified, and how many of them were accepted.
    num_spec_proposed_tokens: int = 0
    num_spec_accepted_tokens: int = 0
    num_spec_drafts: int = 0  # sequence-steps that verified at least one proposal (vLLM's num_drafts)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verifying sequence gains per verify step: 1 + accepted / drafts (vLLM's definition)."""
        return 1 + self.num_spec_accepted_tokens / self.num_spec_drafts if self.num_spec_drafts else 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, metrics=None):
        self.config = config = config or EngineConfig()
        self.folder = folder = resolve_checkpoint(config.model)
        self.model_config = ModelConfig.from_pretrained(folder)
        self.tokenizer = Tokenizer.from_pretrained(folder)
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
        load = self._heavy if config.cpu_single_openmp_team else (lambda fn, *args: fn(*args))
        try:
            self.runner = load(create_runner, config, self.model_config, folder, self.device, self.dtype,
                               self.max_model_len)
        except BaseException:
            if self._forward_thread is not None:
                self._forward_thread.shutdown(wait=False)
            raise
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill,
                            self.max_model_len),
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
            num_speculative_tokens=config.num_speculative_tokens))
        self.structured_output = StructuredOutputManager(self.tokenizer, self.eos_token_ids)
        self.tokenizer.token_bytes()  # the detokenizers' byte table (~0.1 s) now, not in the first request's TTFT
        self.metrics = metrics  # optional: observe_output(RequestOutput), observe_step(EngineStats)
        # Speculative decoding (None: off): proposes tokens that verify steps check (README "Speculative decoding").
        self.proposer = load(create_proposer, config, self.tokenizer, self.runner.num_blocks, self.device,
                             self.dtype, self.max_model_len, self._sample_vocab)
        self.num_spec_proposed_tokens = self.num_spec_accepted_tokens = self.num_spec_drafts = 0
        self._states: dict[str, RequestState] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pending: PendingStep | None = None  # the step whose tokens the host has not seen yet
        # The last step's sample rows, its sampling metadata and their output tokens then: see _sampling_metadata.
        self._last_meta: tuple[list[Sequence], SamplingMetadata, int] | None = None
        self._decode_inputs = DecodeInputs(config.block_size, self.device)  # a steady decode batch's inputs
        # The CPU thread count is logged: an embedding process (Triton's stub, a container's CPU quota) may cap it.
        threads = f", {torch.get_num_threads()} torch threads" if self.device.type == "cpu" else ""
        log.info("engine ready: %s on %s (%s%s), %d KV blocks of %d tokens, max_model_len %d",
                 folder, self.device, str(self.dtype).removeprefix("torch."), threads, self.runner.num_blocks,
                 config.block_size, self.max_model_len)
        freeze_startup_heap()

    # ---- requests (any thread) ---------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    sink: OutputSink | None = None) -> OutputSink:
        """Validate and enqueue. Raises ValueError with a user-facing message for a request that can never run,
        EngineBusyError when the waiting queue is full, EngineDeadError once the engine has failed."""
        if self._fatal is not None:
            raise EngineDeadError("the engine has failed and is being restarted; retry shortly")
        params = params or SamplingParams()
        limit = self.config.max_num_waiting
        if limit and len(self.scheduler.waiting) + self._inbox.qsize() >= limit:
            raise EngineBusyError(f"server busy: {limit} requests are already waiting (max_num_waiting); "
                                  "retry later")
        ids = self.admission.admit(prompt, params)
        grammar = self.structured_output.matcher_for(params)  # compiled here, on the caller's thread
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_token_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        # A guided request does not speculate: its grammar must see each token before the next is proposed.
        seq = Sequence(request_id, ids, params, stop_token_ids, generator=generator, grammar=grammar,
                       num_speculative_tokens=0 if grammar is not None else self._speculative_tokens(params))
        sink = sink if sink is not None else RequestStream(request_id)
        self._inbox.put(("add", seq, sink))
        self._wakeup.set()
        return sink

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
        return self.scheduler.has_work() or not self._inbox.empty() or self._pending is not None

    # Set on the engine thread only: a description of the failure that stopped the engine (None: healthy).
    _fatal: str | None = None
    _next_expiry_check = 0.0

    def _run(self) -> None:
        """The loop. A failed step fails its own requests (step()); anything that escapes step() leaves the
        engine's state unknown, so the engine stops serving: `_fail_engine` answers every request."""
        try:
            while not self._stopping:
                if not self.has_work():
                    self._check_runner()
                    if self.metrics is not None:  # let gauges settle at idle values
                        self.metrics.observe_step(self.stats())
                    self._wakeup.wait(timeout=0.1)
                    self._wakeup.clear()
                    continue
                self.step()
                self._expire_requests()
            self._drain_inbox()
            for request_id in list(self._states):
                self._finish(request_id, "abort", "engine shut down")
        except BaseException as exc:  # noqa: BLE001 - the thread must never end silently
            self._fail_engine(exc)

    def _expire_requests(self) -> None:
        """End requests past max_queue_time_s (not started yet) or max_request_time_s, with an error."""
        now = time.monotonic()
        if now < self._next_expiry_check:
            return
        self._next_expiry_check = now + EXPIRY_CHECK_INTERVAL_S
        queue_limit, request_limit = self.config.max_queue_time_s, self.config.max_request_time_s
        if queue_limit:
            for seq in [s for s in self.scheduler.waiting
                        if s.num_output_tokens == 0 and now - s.arrival_time > queue_limit]:
                if seq.request_id in self._states:
                    self._finish(seq.request_id, "error", f"server busy: the request waited {queue_limit:g} s "
                                 "without starting (max_queue_time_s); retry later")
        if request_limit:
            for request_id in [r for r, state in self._states.items()
                               if now - state.seq.arrival_time > request_limit]:
                self._finish(request_id, "error", f"the request ran longer than {request_limit:g} s "
                             "(max_request_time_s) and was stopped")

    def _fail_engine(self, exc: BaseException) -> None:
        """Answer every in-flight, queued and later request with an error, until shutdown().

        Engine state (scheduler, blocks) is not trusted any more, so outputs go straight to the sinks."""
        log.critical("engine failed; every request gets an error until the model is restarted", exc_info=exc)
        for request_id, state in list(self._states.items()):
            self._fail_request(request_id, state.sink)
        self._states.clear()
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
                    self._fail_request(item.request_id, sink)
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

    @staticmethod
    def _fail_request(request_id: str, sink: OutputSink) -> None:
        error = f"internal error (request {request_id}): the engine failed; the server restarts the model, retry"
        try:
            sink.put(RequestOutput(request_id, [], "", finished=True, finish_reason="error", error=error))
        except Exception:
            log.exception("could not deliver the error of request %s", request_id)

    def step(self) -> None:
        """One round of the overlapped loop, after vLLM's async scheduling and SGLang's overlap scheduler:

            schedule N+1 -> prepare N+1 -> execute N+1 (queued on the device)
            -> update N (the host waits for step N's tokens only; the device is busy with N+1)
            -> sample N+1 (queued; its tokens reach the host next round) -> emit N (text, stop strings)

        Step N+1's sequences that sampled in step N read that token straight from the device, and
        sampling N+1 comes after update N, so penalties and stop-token masks see every token. On a CPU,
        which computes as it is called, execute + sample N+1 run on the forward thread while the engine
        thread emits N. A failed step fails its requests only: the loop and the other requests go on.

        A step in which sequences speculate is a verify step, run without overlap (_speculative_step)."""
        self._drain_inbox()
        running = self.scheduler.running
        # Guided rows take their grammar's mask and advance it one token at a time: a step with one does not
        # speculate (the verify path samples without masks).
        if (self.proposer is not None and proposal_cap(self.config, len(running))
                and any(seq.num_speculative_tokens for seq in running)
                and not any(seq.grammar is not None for seq in running)):
            self._speculative_step()
        else:
            self._overlapped_step()
        if self.metrics is not None:
            self.metrics.observe_step(self.stats())

    def _overlapped_step(self) -> None:
        sched = self.scheduler.schedule()
        step = logits = job = None
        if not sched.is_empty:
            try:
                step = self._prepare(sched)
                if self._forward_thread is None:
                    logits = self.runner.execute(step)  # (B, V), queued on the device
            except Exception as exc:  # a runner fault must not take the other requests or the thread down
                self._fail(sched, exc)
                step = None
        finished, self._pending = self._pending, None
        tokens = None
        if finished is not None:
            try:
                tokens = self._update(finished)
            except Exception as exc:
                self._fail(finished.sched, exc)
        if step is not None:
            try:
                meta = self._sampling_metadata(sched, finished if tokens is not None else None)
                if self._forward_thread is None:
                    self._pending = self._sample(sched, logits, meta)
                else:
                    job = self._forward_thread.submit(self._execute_and_sample, sched, step, meta)
            except Exception as exc:
                self._fail(sched, exc)
        if tokens is not None:
            self._emit_tokens(*tokens)
        if job is not None:
            try:
                self._pending = job.result()
            except Exception as exc:
                self._fail(sched, exc)
        if not self.config.enable_async_scheduling and self._pending is not None:
            # The synchronous loop (to measure what the overlap brings): this step's tokens now.
            finished, self._pending = self._pending, None
            self._emit_tokens(*self._update(finished))

    def _speculative_step(self) -> None:
        """A verify step: proposals for the sequences that speculate, then one forward pass of the target over
        every scheduled token (plain decodes and prefills share it), then each sequence's accepted run.

        It runs synchronously: the host must know how many proposals each sequence kept before it can
        propose and schedule that sequence again, so the step in flight is finished first and this one
        is not overlapped with the next. vLLM made the same choice: its async scheduling (PR 19970)
        refused speculative decoding; the later support (PR 24799) overlaps only the GPU drafters
        (EAGLE, MTP) and still waits for the target's forward pass before preparing the next step, and
        async scheduling stays off for the other methods (PR 31998), its CPU n-gram proposer included.
        Steps without speculation (the back-off, requests with k = 0 only) keep the overlap."""
        finished, self._pending = self._pending, None
        if finished is not None:
            try:
                self._emit_tokens(*self._update(finished))
            except Exception as exc:
                self._fail(finished.sched, exc)
        running = self.scheduler.running
        seqs, ks = proposal_lengths(running, self.max_model_len, proposal_cap(self.config, len(running)))
        try:
            for seq, proposal in zip(seqs, self._heavy(self.proposer.propose, seqs, ks)):
                seq.spec_token_ids = proposal
        except Exception:  # a failed proposer costs the speed-up of this step, not the requests
            log.exception("speculative proposer failed: this step decodes without proposals")
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return
        try:
            step = self._prepare(sched)
            runs = self._heavy(lambda: self._verify(sched, self.runner.execute(step)))
        except Exception as exc:
            self._fail(sched, exc)
            return
        for seq, tokens, lps in runs:
            self._emit_run(seq, tokens, lps)

    def _heavy(self, fn, *args):
        """fn(*args) on the forward thread when there is one (a CPU): every forward pass and sampling op on one
        thread keeps one OpenMP team busy, where two threads that take turns make libgomp stop spin-waiting
        (measured: the verify step's sampling on the engine thread made the self-int8 draft a net loss). The
        engine thread waits meanwhile, so the scheduler is still touched by one thread at a time."""
        return fn(*args) if self._forward_thread is None else self._forward_thread.submit(fn, *args).result()

    def _verify(self, sched: SchedulerOutput, logits: torch.Tensor
                ) -> list[tuple[Sequence, list[int], list[TokenLogprob | None]]]:
        """Sample every verified position, keep each sequence's accepted run, roll back the rest."""
        rows = VerifyRows.build(sched.scheduled, sched.sample_indices)
        if not rows.proposals:
            return []
        meta = SamplingMetadata.build(rows.params, rows.prompt_token_ids, rows.output_token_ids, rows.generators,
                                      rows.stop_token_ids, self._sample_vocab, self.device)
        index = to_device(torch.tensor(rows.logits_rows, dtype=torch.int64), self.device)
        out = self.sampler(logits.index_select(0, index)[:, : self._sample_vocab], meta)
        sampled, chosen, top_ids, top_lps = HostCopy.start(
            out.sampled_token_ids, out.logprobs, out.top_token_ids, out.top_logprobs).wait()
        spans = accepted_runs(sampled, rows.proposals)
        self.scheduler.rollback_proposals(sched, [n - 1 for _, n in spans])
        runs = []
        for i, props, (first, n) in zip(sched.sample_indices, rows.proposals, spans):
            seq = sched.scheduled[i][0]
            self.num_spec_proposed_tokens += len(props)
            self.num_spec_accepted_tokens += n - 1
            self.num_spec_drafts += bool(props)
            seq.num_spec_proposed_tokens += len(props)
            seq.num_spec_accepted_tokens += n - 1
            lps = [self._logprob(seq, sampled[r], r, chosen, top_ids, top_lps) for r in range(first, first + n)]
            runs.append((seq, sampled[first : first + n], lps))
        return runs

    @staticmethod
    def _logprob(seq: Sequence, token_id: int, row: int, chosen, top_ids, top_lps) -> TokenLogprob | None:
        n = seq.params.logprobs
        if n is None or chosen is None:
            return None
        top = list(zip(top_ids[row][:n], top_lps[row][:n])) if n and top_ids else []
        return TokenLogprob(token_id=token_id, logprob=chosen[row], top=top)

    def _prepare(self, sched: SchedulerOutput) -> StepInput:
        """The step's inputs; tokens the host does not know yet come from the step in flight, on the device."""
        step = self._decode_inputs.step(sched.scheduled)
        if step is None:
            step = prepare_step(sched.scheduled, self.config.block_size, self.device)
        if step.placeholders:
            pending = self._pending  # placeholders exist only while the step that samples them is pending
            before = pending.sched.sampled_seqs
            if len(step.placeholders) == step.input_ids.shape[0] and same_rows(before, [s for s, _ in sched.scheduled]):
                # A steady decode batch: token j is row j's, sampled in row j of the step before.
                step.input_ids.copy_(pending.token_ids)
                return step
            source = {seq.request_id: j for j, seq in enumerate(before)}
            positions = [position for position, _ in step.placeholders]
            rows = [source[sched.scheduled[row][0].request_id] for _, row in step.placeholders]
            index = to_device(torch.tensor([positions, rows], dtype=torch.int64), self.device)
            step.input_ids.index_copy_(0, index[0], pending.token_ids.index_select(0, index[1]))
        return step

    def _execute_and_sample(self, sched: SchedulerOutput, step: StepInput,
                            meta: SamplingMetadata | None) -> PendingStep | None:
        """The forward thread's job on a CPU: every heavy op of a step on one thread (and one OpenMP team)."""
        return self._sample(sched, self.runner.execute(step), meta)

    def _sampling_metadata(self, sched: SchedulerOutput, previous: PendingStep | None) -> SamplingMetadata | None:
        """previous: the step whose tokens the host has just taken (None if none)."""
        seqs = sched.sampled_seqs
        if not seqs:
            return None
        # The same sequences in the same rows as the step before (a steady decode batch), and nothing in its
        # metadata that moves with their outputs: that step's metadata serves again, with no per-row work
        # (vLLM keeps its sampling tensors in a persistent batch for the same reason). Penalty counts move by
        # the one token each row has sampled since: added on the device from that step's tokens.
        last = self._last_meta
        steady = last is not None and same_rows(last[0], seqs)
        if steady and last[1].outlives_step:
            meta, num_outputs = last[1], last[2]
        else:
            num_outputs = sum(s.num_output_tokens for s in seqs)
            # Counts may move on only if each row took exactly the one token `previous` sampled for it.
            if (steady and last[1].counts_move_alone and num_outputs == last[2] + len(seqs)
                    and previous is not None and same_rows(previous.sched.sampled_seqs, seqs)):
                meta = last[1]
                meta.count_new_tokens(previous.token_ids)
            else:
                meta = SamplingMetadata.build(
                    [s.params for s in seqs], [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs],
                    [s.generator for s in seqs], [s.stop_token_ids for s in seqs], self._sample_vocab, self.device,
                )
        self._last_meta = seqs, meta, num_outputs
        # After the previous step's update, so guided rows' grammars have taken every token before this one.
        meta.allowed_token_bitmask = self.structured_output.bitmask(seqs, self.device)
        return meta

    def _sample(self, sched: SchedulerOutput, logits: torch.Tensor,
                meta: SamplingMetadata | None) -> PendingStep | None:
        """Queue sampling of one token for each sequence in sched.sample_indices; the tokens (and logprobs
        where asked for) start their way to the host without waiting."""
        rows = sched.sample_indices
        if meta is None:
            return None
        logits = logits[rows] if len(rows) < len(sched.scheduled) else logits  # (B, V)
        out = self.sampler(logits[:, : self._sample_vocab], meta)
        return PendingStep(sched, out.sampled_token_ids, HostCopy.start(
            out.sampled_token_ids, out.logprobs, out.top_token_ids, out.top_logprobs))

    def _update(self, pending: PendingStep) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """Step N's tokens on the host (the loop's one wait), into the scheduler: placeholders resolved."""
        token_ids, chosen, top_ids, top_lps = pending.host.wait()
        seqs, kept = self.scheduler.update_from_output(pending.sched, token_ids)
        token_ids = [token_ids[j] for j in kept]
        logprobs = [None] * len(seqs) if chosen is None else [
            self._logprob(seq, t, j, chosen, top_ids, top_lps) for seq, j, t in zip(seqs, kept, token_ids)]
        return self._advance_grammars(seqs, token_ids, logprobs)

    def _check_runner(self) -> None:
        """A runner that can run no further step (a tensor-parallel rank died) fails the engine, even when idle."""
        check_health = getattr(self.runner, "check_health", None)
        if check_health is not None:
            check_health()

    def _advance_grammars(self, seqs: list[Sequence], token_ids: list[int], logprobs: list[TokenLogprob | None]
                          ) -> tuple[list[Sequence], list[int], list[TokenLogprob | None]]:
        """Guided sequences' grammars take the step's tokens. A complete grammar ends its request ("stop", after
        the token's text). A rejected token ends its request with an error and is dropped: the mask lets only
        the grammar's tokens through, so that takes a row whose logits were all -inf or NaN."""
        rejected: list[int] = []
        for i, (seq, token_id) in enumerate(zip(seqs, token_ids)):
            if seq.grammar is None or seq.finish_reason is not None:  # unguided, or ended by a stop token / length
                continue
            if not seq.grammar.accept(token_id):
                rejected.append(i)
            elif seq.grammar.is_terminated:
                seq.finish_reason = "stop"
                self.scheduler.finish(seq)
        if not rejected:
            return seqs, token_ids, logprobs
        for i in rejected:
            seq = seqs[i]
            self._finish(seq.request_id, "error", f"request {seq.request_id}: token {token_ids[i]} does not fit "
                         f"the guided_* constraint ({seq.grammar.error})")
        dropped = set(rejected)
        keep = [i for i in range(len(seqs)) if i not in dropped]
        return [seqs[i] for i in keep], [token_ids[i] for i in keep], [logprobs[i] for i in keep]

    def _fail(self, sched: SchedulerOutput, exc: Exception) -> None:
        """A step failed: its requests end with an error that names the request, the detail goes to the log.
        A runner that cannot go on (RunnerFailedError) fails the engine instead: every request gets an error."""
        if isinstance(exc, RunnerFailedError):
            raise exc
        log.error("engine step failed", exc_info=exc)
        for seq, _ in sched.scheduled:
            if seq.request_id in self._states and self._states[seq.request_id].seq is seq:
                self._finish(seq.request_id, "error", f"internal error (request {seq.request_id})")

    def _emit_tokens(self, seqs: list[Sequence], token_ids: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """Output processing for a step's tokens: text (each request's DecodeStream), stop strings, sinks."""
        for seq, token_id, lp in zip(seqs, token_ids, logprobs):
            state = self._states[seq.request_id]
            output = self._process_token(state, token_id, lp)
            if output is not None:
                self._emit(state, output)

    def _emit_run(self, seq: Sequence, token_ids: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """A verify step's accepted run of one sequence: each token reaches the scheduler and the text one
        position at a time, as plain decode steps would bring them (a stop token, max_tokens or a stop string
        inside the run ends it there); then the run goes out as one output, one streamed response rather than
        one per token."""
        state, outputs = self._states.get(seq.request_id), []
        for token_id, lp in zip(token_ids, logprobs):
            if seq.status is SequenceStatus.FINISHED:
                break
            self.scheduler.append_token(seq, token_id)
            output = self._process_token(state, token_id, lp, outputs)
            if output is None:
                return
            outputs.append(output)
        if outputs:
            self._emit(state, outputs[0] if len(outputs) == 1 else merge_outputs(outputs))

    def _process_token(self, state: RequestState, token_id: int, logprob: TokenLogprob | None,
                       unsent: list[RequestOutput] = ()) -> RequestOutput | None:
        """The request's output for a token the scheduler has appended; a finished one ends the request here.
        None when processing failed: the request has ended with an error (after its `unsent` outputs)."""
        seq = state.seq
        try:
            output = state.process_token(token_id, logprob)
        except Exception:  # one request's failure (detokenizing, say) ends that request only
            log.exception("request %s failed", seq.request_id)
            if unsent:
                self._emit(state, merge_outputs(unsent))
            self._finish(seq.request_id, "error", f"internal error (request {seq.request_id})")
            return None
        if output.finished:
            if seq.finish_reason is None:  # a stop string: the scheduler has not ended it
                self.scheduler.finish(seq)
            del self._states[seq.request_id]
        return output

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item, sink = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                if item.request_id in self._states:
                    sink.put(RequestOutput(item.request_id, [], "", finished=True, finish_reason="error",
                                           error=f"request id {item.request_id!r} is already in flight"))
                    continue
                self._states[item.request_id] = RequestState(item, sink, self.tokenizer)
                self.scheduler.add(item)
            elif item in self._states:
                self._finish(item, "abort")

    def _finish(self, request_id: str, reason: str, error: str | None = None) -> None:
        state = self._states.pop(request_id)
        self.scheduler.finish(state.seq)
        self._emit(state, state.final(reason, error))

    def _emit(self, state: RequestState, output: RequestOutput) -> None:
        try:
            state.sink.put(output)
        except Exception:  # a broken client connection must not stop the loop
            log.exception("could not deliver output of request %s", state.seq.request_id)
        if self.metrics is not None:
            self.metrics.observe_output(output)

    # ---- observation ------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_usage=bm.usage, num_kv_blocks=bm.num_blocks, num_free_kv_blocks=bm.num_free_blocks,
            num_preemptions=self.scheduler.num_preemptions, num_prompt_tokens=self.scheduler.num_prompt_tokens,
            num_generation_tokens=self.scheduler.num_generation_tokens,
            num_spec_proposed_tokens=self.num_spec_proposed_tokens,
            num_spec_accepted_tokens=self.num_spec_accepted_tokens, num_spec_drafts=self.num_spec_drafts,
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


def same_rows(before: list[Sequence], now: list[Sequence]) -> bool:
    """The same sequence objects in the same rows: a steady batch, whose per-row step state carries over."""
    return len(before) == len(now) and all(a is b for a, b in zip(before, now))


@dataclass
class HostCopy:
    """Device tensors on their way into pinned host memory; `wait()` blocks on this copy only, not on
    work queued after it."""

    tensors: list[torch.Tensor | None]
    done: torch.cuda.Event | None

    @classmethod
    def start(cls, *tensors: torch.Tensor | None) -> "HostCopy":
        if not any(t is not None and t.is_cuda for t in tensors):
            return cls(list(tensors), None)
        host = [None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for t in tensors]
        done = torch.cuda.Event()
        done.record()
        return cls(host, done)

    def wait(self) -> list:
        if self.done is not None:
            self.done.synchronize()
        return [None if t is None else t.tolist() for t in self.tensors]


@dataclass
class PendingStep:
    """A step whose sampling is queued: `token_ids` (B,) stay on the device to feed the next step."""

    sched: SchedulerOutput
    token_ids: torch.Tensor
    host: HostCopy
