"""The OpenAI frontend without a server: request bodies -> the `llm` model's sampling parameters, the checks
that answer 400 / 404 before anything reaches Triton, the mapping of client errors to OpenAI's shape, and a
request's `model` as the base model or one of its LoRA adapters (against tests/fake_transport.py)."""

from __future__ import annotations

import json
import socket
from unittest.mock import ANY

import pytest
from fastapi.testclient import TestClient

from kvtriton.backend.entrypoints.serve import ServeError, ServeOptions
from kvtriton.backend.entrypoints.tritonserver import free_ports
from kvtriton.client.api import AsyncLLMClient
from kvtriton.client.errors import (
    InvalidRequestError,
    RequestTimeoutError,
    ServerError,
    ServerUnavailableError,
    server_error,
)
from kvtriton.client.openai.app import create_app
from kvtriton.client.openai.chat_output import ChatOptions
from kvtriton.client.openai.errors import OpenAIError, from_client_error
from kvtriton.client.openai.protocol import ChatCompletionRequest, CompletionRequest
from kvtriton.client.openai.serving import chat_choices, completion_choices, completion_logprobs, vllm_prompt_logprobs

from tests.fake_transport import MAX_MODEL_LEN, FakeModel

CHAT = {"model": "llm", "messages": [{"role": "user", "content": "Hi"}]}


def chat(**fields) -> ChatCompletionRequest:
    request = ChatCompletionRequest(**CHAT, **fields)
    request.check()
    return request


def test_chat_fields_become_the_servers_sampling_keys():
    request = chat(max_completion_tokens=9, temperature=0.5, top_p=0.9, seed=7, stop="\n", presence_penalty=0.1,
                   frequency_penalty=0.2, logprobs=True, top_logprobs=3, user="ignored", top_k=5, ignore_eos=True)
    assert request.sampling(0) == {"max_tokens": 9, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": ["\n"],
                                   "presence_penalty": 0.1, "frequency_penalty": 0.2, "logprobs": 3, "top_k": 5,
                                   "ignore_eos": True}
    assert chat().sampling(0) == {}  # nothing set: the server's defaults
    assert chat(logprobs=True).sampling(0) == {"logprobs": 0}  # the chosen token's logprob only
    assert chat(max_tokens=4).sampling(0) == {"max_tokens": 4}
    assert chat(logit_bias={"50256": -100}).sampling(0) == {"logit_bias": {"50256": -100.0}}  # ids: the server's
    assert chat(priority=-2).sampling(0) == {"priority": -2}  # vLLM's; the server's scheduling_policy decides
    assert chat(include_stop_str_in_output=True, truncate_prompt_tokens=5, allowed_token_ids=[3, 4],
                bad_words=["darn"]).sampling(0) == {"include_stop_str_in_output": True, "truncate_prompt_tokens": 5,
                                                    "allowed_token_ids": [3, 4], "bad_words": ["darn"]}
    assert CompletionRequest(model="llm", prompt="Hi", priority=3).sampling(0) == {"priority": 3}


def test_vllms_structured_output_fields_become_guided_keys():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert chat(guided_json=schema).sampling(0) == {"guided_json": json.dumps(schema)}
    assert chat(guided_json=json.dumps(schema)).sampling(0) == {"guided_json": json.dumps(schema)}
    assert chat(guided_regex="[0-9]+").sampling(0) == {"guided_regex": "[0-9]+"}
    assert chat(guided_choice=["yes", "no"]).sampling(0) == {"guided_choice": ["yes", "no"]}
    assert chat(guided_grammar='root ::= "a"').sampling(0) == {"guided_grammar": 'root ::= "a"'}
    assert chat(structured_outputs={"choice": ["a", "b"]}).sampling(0) == {"guided_choice": ["a", "b"]}
    assert chat(structured_outputs={"json": schema}).sampling(0) == {"guided_json": json.dumps(schema)}
    assert chat(structured_outputs={"json_object": True}).sampling(0) == {"guided_json_object": True}
    completion = CompletionRequest(model="llm", prompt="a", structured_outputs={"regex": "[ab]"})
    completion.check()
    assert completion.sampling(0) == {"guided_regex": "[ab]"}


