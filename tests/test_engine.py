"""The engine in-process on a tiny random Llama (CPU, fp32): batching, preemption, prefix cache, stops."""

import threading

import pytest

from kvtriton.backend.engine.sampling_params import SamplingParams

from tests.tiny_model import make_tiny_engine, make_tiny_model

pytest.importorskip("transformers")

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompts_of_varied_length(n=12):
    words = "the quick brown fox jumps over the lazy dog paris capital france blocks".split()
    return [" ".join(words[: 1 + (i * 5) % len(words)]) * (1 + i % 3) for i in range(n)]


@pytest.fixture(scope="module")
def solo_outputs(tiny_folder):
    engine = make_tiny_engine(tiny_folder, enable_prefix_caching=False).start()
    try:
        return {p: engine.generate([p], GREEDY)[0].token_ids for p in prompts_of_varied_length()}
    finally:
        engine.shutdown()


@pytest.mark.parametrize("overrides", [
    dict(),  # prefix caching + chunked prefill, roomy pool
    dict(num_kv_blocks=24, max_num_batched_tokens=16),  # pool too small for the load: preemption by recompute
    dict(num_kv_blocks=24, max_num_batched_tokens=16, scheduling_policy="priority"),  # ... every priority 0
    dict(enable_chunked_prefill=False, enable_prefix_caching=False),
    dict(cpu_single_openmp_team=True),  # the model loads on the forward thread
    dict(cpu_single_openmp_team=True, enable_async_scheduling=False),  # ... which then runs the synchronous loop
])
def test_batched_greedy_equals_solo(tiny_folder, solo_outputs, overrides):
    engine = make_tiny_engine(tiny_folder, **overrides).start()
    try:
        prompts = list(solo_outputs)
        outs = engine.generate(prompts, GREEDY)
        for p, out in zip(prompts, outs):
            assert out.finish_reason == "length"
            assert out.token_ids == solo_outputs[p], p
        if "num_kv_blocks" in overrides:
            assert engine.stats().num_preemptions > 0
        assert engine.stats().kv_usage == 0.0  # every block back
    finally:
        engine.shutdown()


def test_prefix_cache_schedules_only_new_tokens(tiny_folder):
    engine = make_tiny_engine(tiny_folder).start()
    try:
        shared = list(range(3, 3 + 40))  # 40 tokens = 10 full blocks of 4
        first = engine.generate([shared + [50, 51]], GREEDY)[0]
        second = engine.generate([shared + [60, 61, 62]], GREEDY)[0]
        assert first.num_cached_tokens == 0
        assert second.num_cached_tokens == 40
    finally:
        engine.shutdown()


def test_the_start_up_heap_is_frozen_while_serving_and_thawed_at_shutdown(tiny_folder):
    import gc

    engine = make_tiny_engine(tiny_folder).start()
    try:  # a full collection skips the model, graphs and modules: no stall of hundreds of ms mid-stream
        assert gc.get_freeze_count() > 0
        assert engine.generate([[5, 6, 7]], GREEDY)[0].finish_reason == "length"
    finally:
        engine.shutdown()
    assert gc.get_freeze_count() == 0  # a stopped engine can be collected


def test_request_that_can_never_fit_fails_at_once(tiny_folder):
    engine = make_tiny_engine(tiny_folder, num_kv_blocks=8)  # 32 token slots
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("big", list(range(3, 23)), SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="context"):
        engine.add_request("long", [5] * 600)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", "")
    with pytest.raises(ValueError, match="stop_token_ids"):  # would otherwise fail the whole batch's step
        engine.add_request("stop", "the dog", SamplingParams(min_tokens=2, stop_token_ids=(10**6,)))
    with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, \d+\), got \[1000000\]"):
        engine.add_request("bias", "the dog", SamplingParams(logit_bias={10**6: 1.0}))


def test_abort_frees_blocks_and_ends_stream(tiny_folder):
    engine = make_tiny_engine(tiny_folder).start()
    try:
        stream = engine.add_request("r1", "the quick brown fox", SamplingParams(max_tokens=400, ignore_eos=True))
        outs = iter(stream)
        next(outs)  # at least one token produced: the request holds blocks
        engine.abort("r1")
        last = list(outs)[-1]
        assert last.finished and last.finish_reason == "abort"
        assert engine.stats().kv_usage == 0.0 and engine.stats().num_running == 0
    finally:
        engine.shutdown()


