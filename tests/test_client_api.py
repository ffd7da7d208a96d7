"""LLMClient / AsyncLLMClient against a real tritonserver serving the `llm` model (SmolLM2-135M, CPU):
both protocols, sync and asyncio, streamed and not; cancellation reaches the server; typed errors."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request

import pytest

from kvtriton.backend.entrypoints.tritonserver import free_ports
from kvtriton.client.api import AsyncLLMClient, LLMClient
from kvtriton.client.errors import InvalidRequestError, ServerUnavailableError

pytestmark = [pytest.mark.server, pytest.mark.slow]

PROMPT = "The capital of France is"
GREEDY = {"max_tokens": 8, "temperature": 0}
# Generates until cancelled. A cancellation is judged by what the request generated against what it asked for, not
# by a token count right after the break: on a busy 2-core CPU the engine can run hundreds of tokens ahead of the
# client's reads (the responses wait in the server's buffers), all of them before the client even breaks off.
LONG = {"max_tokens": 2000, "ignore_eos": True, "temperature": 0}


def url(server, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    m = re.search(rf'^{name}{{[^}}]*model="llm"[^}}]*}} ([0-9.e+-]+)$', text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


def wait_idle(server, timeout_s: float = 60) -> None:
    """Until no request runs or waits (an earlier test's request may still be finishing)."""
    deadline = time.monotonic() + timeout_s
    while metric(server, "kvtriton_num_requests_running") or metric(server, "kvtriton_num_requests_waiting"):
        assert time.monotonic() < deadline, "the server never became idle"
        time.sleep(0.05)
    time.sleep(0.3)  # one more metrics flush: counters settled


def assert_nothing_running(server, tokens_before: float, limit: int = LONG["max_tokens"] // 2) -> None:
    """The cancelled request stopped on the server: nothing runs and it generated far less than it asked for.
    An uncancelled one runs to its end (2,000 tokens, tens of seconds here) and fails the token check."""
    deadline = time.monotonic() + 60
    while metric(server, "kvtriton_num_requests_running") != 0:
        assert time.monotonic() < deadline, "the cancelled request is still running on the server"
        time.sleep(0.05)
    time.sleep(0.4)  # one more metrics flush: the last steps counted
    generated = metric(server, "kvtriton_generation_tokens_total") - tokens_before
    assert generated < limit, f"{generated} tokens generated: the request ran on after cancellation"


def sync_completions(server, protocol):
    with LLMClient(url(server, protocol), protocol=protocol) as client:
        whole = client.generate(PROMPT, **GREEDY)
        stream = client.stream(PROMPT, **GREEDY)
        chunks = list(stream)
    assert "".join(c.text for c in chunks) == stream.completion.text
    assert chunks[-1].finish_reason == stream.completion.finish_reason != ""
    assert all(c.finish_reason == "" for c in chunks[:-1])
    return whole, stream.completion


async def async_completions(server, protocol):
    async with AsyncLLMClient(url(server, protocol), protocol=protocol) as client:
        whole = await client.generate(PROMPT, **GREEDY)
        stream = client.stream(PROMPT, **GREEDY)
        chunks = [c async for c in stream]
    assert "".join(c.text for c in chunks) == stream.completion.text
    return whole, stream.completion


def test_greedy_text_is_the_same_over_every_protocol_and_mode(llm_server):
    completions = {}
    for protocol in ("http", "grpc"):
        completions[f"{protocol} sync"] = sync_completions(llm_server, protocol)
        completions[f"{protocol} async"] = asyncio.run(async_completions(llm_server, protocol))
    all_of_them = [c for pair in completions.values() for c in pair]
    reference = all_of_them[0]
    assert "Paris" in reference.text, reference
    for c in all_of_them:
        assert (c.text, c.num_input_tokens, c.num_output_tokens, c.finish_reason) == (
            reference.text, reference.num_input_tokens, reference.num_output_tokens, reference.finish_reason), \
            completions
        assert 0 < c.ttft_s <= c.latency_s
    streamed = completions["grpc sync"][1]
    assert streamed.ttft_s < streamed.latency_s  # streamed: the first token comes before the last


def test_chat_messages_use_the_server_chat_template(llm_server):
    with LLMClient(llm_server.grpc_url) as client:
        c = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}], **GREEDY)
    assert "Paris" in c.text and c.num_input_tokens > 10  # the template added its role markers


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_breaking_out_of_a_sync_stream_cancels_the_request(llm_server, protocol):
    with LLMClient(url(llm_server, protocol)) as client:
        client.wait_ready()
        before = metric(llm_server, "kvtriton_generation_tokens_total")
        for i, _ in enumerate(client.stream("Count to one thousand:", **LONG)):
            if i == 2:
                break
        assert_nothing_running(llm_server, before)
        assert "Paris" in client.generate(PROMPT, **GREEDY).text  # and the server keeps serving