@pytest.mark.parametrize("fields, param", [
    (dict(guided_regex="a", guided_choice=["b"]), "guided_choice"),
    (dict(response_format={"type": "json_object"}, guided_json={}), "guided_json"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required", guided_regex="a"),
     "guided_regex"),
    (dict(structured_outputs={}), "structured_outputs"),
    (dict(structured_outputs={"regex": "a", "choice": ["b"]}), "structured_outputs"),
])
def test_two_structured_output_constraints_are_a_400(fields, param):
    with pytest.raises(OpenAIError) as info:
        chat(**fields)
    assert info.value.status == 400 and info.value.param == param


def test_chat_template_fields_become_the_models_chat_template_kwargs():
    assert chat().template_kwargs() is None
    assert chat(chat_template_kwargs={"enable_thinking": False}).template_kwargs() == {"enable_thinking": False}
    assert chat(reasoning_effort="low").template_kwargs() == {"reasoning_effort": "low"}
    prefill = dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello,"}])
    request = ChatCompletionRequest(model="llm", add_generation_prompt=False, continue_final_message=True, **prefill)
    request.check()
    assert request.template_kwargs() == {"add_generation_prompt": False, "continue_final_message": True}
    assert [c.chat_template_kwargs for c in chat_choices(request, ChatOptions())] == [request.template_kwargs()]
    with pytest.raises(OpenAIError) as info:
        ChatCompletionRequest(model="llm", continue_final_message=True, **prefill).check()
    assert info.value.param == "continue_final_message"


def test_each_choice_of_a_seeded_request_has_its_own_seed():
    request = chat(seed=100, n=3)
    assert [c.sampling["seed"] for c in chat_choices(request, ChatOptions())] == [100, 101, 102]
    assert all("seed" not in c.sampling for c in chat_choices(chat(n=2), ChatOptions()))


def test_completion_choices_number_prompt_major():
    request = CompletionRequest(model="llm", prompt=["a", "b"], n=2, logprobs=2)
    request.check()
    assert [(c.prompt, c.sampling) for c in completion_choices(request)] == [("a", {"logprobs": 2})] * 2 + \
        [("b", {"logprobs": 2})] * 2


def test_response_format_maps_onto_guided_keys():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    request = chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert json.loads(request.sampling(0)["guided_json"]) == schema
    assert chat(response_format={"type": "json_object"}).sampling(0) == {"guided_json_object": True}
    assert chat(response_format={"type": "text"}).sampling(0) == {}


def test_messages_reach_the_template_as_role_text_and_name():
    request = chat()
    request = ChatCompletionRequest(model="llm", messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
         "name": "ann"},
        {"role": "assistant", "content": None}])
    assert request.template_messages() == [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi there", "name": "ann"},
                                           {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("fields, param", [
    (dict(n=0), "n"), (dict(n=17), "n"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(top_logprobs=2), "top_logprobs"), (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(tool_choice="auto"), "tool_choice"), (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}] * 2, tool_choice="required"), "tools"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required",
          response_format={"type": "json_object"}), "response_format"),
    (dict(max_tokens=3, max_completion_tokens=4), "max_completion_tokens"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), "response_format"),
    (dict(prompt_logprobs=21), "prompt_logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"),
    (dict(prompt_logprobs=1, stream=True), "prompt_logprobs"),
])
def test_chat_fields_this_server_cannot_honour_are_400s(fields, param):
    with pytest.raises(OpenAIError) as info:
        chat(**fields)
    assert info.value.status == 400 and info.value.param == param


@pytest.mark.parametrize("fields, param", [
    (dict(prompt=[[]]), "prompt"), (dict(prompt=[]), "prompt"), (dict(prompt="a", suffix="b"), "suffix"),
    (dict(prompt="a", best_of=3), "best_of"), (dict(prompt="a", logprobs=6), "logprobs"),
])
def test_completion_fields_this_server_cannot_honour_are_400s(fields, param):
    with pytest.raises(OpenAIError) as info:
        CompletionRequest(model="llm", **fields).check()
    assert info.value.param == param