def test_seed_gives_same_output_whatever_the_batch(tiny_folder):
    engine = make_tiny_engine(tiny_folder).start()
    try:
        seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
        alone = engine.generate(["the lazy dog"], seeded)[0].token_ids
        noise = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
        streams = [engine.add_request(f"n{i}", f"fox {i} jumps", noise) for i in range(5)]
        in_batch = engine.add_request("s", "the lazy dog", seeded)
        assert in_batch.result().token_ids == alone
        for s in streams:
            s.result()
    finally:
        engine.shutdown()


def test_stop_string_and_stop_token_and_max_tokens(tiny_folder):
    engine = make_tiny_engine(tiny_folder).start()
    try:
        free = engine.generate(["the quick"], GREEDY)[0]
        assert len(free.token_ids) == GREEDY.max_tokens and free.finish_reason == "length"
        # A stop string taken from the free-running text: output ends before it, finish_reason "stop".
        stop = free.text[len(free.text) // 3 : len(free.text) // 3 + 3]
        if stop.strip():
            out = engine.generate(["the quick"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                                stop=(stop,)))[0]
            assert out.finish_reason == "stop" and stop not in out.text
            assert free.text.startswith(out.text)
            kept = engine.generate(["the quick"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                                 stop=(stop,), include_stop_str_in_output=True))[0]
            assert kept.finish_reason == "stop" and kept.text == out.text + stop  # vLLM's include_stop_str_in_output
        tok = free.token_ids[3]
        out = engine.generate(["the quick"], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                            stop_token_ids=(tok,)))[0]
        assert out.finish_reason == "stop" and out.token_ids[-1] == tok
        assert len(out.token_ids) == free.token_ids.index(tok) + 1
    finally:
        engine.shutdown()


def test_add_from_many_threads(tiny_folder):
    engine = make_tiny_engine(tiny_folder).start()
    results = {}
    try:
        def client(i):
            results[i] = engine.add_request(f"t{i}", f"dog {i}", GREEDY).result()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(results[i].finish_reason == "length" for i in range(8))
    finally:
        engine.shutdown()


