"""Engine metrics on Triton's metrics port, through pb_utils.MetricFamily.

Cost model: each metric operation is an IPC round trip from the Python stub
to the server, so per-token work is avoided: latency histograms are observed
once per request (first token, finish), and gauges/counters are flushed at
most every `flush_interval_s` from the step loop.
"""

from __future__ import annotations

import time

from kvtriton.backend.engine.outputs import RequestOutput
from kvtriton.backend.engine.stats import EngineStats

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
TOKEN_COUNT_BUCKETS = [1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
FINISH_REASONS = ("stop", "length", "abort", "error")  # RequestOutput.finish_reason's values
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2]
ACCEPTANCE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0]


class TritonMetrics:
    def __init__(self, pb_utils, labels: dict[str, str], flush_interval_s: float = 0.25,
                 speculative_method: str = "none", lora_names: tuple[str, ...] = ()):
        mf = pb_utils.MetricFamily
        # Families must outlive their metrics: keep references on self.
        self._families = {
            "ttft": mf("kvtriton_time_to_first_token_seconds", "Time to first token", mf.HISTOGRAM),
            "tpot": mf("kvtriton_time_per_output_token_seconds", "Mean time per output token after the first",
                       mf.HISTOGRAM),
            "e2e": mf("kvtriton_e2e_request_latency_seconds", "End-to-end request latency", mf.HISTOGRAM),
            "prompt": mf("kvtriton_prompt_tokens_total", "Prompt tokens computed (prefix-cache hits excluded)",
                         mf.COUNTER),
            "generation": mf("kvtriton_generation_tokens_total", "Generated tokens", mf.COUNTER),
            "preemption": mf("kvtriton_preemptions_total", "Sequences preempted for KV space", mf.COUNTER),
            "running": mf("kvtriton_num_requests_running", "Requests in the running batch", mf.GAUGE),
            "waiting": mf("kvtriton_num_requests_waiting", "Requests waiting to be scheduled", mf.GAUGE),
            "kv_usage": mf("kvtriton_kv_cache_usage_ratio", "Fraction of KV blocks in use", mf.GAUGE),
            # vLLM's request_success_total, prefix_cache_queries / _hits (tokens) and request token histograms.
            "success": mf("kvtriton_request_success_total", "Finished requests, by finish reason", mf.COUNTER),
            "prefix_queries": mf("kvtriton_prefix_cache_queries_total",
                                 "Prompt tokens looked up in the prefix cache", mf.COUNTER),
            "prefix_hits": mf("kvtriton_prefix_cache_hits_total", "Prompt tokens found in the prefix cache",
                              mf.COUNTER),
            "prompt_len": mf("kvtriton_request_prompt_tokens", "Prompt tokens per finished request", mf.HISTOGRAM),
            "output_len": mf("kvtriton_request_generation_tokens", "Output tokens per finished request",
                             mf.HISTOGRAM),
        }
        f = self._families
        self.ttft = f["ttft"].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.tpot = f["tpot"].Metric(labels=labels, buckets=TPOT_BUCKETS)
        self.e2e = f["e2e"].Metric(labels=labels, buckets=LATENCY_BUCKETS)
        self.prompt = f["prompt"].Metric(labels=labels)
        self.generation = f["generation"].Metric(labels=labels)
        self.preemption = f["preemption"].Metric(labels=labels)
        self.running = f["running"].Metric(labels=labels)
        self.waiting = f["waiting"].Metric(labels=labels)
        self.kv_usage = f["kv_usage"].Metric(labels=labels)
        self.success = {reason: f["success"].Metric(labels={**labels, "finished_reason": reason})
                        for reason in FINISH_REASONS}
        self.prefix_queries = f["prefix_queries"].Metric(labels=labels)
        self.prefix_hits = f["prefix_hits"].Metric(labels=labels)
        self.prompt_len = f["prompt_len"].Metric(labels=labels, buckets=TOKEN_COUNT_BUCKETS)
        self.output_len = f["output_len"].Metric(labels=labels, buckets=TOKEN_COUNT_BUCKETS)
        # Finished requests by reason, added to their counters at the next flush (one IPC each, not one a request).
        self._finished = {reason: 0 for reason in FINISH_REASONS}
        # Speculative decoding, labelled with the method (ngram | draft); absent when speculation is off.
        self.spec_proposed = self.spec_accepted = self.spec_acceptance = None
        if speculative_method != "none":
            spec_labels = {**labels, "method": speculative_method}
            f["spec_proposed"] = mf("kvtriton_spec_decode_proposed_tokens_total",
                                    "Speculative tokens proposed and verified", mf.COUNTER)
            f["spec_accepted"] = mf("kvtriton_spec_decode_accepted_tokens_total",
                                    "Speculative tokens accepted by the served model", mf.COUNTER)
            f["spec_acceptance"] = mf("kvtriton_spec_decode_acceptance_rate",
                                      "Per finished request: accepted / proposed speculative tokens", mf.HISTOGRAM)
            self.spec_proposed = f["spec_proposed"].Metric(labels=spec_labels)
            self.spec_accepted = f["spec_accepted"].Metric(labels=spec_labels)
            self.spec_acceptance = f["spec_acceptance"].Metric(labels=spec_labels, buckets=ACCEPTANCE_BUCKETS)
        # LoRA adapters (absent without lora_modules): finished requests and their output tokens per adapter,
        # added at the next flush as the finish reasons are.
        self.lora_success, self.lora_generation = {}, {}
        if lora_names:
            f["lora_success"] = mf("kvtriton_lora_request_success_total", "Finished requests through each LoRA adapter",
                                   mf.COUNTER)
            f["lora_generation"] = mf("kvtriton_lora_generation_tokens_total",
                                      "Output tokens of the finished requests through each LoRA adapter", mf.COUNTER)
            for name in lora_names:
                self.lora_success[name] = f["lora_success"].Metric(labels={**labels, "lora_name": name})
                self.lora_generation[name] = f["lora_generation"].Metric(labels={**labels, "lora_name": name})
        self._lora_finished = {name: [0, 0] for name in lora_names}  # name -> [requests, output tokens]
        self.flush_interval_s = flush_interval_s
        self._last_flush = 0.0
        self._flushed = EngineStats()

    def observe_output(self, out: RequestOutput) -> None:
        # The output that carries the first token (it may carry more: a speculative run is one output).
        if out.first_token_time is not None and out.token_ids and out.num_output_tokens == len(out.token_ids):
            self.ttft.observe(out.first_token_time - out.arrival_time)
        if out.finished:
            self.e2e.observe(out.time - out.arrival_time)
            self.prompt_len.observe(out.num_prompt_tokens)
            self.output_len.observe(out.num_output_tokens)
            if out.finish_reason in self._finished:
                self._finished[out.finish_reason] += 1
            if out.first_token_time is not None and out.num_output_tokens > 1:
                self.tpot.observe((out.time - out.first_token_time) / (out.num_output_tokens - 1))
            if out.lora_name in self._lora_finished:
                counts = self._lora_finished[out.lora_name]
                counts[0] += 1
                counts[1] += out.num_output_tokens
            if self.spec_acceptance is not None and out.num_spec_proposed_tokens:
                self.spec_acceptance.observe(out.num_spec_accepted_tokens / out.num_spec_proposed_tokens)

    def observe_step(self, stats: EngineStats, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_flush < self.flush_interval_s:
            return
        self._last_flush = now
        old = self._flushed
        self.prompt.increment(stats.num_prompt_tokens - old.num_prompt_tokens)
        self.generation.increment(stats.num_generation_tokens - old.num_generation_tokens)
        self.preemption.increment(stats.num_preemptions - old.num_preemptions)
        self.prefix_queries.increment(stats.num_prefix_cache_queries - old.num_prefix_cache_queries)
        self.prefix_hits.increment(stats.num_prefix_cache_hits - old.num_prefix_cache_hits)
        if self.spec_proposed is not None:
            self.spec_proposed.increment(stats.num_spec_proposed_tokens - old.num_spec_proposed_tokens)
            self.spec_accepted.increment(stats.num_spec_accepted_tokens - old.num_spec_accepted_tokens)
        for reason, count in self._finished.items():
            if count:
                self.success[reason].increment(count)
                self._finished[reason] = 0
        for name, counts in self._lora_finished.items():
            if counts[0]:
                self.lora_success[name].increment(counts[0])
                self.lora_generation[name].increment(counts[1])
                counts[0] = counts[1] = 0
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self._flushed = stats