def test_completion_logprobs_offsets_follow_the_token_texts():
    entries = [{"token_id": 1, "token": "Par", "logprob": -0.1, "top": [[1, -0.1]], "top_tokens": ["Par"]},
               {"token_id": 2, "token": "is", "logprob": -0.2, "top": [[2, -0.2]], "top_tokens": ["is"]}]
    lp = completion_logprobs(entries, 5)
    assert (lp.tokens, lp.token_logprobs, lp.text_offset, lp.top_logprobs) == \
        (["Par", "is"], [-0.1, -0.2], [5, 8], [{"Par": -0.1}, {"is": -0.2}])
    with pytest.raises(OpenAIError) as info:  # an older server: no token text, no silent token ids
        completion_logprobs([{"token_id": 1, "logprob": -0.1, "top": []}], 0)
    assert info.value.status == 500


@pytest.mark.parametrize("error, status, param", [
    (InvalidRequestError("temperature must be >= 0, got -1.0"), 400, None),
    (InvalidRequestError("unknown sampling parameter 'guided_json'; accepted: ..."), 400, None),
    (ServerUnavailableError("grpc://x:1", "connection failed"), 503, None),
    (server_error("server busy: 256 requests are already waiting (max_num_waiting); retry later"), 503, None),
    (server_error("the engine has failed and is being restarted; retry shortly"), 503, None),
    (server_error("priority 3 needs scheduling_policy priority; this model schedules fcfs"), 400, None),
    (RequestTimeoutError("no response for 300 s"), 504, None),
    (ServerError("INTERNAL: boom"), 500, None),
])
def test_client_errors_map_onto_openai_statuses(error, status, param):
    mapped = from_client_error(error)
    assert (mapped.status, mapped.param) == (status, param)
    assert set(mapped.body()["error"]) == {"message", "type", "param", "code"}


@pytest.fixture
def app_client():
    # Nothing listens on port 9: every check here answers before a request would reach Triton.
    with TestClient(create_app(AsyncLLMClient("127.0.0.1:9", connect_retries=0), "llm")) as c:
        yield c


def test_the_apps_start_up_heap_is_frozen():
    """A full collection in the frontend pauses every stream it relays (31 ms on the 2-core VM): what start-up
    left alive is frozen once the app starts."""
    import gc

    gc.unfreeze()  # what earlier tests froze in this process
    with TestClient(create_app(AsyncLLMClient("127.0.0.1:9", connect_retries=0), "llm")):
        assert gc.get_freeze_count() > 0


def test_models_route(app_client):
    body = app_client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["llm"]
    assert app_client.get("/v1/models/other").status_code == 404


