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

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch

from kvtriton.backend.config import EngineConfig
from kvtriton.backend.engine.block_manager import BlockManager
from kvtriton.backend.engine.outputs import OutputSink, RequestOutput, RequestStream, TokenLogprob
from kvtriton.backend.engine.request_state import RequestState
from kvtriton.backend.engine.sampler import Sampler, SamplingMetadata
from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from kvtriton.backend.engine.sequence import Sequence
from kvtriton.backend.engine.tokenizer import Tokenizer
from kvtriton.backend.models.model_config import ModelConfig
from kvtriton.backend.runners.factory import create_runner, resolve_device_and_dtype, resolve_model_folder
from kvtriton.backend.runners.step_input import prepare_step

log = logging.getLogger("kvtriton")


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks in use
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_preemptions: int  # since start
    num_prompt_tokens: int  # computed prompt tokens since start (prefix hits excluded)
    num_generation_tokens: int  # since start


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, metrics=None):
        self.config = config = config or EngineConfig()
        folder = resolve_model_folder(config.model)
        self.model_config = ModelConfig.from_pretrained(folder)
        self.tokenizer = Tokenizer.from_pretrained(folder)
        self.device, self.dtype = resolve_device_and_dtype(config)
        limit = self.model_config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.runner = create_runner(config, self.model_config, folder, self.device, self.dtype, self.max_model_len)
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
        self.metrics = metrics  # optional: observe_output(RequestOutput), observe_step(EngineStats)
        self._states: dict[str, RequestState] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        log.info("engine ready: %s on %s (%s), %d KV blocks of %d tokens, max_model_len %d",
                 folder, self.device, str(self.dtype).removeprefix("torch."), self.runner.num_blocks,
                 config.block_size, self.max_model_len)

    # ---- requests (any thread) ---------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    sink: OutputSink | None = None) -> OutputSink:
        """Validate and enqueue. Raises ValueError with a user-facing message for a request that can never run."""
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate(ids, params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_token_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        seq = Sequence(request_id, ids, params, stop_token_ids, generator=generator)
        sink = sink if sink is not None else RequestStream(request_id)
        self._inbox.put(("add", seq, sink))
        self._wakeup.set()
        return sink

    def abort(self, request_id: str) -> None:
        """Stop a request at the next step; its blocks are freed and its stream ends with finish_reason 'abort'."""
        self._inbox.put(("abort", request_id, None))
        self._wakeup.set()

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("prompt is empty")
        vocab = self._sample_vocab
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {list(params.stop_token_ids)}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens but the model's context is {self.max_model_len} tokens")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the model's "
                f"context of {self.max_model_len} tokens; lower max_tokens"
            )
        if self.block_manager.num_blocks_needed(total) > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt + max_tokens = {total} tokens needs more KV blocks than the whole pool holds "
                f"({self.block_manager.num_blocks} blocks of {self.config.block_size}); lower max_tokens"
            )

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
        while self._thread and self.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        self._stopping = True
        self._wakeup.set()
        if self._thread:
            self._thread.join(timeout=10)
            if self._thread.is_alive():  # a step is stuck: its runner must stay
                return
            self._thread = None
        self.runner.close()

    def has_work(self) -> bool:
        return self.scheduler.has_work() or not self._inbox.empty()

    def _run(self) -> None:
        while not self._stopping:
            if not self.has_work():
                if self.metrics is not None:  # let gauges settle at idle values
                    self.metrics.observe_step(self.stats())
                self._wakeup.wait(timeout=0.1)
                self._wakeup.clear()
                continue
            self.step()
        self._drain_inbox()
        for request_id in list(self._states):
            self._finish(request_id, "abort", "engine shut down")

    def step(self) -> None:
        """One schedule -> prepare -> execute -> sample -> update -> emit round. A failed step fails its
        requests only: the loop and the other requests go on."""
        self._drain_inbox()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return
        try:
            step = prepare_step(sched.scheduled, self.config.block_size, self.device)
            logits = self.runner.execute(step)  # (B, V)
            token_ids, logprobs = self._sample(sched, logits)
            seqs = self.scheduler.update_from_output(sched, token_ids)
        except Exception as exc:  # a runner fault must not take the other requests or the thread down
            log.exception("engine step failed")
            for seq, _ in sched.scheduled:
                if seq.request_id in self._states:
                    self._finish(seq.request_id, "error", f"internal error during generation: {exc}")
            return
        self._emit_tokens(seqs, token_ids, logprobs)
        if self.metrics is not None:
            self.metrics.observe_step(self.stats())

    def _sample(self, sched: SchedulerOutput, logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token for each sequence in sched.sample_indices, and its logprobs where asked for."""
        rows = sched.sample_indices
        if not rows:
            return [], []
        seqs = [sched.scheduled[i][0] for i in rows]
        meta = SamplingMetadata.build(
            [s.params for s in seqs], [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs],
            [s.generator for s in seqs], [s.stop_token_ids for s in seqs], self._sample_vocab, self.device,
        )
        logits = logits[rows] if len(rows) < len(sched.scheduled) else logits  # (B, V)
        out = self.sampler(logits[:, : self._sample_vocab], meta)
        token_ids = out.sampled_token_ids.tolist()  # the step's one host sync
        return token_ids, _logprobs_to_host(out, seqs, token_ids)

    def _emit_tokens(self, seqs: list[Sequence], token_ids: list[int], logprobs: list[TokenLogprob | None]) -> None:
        for seq, token_id, lp in zip(seqs, token_ids, logprobs):
            state = self._states[seq.request_id]
            try:
                output = state.process_token(token_id, lp)
            except Exception as exc:  # one request's failure (detokenizing, say) ends that request only
                log.exception("request %s failed", seq.request_id)
                self._finish(seq.request_id, "error", f"internal error during generation: {exc}")
                continue
            if output.finished:
                if seq.finish_reason is None:  # a stop string: the scheduler has not ended it
                    self.scheduler.finish(seq)
                del self._states[seq.request_id]
            self._emit(state, output)

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
        )

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Convenience for scripts and tests: run prompts to completion on the engine thread."""
        self.start()
        streams = [self.add_request(f"gen-{time.monotonic_ns()}-{i}", p, params) for i, p in enumerate(prompts)]
        return [s.result() for s in streams]


def _logprobs_to_host(out, seqs: list[Sequence], token_ids: list[int]) -> list[TokenLogprob | None]:
    if out.logprobs is None:
        return [None] * len(seqs)
    chosen = out.logprobs.tolist()
    top_ids = out.top_token_ids.tolist() if out.top_token_ids is not None else None
    top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    result: list[TokenLogprob | None] = []
    for i, seq in enumerate(seqs):
        n = seq.params.logprobs
        if n is None:
            result.append(None)
            continue
        top = list(zip(top_ids[i][:n], top_lps[i][:n])) if n and top_ids else []
        result.append(TokenLogprob(token_id=token_ids[i], logprob=chosen[i], top=top))
    return result