def test_grpc_requests_one_after_another_share_one_stream_until_one_is_abandoned(llm_server):
    with LLMClient(llm_server.grpc_url) as client:
        first = client.generate(PROMPT, **GREEDY)
        stream = client._transport._received  # the open stream's response queue
        assert stream is not None and client.generate(PROMPT, **GREEDY).text == first.text
        assert client._transport._received is stream  # no new stream for the second request
        for i, _ in enumerate(client.stream("Count to one thousand:", **LONG)):
            if i == 2:
                break
        assert client._transport._received is None  # abandoned: its stream closed, the request cancelled
        assert client.generate(PROMPT, **GREEDY).text == first.text  # a new stream, nothing of the old one in it


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cancelling_an_async_task_cancels_the_request(llm_server, protocol):
    async def main():
        async with AsyncLLMClient(url(llm_server, protocol)) as client:
            await client.wait_ready()
            before = metric(llm_server, "kvtriton_generation_tokens_total")
            first = asyncio.Event()

            async def consume():
                async for _ in client.stream("Count to one thousand:", **LONG):
                    first.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(first.wait(), 30)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.to_thread(assert_nothing_running, llm_server, before)
            return await client.generate(PROMPT, **GREEDY)

    assert "Paris" in asyncio.run(main()).text


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("sampling,field", [({"temperature": -1}, "temperature"), ({"top_p": 1.5}, "top_p"),
                                            ({"max_tokens": 100000}, "context"),
                                            ({"tempreature": 1}, "unknown sampling parameter 'tempreature'"),
                                            ({"guided_json": '{"type": "foo"}'}, "guided_json is invalid")])
def test_invalid_request_raises_invalid_request_error_with_the_server_message(llm_server, protocol, sampling, field):
    with LLMClient(url(llm_server, protocol)) as client:
        with pytest.raises(InvalidRequestError, match=field) as info:
            client.generate(PROMPT, **sampling)
        assert field in info.value.server_message
        with pytest.raises(InvalidRequestError, match=field):
            list(client.stream(PROMPT, **sampling))
        assert client.generate(PROMPT, **GREEDY).text  # the same client and server go on


def test_async_invalid_request(llm_server):
    async def main():
        async with AsyncLLMClient(llm_server.grpc_url) as client:
            with pytest.raises(InvalidRequestError, match="temperature"):
                await client.generate(PROMPT, temperature=-1)
            # A lone surrogate (JSON's "\\ud800" decodes to one) goes as its bytes; the server says they are not
            # UTF-8, at once (it once raised inside grpc.aio's request iterator, and the stream waited to time out).
            with pytest.raises(InvalidRequestError, match="text_input is not valid UTF-8"):
                await asyncio.wait_for(client.generate("hi \ud800", max_tokens=2), 30)
    asyncio.run(main())


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unknown_model_fails_at_once_naming_it(llm_server, protocol):
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match="no ready model 'nope'.*ready: .*llm"):
        LLMClient(url(llm_server, protocol), model="nope", connect_retries=5).generate("Hi")
    assert time.monotonic() - started < 2  # waiting cannot help, so no retries


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_no_server_raises_server_unavailable_naming_the_url_quickly(protocol):
    port = free_ports(1)[0]
    started = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=f"127.0.0.1:{port}.*gave up after 3 attempt"):
        LLMClient(f"127.0.0.1:{port}", protocol=protocol, connect_retries=2).generate("Hi")
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_prompt_logprobs_score_every_prompt_token(llm_server, protocol):
    """sampling key prompt_logprobs (vLLM's): one entry per prompt token, each with its text and top N."""
    with LLMClient(url(llm_server, protocol)) as client:
        done = client.generate(PROMPT, prompt_logprobs=2, max_tokens=1, temperature=0)
    entries = done.prompt_logprobs
    assert len(entries) == done.num_input_tokens and entries[0]["logprob"] is None
    assert "".join(e["token"] for e in entries) == PROMPT
    assert all(e["logprob"] < 0 and len(e["top"]) == len(e["top_tokens"]) == 2 for e in entries[1:])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_prompt_of_token_ids_is_the_same_prompt(llm_server, protocol, default_model_folder):
    """input_ids (TensorRT-LLM's name): the prompt as token ids answers as its text does."""
    from kvtriton.backend.engine.tokenizer import Tokenizer

    ids = Tokenizer.from_pretrained(default_model_folder).encode(PROMPT)
    with LLMClient(url(llm_server, protocol)) as client:
        as_text, as_ids = client.generate(PROMPT, **GREEDY), client.generate(ids, **GREEDY)
        assert (as_ids.text, as_ids.num_input_tokens) == (as_text.text, len(ids))
        with pytest.raises(InvalidRequestError, match=r"prompt token ids must be in \[0, "):
            client.generate([10**8], **GREEDY)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tokenize_counts_what_a_generation_reads_and_detokenize_reverses_it(llm_server, protocol,
                                                                            default_model_folder):
    """The model's `task` input: a text's or a chat's token ids, as many as the generation's num_input_tokens,
    without a generation (no request reaches the engine); and their text back."""
    from kvtriton.backend.engine.tokenizer import Tokenizer

    chat = [{"role": "user", "content": PROMPT}]
    with LLMClient(url(llm_server, protocol)) as client:
        text = client.tokenize(PROMPT)
        assert text.token_ids == tuple(Tokenizer.from_pretrained(default_model_folder).encode(PROMPT))
        assert text.max_model_len > text.count > 0
        tokens = client.tokenize(messages=chat)
        assert tokens.count == client.generate(messages=chat, **GREEDY).num_input_tokens
        assert client.detokenize(text.token_ids) == PROMPT
        assert client.tokenize("").count == 0  # an empty tensor of ids
        assert client.tokenize("a").token_ids == client.tokenize([client.tokenize("a").token_ids[0]]).token_ids
        with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, "):
            client.detokenize([10**8])


def test_the_async_client_tokenizes_too(llm_server):
    async def run():
        async with AsyncLLMClient(llm_server.grpc_url) as client:
            tokens = await client.tokenize(PROMPT)
            return tokens, await client.detokenize(tokens.token_ids)

    tokens, text = asyncio.run(run())
    assert tokens.count > 0 and text == PROMPT