@pytest.mark.parametrize("body, status, param", [
    ({**CHAT, "model": "gpt-4o"}, 404, "model"),
    ({"model": "llm"}, 400, "messages"),
    ({**CHAT, "messages": []}, 400, "messages"),
    ({**CHAT, "temperature": "hot"}, 400, "temperature"),
    ({**CHAT, "frobnicate": True}, 400, "frobnicate"),
    ({**CHAT, "n": 0}, 400, "n"),
    ({**CHAT, "structured_outputs": {"choice": ["a"], "whitespace_pattern": " "}}, 400,
     "structured_outputs.whitespace_pattern"),
    ({**CHAT, "guided_regex": "a", "guided_choice": ["a"]}, 400, "guided_choice"),
])
def test_bad_requests_get_openai_errors_before_reaching_triton(app_client, body, status, param):
    r = app_client.post("/v1/chat/completions", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and set(error) == {"message", "type", "param", "code"}


def test_a_body_that_is_not_json_is_a_400(app_client):
    r = app_client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_no_server_is_a_503(app_client):
    r = app_client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    assert r.status_code == 503 and "127.0.0.1:9" in r.json()["error"]["message"]
    assert app_client.get("/health").status_code == 503


def test_an_api_key_guards_every_route_but_health():
    app = create_app(AsyncLLMClient("127.0.0.1:9", connect_retries=0), "llm", api_key="sk-local")
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-local"}):
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert c.post("/tokenize", json={"prompt": "x"}, headers=headers).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-local"}).json()["data"][0]["id"] == "llm"
        assert c.get("/health").status_code == 503  # open to probes (no server behind it here)


def test_serve_checks_the_openai_port(tmp_path):
    with pytest.raises(ServeError, match="--openai-port"):
        ServeOptions(tmp_path, openai_port=8001)  # the gRPC port's default
    with pytest.raises(ServeError, match="--openai-port 0"):
        ServeOptions(tmp_path, openai_port=0)
    assert ServeOptions(tmp_path, openai_port=9000).openai_port == 9000


def test_serve_fails_at_once_when_the_openai_port_is_taken(tmp_path, capsys):
    from kvtriton.backend.entrypoints.serve import main as serve_main
    from kvtriton.client.cli import _start_openai

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # before any tritonserver starts: no model repository content is needed to get this far
        assert serve_main(["--model-repository", str(tmp_path), "--openai-port", str(port)], openai=_start_openai) == 1
    assert f"the OpenAI port {port} cannot be bound" in capsys.readouterr().err


def test_serve_checks_the_tool_call_parser(tmp_path, capsys):
    from kvtriton.backend.entrypoints.serve import main as serve_main
    from kvtriton.client.cli import _start_openai

    with pytest.raises(ServeError, match="--tool-call-parser is the OpenAI frontend's: give --openai-port"):
        ServeOptions(tmp_path, tool_call_parser="hermes")
    port = str(free_ports(1)[0])
    assert serve_main(["--model-repository", str(tmp_path), "--openai-port", port, "--tool-call-parser", "granite"],
                      openai=_start_openai) == 1
    err = capsys.readouterr().err
    assert "--tool-call-parser 'granite' is not known; use one of hermes, llama3_json, pythonic, mistral" in err


def test_token_id_prompts_go_as_ids_and_an_echo_of_them_asks_for_their_texts():
    request = CompletionRequest(model="llm", prompt=[[1, 2, 3], [4, 5]], n=2, echo=True)
    request.check()
    assert [c.prompt for c in completion_choices(request)] == [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]]
    assert request.sampling(0)["prompt_logprobs"] == 0  # the token texts the echo is made of
    assert CompletionRequest(model="llm", prompt=[7, 8]).prompts() == [[7, 8]]
    assert "prompt_logprobs" not in CompletionRequest(model="llm", prompt="text", echo=True).sampling(0)


def test_vllms_prompt_logprobs_ask_the_server_for_the_larger_top_n_of_it_and_an_echo():
    assert chat(prompt_logprobs=2).sampling(0) == {"prompt_logprobs": 2}
    text = dict(model="llm", prompt="text")
    assert CompletionRequest(**text, prompt_logprobs=0).sampling(0) == {"prompt_logprobs": 0}
    assert CompletionRequest(**text, echo=True, logprobs=3, prompt_logprobs=1).sampling(0)["prompt_logprobs"] == 3
    assert CompletionRequest(**text, echo=True, logprobs=1, prompt_logprobs=4).sampling(0)["prompt_logprobs"] == 4


def test_prompt_logprobs_take_vllms_shape_the_token_first_then_the_top_n_ranked():
    entries = ({"token_id": 5, "token": "A", "logprob": None, "top": [], "top_tokens": []},
               {"token_id": 7, "token": "b", "logprob": -2.5, "rank": 3, "top": [[9, -0.1], [4, -2.0], [7, -2.5]],
                "top_tokens": ["x", "y", "b"]})
    first, second = vllm_prompt_logprobs(entries, 2)
    assert first is None  # nothing comes before the first token
    assert {k: v.model_dump() for k, v in second.items()} == {
        "7": {"logprob": -2.5, "rank": 3, "decoded_token": "b"},  # the prompt's token, outside the top 2
        "9": {"logprob": -0.1, "rank": 1, "decoded_token": "x"},
        "4": {"logprob": -2.0, "rank": 2, "decoded_token": "y"}}
    assert list(second) == ["7", "9", "4"]
    assert list(vllm_prompt_logprobs(entries, 3)[1]) == ["7", "9", "4"]  # in the top 3: listed once
    assert vllm_prompt_logprobs(entries, None) is None  # asked for by an echo only: not in the answer


