"""kvtriton.client pieces that need no server: URL parsing, request building, error typing,
completion timing, prompt lengths, benchmark statistics, LoRA adapters (lora_modules, lora_name)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import sys

import pytest
from aiohttp import web

from kvtriton.backend.engine.sampling_params import SamplingParams
from kvtriton.backend.entrypoints.tritonserver import free_ports
from kvtriton.client import chat_cmd, generate_cmd
from kvtriton.client.api import AsyncLLMClient, LLMClient
from kvtriton.client.bench_cmd import _int_list, _rate_list
from kvtriton.client.bench_report import distribution, summarize
from kvtriton.client.cli_args import add_sampling_arguments, sampling_from_args
from kvtriton.client.endpoint import Endpoint
from kvtriton.client.errors import InvalidRequestError, ServerBusyError, ServerError, server_error
from kvtriton.client.grpc_client import AsyncGrpcTransport
from kvtriton.client.http_client import AsyncHttpTransport
from kvtriton.client.loadgen import LoadPoint, PointRun, RequestRecord
from kvtriton.client.lora_modules import lora_modules_in
from kvtriton.client.prompts import WORDS, make_prompts
from kvtriton.client.types import Chunk, CompletionBuilder, GenerateRequest

from tests.fake_transport import FakeModel


@pytest.mark.parametrize("url,protocol,expected", [
    ("localhost:8001", None, ("grpc", "localhost", 8001)),
    ("127.0.0.1", None, ("grpc", "127.0.0.1", 8001)),
    ("http://127.0.0.1:9000", None, ("http", "127.0.0.1", 9000)),
    ("127.0.0.1", "http", ("http", "127.0.0.1", 8000)),
    ("grpc://h:5", "grpc", ("grpc", "h", 5)),
])
def test_endpoint_parse(url, protocol, expected):
    e = Endpoint.parse(url, protocol)
    assert (e.protocol, e.host, e.port) == expected


@pytest.mark.parametrize("url,protocol,words", [
    ("http://h:1", "grpc", "protocol is grpc"),
    ("https://h", None, "https is not supported"),
    ("h:1/v2/models", None, "no path"),
    ("h:70000", None, "port"),
    ("h", "tcp", "protocol must be"),
])
def test_endpoint_parse_errors_say_what_is_wrong(url, protocol, words):
    with pytest.raises(ValueError, match=words):
        Endpoint.parse(url, protocol)


def test_request_inputs_follow_the_contract():
    r = GenerateRequest(prompt="Hi", stream=False, sampling={"max_tokens": 4, "temperature": 0, "seed": None})
    inputs = r.inputs()
    assert inputs["text_input"] == "Hi" and inputs["stream"] is False and inputs["exclude_input_in_output"] is True
    assert json.loads(inputs["sampling_parameters"]) == {"max_tokens": 4, "temperature": 0}  # None: not sent
    chat = GenerateRequest(messages=[{"role": "user", "content": "Hi"}]).inputs()
    assert "text_input" not in chat and json.loads(chat["messages"]) == [{"role": "user", "content": "Hi"}]
    assert "chat_template_kwargs" not in chat
    kwargs = {"enable_thinking": False}
    chat = GenerateRequest(messages=[{"role": "user", "content": "Hi"}], chat_template_kwargs=kwargs).inputs()
    assert json.loads(chat["chat_template_kwargs"]) == kwargs


@pytest.mark.parametrize("kwargs,words", [
    ({}, "exactly one of prompt and messages"),
    ({"prompt": "a", "messages": []}, "exactly one"),
    ({"messages": [{"role": "user"}]}, "role.*content"),
    ({"prompt": "a", "chat_template_kwargs": {}}, "chat_template_kwargs needs messages"),
])
def test_request_rejects_mistakes_before_sending(kwargs, words):
    with pytest.raises(ValueError, match=words):
        GenerateRequest(**kwargs)


def test_sampling_keys_are_the_servers_to_check():
    # No key list of the client's own to drift from SamplingParams: an unknown key goes to the server, which
    # refuses it by name (test_client_api: InvalidRequestError).
    inputs = GenerateRequest(prompt="a", sampling={"tempreature": 1}).inputs()
    assert json.loads(inputs["sampling_parameters"]) == {"tempreature": 1}


@pytest.mark.parametrize("message,cls", [
    ("temperature must be >= 0, got -1.0", InvalidRequestError),
    ("unknown sampling parameter 'max_tokenz'; accepted: ...", InvalidRequestError),
    ("prompt (5001 tokens) + max_tokens (4) = 5005 exceeds the model's context of 4096 tokens", InvalidRequestError),
    ("text_input is required (or messages, or input_ids)", InvalidRequestError),
    ("sampling_parameters is not valid JSON: Expecting value at line 1 column 2", InvalidRequestError),
    ("Request for unknown model: 'nope' is not found", InvalidRequestError),
    # a request's guided_* grammar and allowed_token_ids that share no token: found mid-stream, still the request's
    ("request r1: token 0 does not fit the guided_* constraint with allowed_token_ids (they may allow no token in "
     "common) (Parser Error: ...)", InvalidRequestError),
    ("CUDA out of memory while running the step", ServerError),
    ("server busy: 256 requests are already waiting (max_num_waiting); retry later", ServerBusyError),
])
def test_server_errors_are_typed_by_message(message, cls):
    error = server_error(message)
    assert type(error) is cls and error.server_message == message


def test_completion_builder_times_and_counts():
    b = CompletionBuilder(sent_at=10.0)
    b.add(Chunk("", 0, "", 5), at=10.5)  # a response with no token does not count as the first token
    b.add(Chunk("Hel", 1, "", 5), at=11.0)
    b.add(Chunk("lo", 2, "", 5), at=11.4)
    b.add(Chunk("", 1, "stop", 5), at=12.0)
    c = b.build()
    assert (c.text, c.num_input_tokens, c.num_output_tokens, c.finish_reason) == ("Hello", 5, 4, "stop")
    assert c.ttft_s == pytest.approx(1.0) and c.latency_s == pytest.approx(2.0)
    assert b.chunk_tokens == [1, 2, 1]


def test_completion_builder_refuses_unfinished_stream():
    b = CompletionBuilder(sent_at=0.0)
    b.add(Chunk("a", 1, ""), at=1.0)
    with pytest.raises(ValueError, match="finish_reason"):
        b.build()


def test_chunk_rejects_unknown_finish_reason():
    with pytest.raises(ServerError, match="finish_reason 'eos'"):
        Chunk.from_outputs("x", 1, 1, "eos")


def test_sampling_options_map_to_contract_names():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    args = parser.parse_args(["--max-tokens", "8", "--temperature", "0", "--stop", "a", "--stop", "b",
                              "--ignore-eos", "--repetition-penalty", "1.1", "--lora", "sql"])
    assert sampling_from_args(args) == {"max_tokens": 8, "temperature": 0.0, "stop": ["a", "b"], "ignore_eos": True,
                                        "repetition_penalty": 1.1, "lora_name": "sql"}
    assert sampling_from_args(parser.parse_args([])) == {}  # unset options leave the server's defaults
    SamplingParams.from_dict(sampling_from_args(args))  # every option is a key the server accepts


def test_every_sampling_option_is_a_sampling_params_key():
    parser = argparse.ArgumentParser()
    add_sampling_arguments(parser)
    every_option_set = argparse.Namespace(**{a.dest: 1 for a in parser._actions if a.dest != "help"})
    keys = set(sampling_from_args(every_option_set))
    assert len(keys) == len(parser._actions) - 1 and keys <= SamplingParams.accepted_keys()


def test_prompts_have_the_asked_lengths_and_are_reproducible():
    fixed = make_prompts(5, 32, 8)
    assert all(p.num_words == 32 and len(p.text.split()) == 32 and p.max_tokens == 8 for p in fixed)
    assert all(set(p.text.split()) <= set(WORDS) for p in fixed)
    assert make_prompts(5, 32, 8, seed=3) == make_prompts(5, 32, 8, seed=3) != make_prompts(5, 32, 8, seed=4)
    ranged = make_prompts(200, 100, 50, random_range=0.2)
    assert min(p.num_words for p in ranged) >= 80 and max(p.num_words for p in ranged) <= 120
    assert min(p.max_tokens for p in ranged) >= 40 and max(p.max_tokens for p in ranged) <= 60
    assert len({p.num_words for p in ranged}) > 10  # lengths really vary
    with pytest.raises(ValueError, match="random_range"):
        make_prompts(1, 10, 10, random_range=1.5)


def test_itl_spreads_a_coalesced_response_over_its_tokens():
    r = RequestRecord.from_chunks(start=0.0, end=1.0, chunk_times=[0.2, 0.4, 1.0], chunk_tokens=[1, 1, 3],
                                  num_input_tokens=7)
    assert r.first_token == 0.2 and r.num_output_tokens == 5
    assert r.itl_s == pytest.approx([0.2, 0.2, 0.2, 0.2])


def test_summarize_computes_the_defined_metrics():
    # Two requests of 3 tokens, 1 s apart, plus one failure.
    ok1 = RequestRecord.from_chunks(0.0, 2.0, [1.0, 1.5, 2.0], [1, 1, 1], 10)
    ok2 = RequestRecord.from_chunks(1.0, 4.0, [1.5, 2.5, 4.0], [1, 1, 1], 12)
    failed = RequestRecord(start=0.5, end=0.6, error="InvalidRequestError: temperature must be >= 0")
    s = summarize(PointRun(LoadPoint(concurrency=2), [ok1, ok2, failed]))
    assert (s["concurrency"], s["request_rate"], s["completed"], s["errors"]) == (2, None, 2, 1)
    assert s["error_messages"] == ["InvalidRequestError: temperature must be >= 0"]
    assert s["duration_s"] == pytest.approx(4.0)
    assert s["request_throughput"] == pytest.approx(0.5) and s["output_token_throughput"] == pytest.approx(1.5)
    assert s["ttft_s"]["mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert s["tpot_s"]["mean"] == pytest.approx((0.5 + 1.25) / 2)
    assert s["itl_s"]["mean"] == pytest.approx((0.5 + 0.5 + 1.0 + 1.5) / 4)
    assert s["e2e_latency_s"]["p50"] == pytest.approx(2.5)
    assert s["input_tokens"] == {"mean": 11.0, "min": 10, "max": 12}
    for metric in ("ttft_s", "itl_s", "tpot_s", "e2e_latency_s"):
        assert set(s[metric]) == {"mean", "p50", "p90", "p99"}


def test_distribution_percentiles_and_empty():
    d = distribution(list(range(1, 101)))
    assert d["p50"] == pytest.approx(50.5) and d["p90"] == pytest.approx(90.1) and d["p99"] == pytest.approx(99.01)
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_load_points_and_sweep_lists():
    assert _int_list("1,4,16") == [1, 4, 16]
    assert _rate_list("0.5,inf") == [0.5, math.inf]
    assert LoadPoint(request_rate=math.inf).to_dict() == {"concurrency": None, "request_rate": "inf"}
    for bad in ("0,2", "a"):
        with pytest.raises(argparse.ArgumentTypeError):
            _int_list(bad)
    with pytest.raises(ValueError, match="exactly one"):
        LoadPoint(concurrency=1, request_rate=1.0)


def test_crosscheck_uses_the_admin_key_names_of_kvtriton_serve():
    # The client may not import the backend, so it repeats two names: they must not drift.
    from kvtriton.backend.entrypoints import serve, tritonserver
    from kvtriton.client import crosscheck

    assert crosscheck.ADMIN_KEY_ENV == serve.ADMIN_KEY_ENV
    assert crosscheck.ADMIN_KEY_HEADER == tritonserver.ADMIN_KEY_HEADER


@pytest.mark.parametrize("text, adapters", [
    ("", {}),
    ("  ", {}),
    ("sql=/adapters/sql", {"sql": "/adapters/sql"}),
    (" sql = /adapters/sql , chat-v1.2_x=/a/b=c, ", {"sql": "/adapters/sql", "chat-v1.2_x": "/a/b=c"}),
])
def test_lora_modules_read_as_names_and_paths_in_order(text, adapters):
    config = {"parameters": {"lora_modules": {"string_value": text}}}
    assert list(lora_modules_in(config).items()) == list(adapters.items())
    assert lora_modules_in({"parameters": {}}) == {}


def test_lora_name_goes_as_a_sampling_parameter_and_only_when_set(monkeypatch):
    model = FakeModel().installed(monkeypatch)
    with LLMClient("127.0.0.1:9") as client:
        assert client.generate("Hi", lora_name="sql", max_tokens=2).text == "ok"
        client.generate("Hi", max_tokens=2)
        list(client.stream(messages=[{"role": "user", "content": "Hi"}], lora_name="sql"))

    async def run_async() -> None:
        async with AsyncLLMClient("http://127.0.0.1:9") as client:
            await client.generate("Hi", lora_name="chat")
            async for _ in client.stream("Hi", lora_name="chat", temperature=0):
                pass
            await client.tokenize("Hi")  # a task: no adapter, no sampling
    asyncio.run(run_async())
    assert [model.sampling(i) for i in range(len(model.requests))] == [
        {"max_tokens": 2, "lora_name": "sql"}, {"max_tokens": 2}, {"lora_name": "sql"},
        {"lora_name": "chat"}, {"lora_name": "chat", "temperature": 0}, {}]


def test_generate_and_chat_send_the_lora_option(monkeypatch, capsys):
    model = FakeModel().installed(monkeypatch)
    assert generate_cmd.main(["Hi", "--url", "127.0.0.1:9", "--lora", "sql", "--max-tokens", "2"]) == 0
    assert generate_cmd.main(["Hi", "--url", "127.0.0.1:9"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert chat_cmd.main(["--url", "127.0.0.1:9", "--lora", "chat"]) == 0
    assert capsys.readouterr().out == "ok\nok\nok\n"
    assert [model.sampling(i) for i in range(3)] == [{"lora_name": "sql", "max_tokens": 2}, {}, {"lora_name": "chat"}]


def test_the_async_client_reads_the_lora_adapters_from_the_model_config(monkeypatch):
    async def adapters(lora_modules: str | None) -> dict[str, str]:
        FakeModel(lora_modules).installed(monkeypatch)
        async with AsyncLLMClient("127.0.0.1:9", connect_retries=0) as client:
            return await client.lora_modules()

    assert asyncio.run(adapters("sql=/a/sql, chat=/a/chat")) == {"sql": "/a/sql", "chat": "/a/chat"}
    assert asyncio.run(adapters(None)) == {}  # a model without the parameter


CONFIG = {"name": "llm", "parameters": {"lora_modules": {"string_value": "sql=/a/sql"}}}


def test_both_async_transports_fetch_the_model_config():
    class GrpcClient:  # tritonclient.grpc.aio's answer: the config inside a ModelConfigResponse
        async def get_model_config(self, model, as_json=False, client_timeout=None):
            assert model == "llm" and as_json
            return {"config": CONFIG}

    grpc = AsyncGrpcTransport(Endpoint.parse("127.0.0.1:9"), "llm", 5.0)
    grpc._client = GrpcClient()
    assert asyncio.run(grpc.model_config()) == CONFIG

    async def config_route(_: web.Request) -> web.Response:
        return web.json_response(CONFIG)

    async def over_http() -> tuple[dict, Exception]:
        app = web.Application()
        app.router.add_get("/v2/models/llm/config", config_route)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_ports(1)[0]
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            http = AsyncHttpTransport(Endpoint.parse(f"http://127.0.0.1:{port}"), "llm", 5.0)
            missing = AsyncHttpTransport(Endpoint.parse(f"http://127.0.0.1:{port}"), "nope", 5.0)
            try:
                config = await http.model_config()
                with pytest.raises(ServerError) as info:
                    await missing.model_config()
                return config, info.value
            finally:
                await http.close()
                await missing.close()
        finally:
            await runner.cleanup()

    config, error = asyncio.run(over_http())
    assert config == CONFIG and "HTTP 404" in str(error)
