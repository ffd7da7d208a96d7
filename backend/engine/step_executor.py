"""StepExecutor: one engine step, overlapped with the next, or a verify step when sequences speculate.

Each step: schedule -> prepare -> execute -> sample -> update -> emit (llm_engine.py names the parts).
It runs on the engine thread, which owns every part it touches (llm_engine.py's threading contract); on
a CPU the heavy ops go to the forward thread that the engine hands in, while the engine thread waits or
emits, so the scheduler is still touched by one thread at a time.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.output_processor import OutputProcessor
from kvtriton.backend.engine.outputs import TokenLogprob
from kvtriton.backend.engine.pending_step import HostCopy, PendingStep, token_logprob
from kvtriton.backend.engine.prompt_logprobs import record_prompt_logprobs, split_prompt_logits
from kvtriton.backend.engine.sampler import Sampler
from kvtriton.backend.engine.sampling_batch import SamplingBatch
from kvtriton.backend.engine.sampling_metadata import SamplingMetadata
from kvtriton.backend.engine.scheduler import Scheduler, SchedulerOutput
from kvtriton.backend.engine.sequence import Sequence
from kvtriton.backend.engine.speculative import Proposer
from kvtriton.backend.engine.speculative.policy import proposal_cap, proposal_lengths
from kvtriton.backend.engine.speculative.verify_step import Verifier
from kvtriton.backend.engine.structured_output import StructuredOutputManager
from kvtriton.backend.runners.decode_inputs import DecodeInputs
from kvtriton.backend.runners.step_input import StepInput, prepare_step
from kvtriton.backend.runners.tensor_parallel_runner import RunnerFailedError

log = logging.getLogger("kvtriton")

# How often the engine thread, waiting for the forward thread, asks the runner whether it can still finish.
HEALTH_POLL_S = 0.1


def on_forward_thread(forward_thread: ThreadPoolExecutor | None, fn, *args, runner=None):
    """fn(*args) on the forward thread when there is one (a CPU): every forward pass and sampling op on one
    thread keeps one OpenMP team busy, where two threads that take turns make libgomp stop spin-waiting
    (measured: the verify step's sampling on the engine thread made the self-int8 draft a net loss). The
    engine thread waits meanwhile, so the scheduler is still touched by one thread at a time. runner: the
    runner fn drives, whose health is checked while waiting (forward_result)."""
    return fn(*args) if forward_thread is None else forward_result(forward_thread.submit(fn, *args), runner)


def forward_result(job: Future, runner=None):
    """The forward thread's result, waited for while the runner says it can still finish (check_health, a
    tensor-parallel runner's). A rank that died can leave the forward thread in a collective that does not return
    (gloo, once in CI: no error within 60 s after the runner had seen the rank exit), and the engine thread must
    not wait with it: RunnerFailedError then fails the engine, and every request gets its error."""
    check_health = getattr(runner, "check_health", None)
    if check_health is None:
        return job.result()
    while True:
        try:
            return job.result(timeout=HEALTH_POLL_S)
        except FutureTimeout:
            check_health()


class StepExecutor:
    def __init__(self, config: EngineConfig, runner, scheduler: Scheduler, sampler: Sampler,
                 output_processor: OutputProcessor, structured_output: StructuredOutputManager, vocab_size: int,
                 device: torch.device, forward_thread: ThreadPoolExecutor | None):
        self.config, self.runner, self.scheduler, self.sampler = config, runner, scheduler, sampler
        self.output_processor, self.device, self._forward_thread = output_processor, device, forward_thread
        self._sample_vocab = vocab_size
        self.pending: PendingStep | None = None  # the step whose tokens the host has not seen yet
        self.sampling_batch = SamplingBatch(structured_output, vocab_size, device)
        self.verifier = Verifier(scheduler, sampler, vocab_size, device)
        self._decode_inputs = DecodeInputs(config.block_size, device)  # a steady decode batch's inputs

    def overlapped_step(self) -> None:
        """One round of the overlapped loop, after vLLM's async scheduling and SGLang's overlap scheduler:

            schedule N+1 -> prepare N+1 -> execute N+1 (queued on the device)
            -> update N (the host waits for step N's tokens only; the device is busy with N+1)
            -> sample N+1 (queued; its tokens reach the host next round) -> emit N (text, stop strings)

        Step N+1's sequences that sampled in step N read that token straight from the device, and
        sampling N+1 comes after update N, so penalties and stop-token masks see every token. On a CPU,
        which computes as it is called, execute + sample N+1 run on the forward thread while the engine
        thread emits N. A failed step fails its requests only: the loop and the other requests go on."""
        sched = self.scheduler.schedule()
        step = logits = job = None
        if not sched.is_empty:
            try:
                step = self._prepare(sched)
                if self._forward_thread is None:
                    logits = self._execute(step, sched)  # (B, V), queued on the device
            except Exception as exc:  # a runner fault must not take the other requests or the thread down
                self._fail(sched, exc)
                step = None
        finished, self.pending = self.pending, None
        tokens = None
        if finished is not None:
            try:
                tokens = self._update(finished)
            except Exception as exc:
                self._fail(finished.sched, exc)
        if step is not None:
            try:
                meta = self.sampling_batch.metadata(sched, finished if tokens is not None else None)
                if self._forward_thread is None:
                    self.pending = self._sample(sched, logits, meta)
                else:
                    job = self._forward_thread.submit(self._execute_and_sample, sched, step, meta)
            except Exception as exc:
                self._fail(sched, exc)
        if tokens is not None:
            self.output_processor.emit_tokens(*tokens)
        if job is not None:
            try:
                self.pending = forward_result(job, self.runner)
            except Exception as exc:
                self._fail(sched, exc)
        if not self.config.enable_async_scheduling and self.pending is not None:
            # The synchronous loop (to measure what the overlap brings): this step's tokens now.
            finished, self.pending = self.pending, None
            self.output_processor.emit_tokens(*self._update(finished))

    def speculative_step(self, proposer: Proposer) -> None:
        """A verify step: proposals for the sequences that speculate, then one forward pass of the target over
        every scheduled token (plain decodes and prefills share it), then each sequence's accepted run.

        It runs synchronously: the host must know how many proposals each sequence kept before it can
        propose and schedule that sequence again, so the step in flight is finished first and this one
        is not overlapped with the next. vLLM made the same choice: its async scheduling (PR 19970)
        refused speculative decoding; the later support (PR 24799) overlaps only the GPU drafters
        (EAGLE, MTP) and still waits for the target's forward pass before preparing the next step, and
        async scheduling stays off for the other methods (PR 31998), its CPU n-gram proposer included.
        Steps without speculation (the back-off, requests with k = 0 only) keep the overlap."""
        finished, self.pending = self.pending, None
        if finished is not None:
            try:
                self.output_processor.emit_tokens(*self._update(finished))
            except Exception as exc:
                self._fail(finished.sched, exc)
        running = self.scheduler.running
        seqs, ks = proposal_lengths(running, self.scheduler.config.max_model_len,
                                    proposal_cap(self.config, len(running)))
        try:
            for seq, proposal in zip(seqs, on_forward_thread(self._forward_thread, proposer.propose, seqs, ks)):
                seq.spec_token_ids = proposal
        except Exception:  # a failed proposer costs the speed-up of this step, not the requests
            log.exception("speculative proposer failed: this step decodes without proposals")
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return
        try:
            step = self._prepare(sched)
            runs = on_forward_thread(self._forward_thread,
                                     lambda: self.verifier.verify(sched, self.runner.execute(step)),
                                     runner=self.runner)
        except Exception as exc:
            self._fail(sched, exc)
            return
        for seq, tokens, lps in runs:
            self.output_processor.emit_run(seq, tokens, lps)

    def _prepare(self, sched: SchedulerOutput) -> StepInput:
        """The step's inputs; tokens the host does not know yet come from the step in flight, on the device."""
        prompt_rows = []
        if self.scheduler.prompt_logprob_seqs:  # empty unless a request asked: no per-sequence work otherwise
            prompt_rows = [(i, positions) for i, (seq, n) in enumerate(sched.scheduled)
                           if seq.needs_prompt_logprobs
                           and (positions := seq.prompt_logprob_positions(seq.num_computed_tokens - n, n))]
        step = None if prompt_rows else self._decode_inputs.step(sched.scheduled)
        if step is None:
            step = prepare_step(sched.scheduled, self.config.block_size, self.device, prompt_rows)
        if step.placeholders:  # they exist only while the step that samples them is pending
            self.pending.feed(step, sched.scheduled, self.device)
        return step

    def _execute(self, step: StepInput, sched: SchedulerOutput) -> torch.Tensor:
        """The runner's logits for the sampler; the prompt logprobs the step also computed go to their sequences
        (prompt_logprobs.py)."""
        logits, prompt_logits = split_prompt_logits(self.runner.execute(step), step.num_prompt_logit_rows)
        if prompt_logits is not None:
            record_prompt_logprobs(step.prompt_logprob_rows, sched.scheduled, prompt_logits, self._sample_vocab)
        return logits

    def _execute_and_sample(self, sched: SchedulerOutput, step: StepInput,
                            meta: SamplingMetadata | None) -> PendingStep | None:
        """The forward thread's job on a CPU: every heavy op of a step on one thread (and one OpenMP team)."""
        return self._sample(sched, self._execute(step, sched), meta)

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
            token_logprob(seq, t, j, chosen, top_ids, top_lps) for seq, j, t in zip(seqs, kept, token_ids)]
        return self.output_processor.advance_grammars(seqs, token_ids, logprobs)

    def _fail(self, sched: SchedulerOutput, exc: Exception) -> None:
        """A step failed: its requests end with an error that names the request, the detail goes to the log.
        A runner that cannot go on (RunnerFailedError) fails the engine instead: every request gets an error."""
        if isinstance(exc, RunnerFailedError):
            raise exc
        log.error("engine step failed", exc_info=exc)
        self.output_processor.fail_step(sched)