def served_app(monkeypatch, model: FakeModel) -> TestClient:
    model.installed(monkeypatch)
    return TestClient(create_app(AsyncLLMClient("127.0.0.1:9", connect_retries=0), "llm"))


ADAPTERS = "sql=/adapters/sql, chat=/adapters/chat"


def test_models_lists_the_base_then_its_lora_adapters(monkeypatch):
    with served_app(monkeypatch, FakeModel(ADAPTERS)) as c:
        cards = c.get("/v1/models").json()["data"]
        assert cards == [
            {"id": "llm", "object": "model", "created": cards[0]["created"], "owned_by": "kvtriton",
             "max_model_len": MAX_MODEL_LEN},  # no root or parent: the base's card is OpenAI's shape
            {"id": "sql", "object": "model", "created": cards[1]["created"], "owned_by": "kvtriton",
             "root": "/adapters/sql", "parent": "llm"},
            {"id": "chat", "object": "model", "created": cards[2]["created"], "owned_by": "kvtriton",
             "root": "/adapters/chat", "parent": "llm"}]
        assert c.get("/v1/models/chat").json() == {**cards[2], "created": ANY}
        assert c.get("/v1/models/llm").json()["max_model_len"] == MAX_MODEL_LEN
        missing = c.get("/v1/models/nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert "serves 'llm', 'sql', 'chat'" in missing.json()["error"]["message"]


GENERATIONS = [("/v1/chat/completions", CHAT), ("/v1/completions", {"model": "llm", "prompt": "Hi", "n": 2}),
               ("/v1/responses", {"model": "llm", "input": "Hi"})]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route, body", GENERATIONS)
def test_a_requests_model_picks_the_base_or_a_lora_adapter(monkeypatch, route, body, stream):
    model = FakeModel(ADAPTERS)
    with served_app(monkeypatch, model) as c:
        for name, lora_name in (("llm", None), ("sql", "sql")):
            model.requests.clear()
            r = c.post(route, json={**body, "model": name, "stream": stream})
            assert r.status_code == 200, r.text
            assert model.generated() and all(json.loads(request.inputs()["sampling_parameters"]).get("lora_name")
                                             == lora_name for request in model.generated())
            assert f'"model":"{name}"' in r.text.replace(" ", "")  # the answer names the model as asked
        r = c.post(route, json={**body, "model": "nope", "stream": stream})
        error = r.json()["error"]
        assert r.status_code == 404 and (error["code"], error["param"]) == ("model_not_found", "model")
        assert "'nope' does not exist; this server serves 'llm', 'sql', 'chat'" in error["message"]


def test_tokenize_takes_an_adapters_name_too(monkeypatch):
    with served_app(monkeypatch, FakeModel(ADAPTERS)) as c:
        assert c.post("/tokenize", json={"model": "sql", "prompt": "Hi"}).json()["tokens"] == [1, 2]
        assert c.post("/detokenize", json={"model": "nope", "tokens": [1]}).status_code == 404


def test_adapters_are_known_once_the_model_is_ready_and_then_kept(monkeypatch):
    model = FakeModel("sql=/adapters/sql", ready=False)
    with served_app(monkeypatch, model) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["llm"]  # one look, no wait
        r = c.post("/v1/chat/completions", json={**CHAT, "model": "sql"})
        assert r.status_code == 404 and r.json()["error"]["message"].endswith("this server serves 'llm'")
        model.ready = True
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["llm", "sql"]
        model.config["parameters"] = {}  # asked once: a later change of the config is not seen
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["llm", "sql"]
    with served_app(monkeypatch, FakeModel()) as c:  # a model without lora_modules: the base alone
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["llm"]


def test_the_choices_carry_the_adapter():
    assert [c.lora_name for c in chat_choices(chat(n=2), ChatOptions(), "sql")] == ["sql", "sql"]
    assert [c.lora_name for c in chat_choices(chat(), ChatOptions())] == [None]
    request = CompletionRequest(model="sql", prompt=["a", "b"])
    assert [c.lora_name for c in completion_choices(request, "sql")] == ["sql", "sql"]