def test_penalty_counts_kept_on_the_device_equal_a_rebuild_every_step(tiny_folder):
    """The overlapped loop adds each step's tokens to the penalty counts in place; the synchronous loop rebuilds
    them from the outputs every step. Same greedy text, and the kept counts equal a rebuild."""
    from kvtriton.backend.engine.sampling_metadata import SamplingMetadata

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                            frequency_penalty=0.4, presence_penalty=0.3)
    prompts = prompts_of_varied_length(5)
    texts = {}
    for overlap in (True, False):
        engine = make_tiny_engine(tiny_folder, enable_async_scheduling=overlap)
        try:
            streams = [engine.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
            for _ in range(12):  # this thread drives the steps: the kept counts are checked midway
                engine.step()
            if overlap:
                seqs, meta, _ = engine.step_executor.sampling_batch.last
                rebuilt = SamplingMetadata.build(
                    [s.params for s in seqs], [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs],
                    [None] * len(seqs), [s.stop_token_ids for s in seqs], meta.vocab_size, "cpu")
                assert meta.output_token_counts.sum() > len(seqs)  # it has counted several steps' tokens
                assert meta.output_token_counts.equal(rebuilt.output_token_counts)
            while engine.has_work():
                engine.step()
            texts[overlap] = [engine_output.token_ids for engine_output in (s.result() for s in streams)]
        finally:
            engine.shutdown()
    assert texts[True] == texts[False]


def test_padded_vocabulary_ids_are_never_sampled(tmp_path):
    folder = make_tiny_model(tmp_path / "padded", padded_vocab=200)
    engine = make_tiny_engine(folder).start()
    try:
        vocab = engine.tokenizer.vocab_size
        outs = engine.generate(["the dog"] * 4, SamplingParams(temperature=50.0, max_tokens=64, ignore_eos=True))
        assert all(o.finish_reason == "length" and max(o.token_ids) < vocab for o in outs)
    finally:
        engine.shutdown()


def test_steady_batch_reuses_its_sampling_metadata(tiny_folder):
    """The same rows step after step share one SamplingMetadata (no per-row host work), penalties included
    (their counts move on the device); a pending min_tokens ban, which moves with the outputs, is rebuilt each
    step."""
    def metas(params, steps=6):
        engine = make_tiny_engine(tiny_folder)  # not started: this thread drives the steps
        try:
            for i in range(3):
                engine.add_request(f"r{i}", f"the quick fox {i}", params)
            seen = []
            for _ in range(steps):
                engine.step()
                last_meta = engine.step_executor.sampling_batch.last
                if last_meta is not None:
                    seen.append(last_meta[1])
            return seen
        finally:
            engine.shutdown()

    steady = metas(SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    assert len(steady) >= 4 and all(m is steady[-1] for m in steady[1:])
    penalised = metas(SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, frequency_penalty=0.5))
    assert len(penalised) >= 4 and all(m is penalised[-1] for m in penalised[1:])
    banned = metas(SamplingParams(temperature=0.0, max_tokens=10, min_tokens=8))
    assert len({id(m) for m in banned}) == len(banned)


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens(tiny_folder):
    """vLLM's truncate_prompt_tokens: the prompt's last k tokens, as if they were the whole prompt."""
    engine = make_tiny_engine(tiny_folder).start()
    try:
        ids = engine.tokenizer.encode("the quick brown fox jumps over the lazy dog")
        cut = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                    truncate_prompt_tokens=3))[0]
        tail = engine.generate([ids[-3:]], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
        assert cut.num_prompt_tokens == 3 and cut.token_ids == tail.token_ids
        longer = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=2, truncate_prompt_tokens=1000))
        assert longer[0].num_prompt_tokens == len(ids)  # a prompt shorter than k is whole
        with pytest.raises(ValueError, match="truncate_prompt_tokens must be >= 1, or -1"):
            SamplingParams(truncate_prompt_tokens=0)
    finally:
        engine.shutdown()


def test_allowed_token_ids_limit_every_sampled_token(tiny_folder):
    """vLLM's allowed_token_ids: greedy or sampled, every token is one of them (EOS too only if listed)."""
    engine = make_tiny_engine(tiny_folder).start()
    try:
        allowed = tuple(engine.tokenizer.encode(" the quick brown"))  # words: a lowercase grammar allows them too
        for params in (SamplingParams(temperature=0.0, max_tokens=8, allowed_token_ids=allowed),
                       SamplingParams(temperature=1.0, seed=3, max_tokens=8, allowed_token_ids=list(allowed)),
                       SamplingParams(temperature=0.0, max_tokens=8, allowed_token_ids=allowed,
                                      guided_regex="[a-z ]+")):
            out = engine.generate(["the quick brown fox"], params)[0]
            assert out.finish_reason == "length" and set(out.token_ids) <= set(allowed), (params, out)
        disjoint = engine.generate(["the quick"], SamplingParams(
            temperature=0.0, max_tokens=4, allowed_token_ids=engine.tokenizer.encode(" 123"), guided_regex="[a-z]+"))[0]
        assert disjoint.finish_reason == "error" and "allow no token in common" in disjoint.error
        with pytest.raises(ValueError, match=r"allowed_token_ids must be in \[0, \d+\), got 1000000"):
            engine.add_request("x", "the dog", SamplingParams(allowed_token_ids=(1, 10**6)))
        with pytest.raises(ValueError, match="allowed_token_ids must be a list of integers >= 0"):
            SamplingParams(allowed_token_ids=(-1,))
    finally:
        engine.shutdown()


def test_a_pool_shorter_than_max_model_len_is_said_at_load_and_longer_requests_are_refused(tiny_folder, caplog):
    with caplog.at_level("WARNING", logger="kvtriton"):
        engine = make_tiny_engine(tiny_folder, num_kv_blocks=16)
    assert "KV pool: 64 tokens (16 blocks of 4), fewer than max_model_len 512" in caplog.text
    assert "num_kv_blocks sets it" in caplog.text
    with pytest.raises(ValueError, match="more KV blocks than the whole pool holds"):
        engine.add_request("long", list(range(1, 40)), SamplingParams(max_tokens=40))
