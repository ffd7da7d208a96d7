"""The OpenAI-compatible frontend against a real tritonserver, driven by the official `openai` package:
chat and completions, streamed and not, usage in the stream, stop, seed, logprobs, n, OpenAI's errors,
and a client that disconnects mid-request frees the KV blocks on the server. Default model, CPU."""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from kvtriton.backend.engine.tokenizer import Tokenizer
from kvtriton.backend.entrypoints.pbtxt_parameters import read_parameters
from kvtriton.backend.entrypoints.tritonserver import free_ports
from kvtriton.client.openai.server import FrontendThread

from tests.conftest import MODEL_REPOSITORY
from tests.serve_process import ServeProcess
from tests.test_triton_llm import _settled_usage, _wait_usage_positive, metric
from tests.test_triton_llm import post as triton_post

pytestmark = [pytest.mark.server, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG = dict(max_tokens=2000, extra_body={"ignore_eos": True})  # generates until cancelled


@pytest.fixture(scope="module")
def frontend(llm_server):
    thread = FrontendThread(llm_server.grpc_url, "127.0.0.1", free_ports(1)[0]).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def client(frontend):
    with openai.OpenAI(base_url=frontend.url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_models_lists_the_served_model_then_its_lora_adapter(client, frontend, lora_adapter):
    card, adapter = client.models.list()
    assert card.id == "llm" and card.model_extra["max_model_len"] == 4096  # vLLM's field, config.pbtxt's value
    assert adapter.id == "test-lora" and adapter.model_extra["parent"] == "llm"  # vLLM's fields for an adapter
    assert adapter.model_extra["root"] == str(lora_adapter)
    assert post(frontend, "/version", None)[1]["version"]


def test_a_lora_adapter_is_served_under_its_name(client):
    answer = lambda model: client.chat.completions.create(  # noqa: E731
        model=model, messages=QUESTION, temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    base, adapted = answer("llm"), answer("test-lora")
    assert adapted.model == "test-lora" and base.model == "llm"
    assert adapted.choices[0].message.content != base.choices[0].message.content
    assert answer("test-lora").choices[0].message.content == adapted.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="'llm', 'test-lora'"):
        answer("sql")


def test_chat_applies_the_template_and_reports_usage(client):
    r = client.chat.completions.create(model="llm", messages=QUESTION, temperature=0, max_tokens=16)
    [choice] = r.choices
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    # the templated prompt (role markers, the default system prompt) is longer than the question's 7 tokens
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_the_whole_answer_and_ends_with_usage(client):
    whole = client.chat.completions.create(model="llm", messages=QUESTION, temperature=0, max_completion_tokens=16)
    chunks = list(client.chat.completions.create(model="llm", messages=QUESTION, temperature=0,
                                                 max_completion_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    # Token counts, not cached_tokens: the prefix cache may serve one request's prompt and not the other's.
    counts = lambda u: (u.prompt_tokens, u.completion_tokens, u.total_tokens)  # noqa: E731
    assert chunks[-1].choices == [] and counts(chunks[-1].usage) == counts(whole.usage)
    assert all(c.usage is None for c in chunks[:-1])
    # vLLM's continuous_usage_stats: every chunk after the role's carries the usage so far
    counted = list(client.chat.completions.create(
        model="llm", messages=QUESTION, temperature=0, max_completion_tokens=16, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    assert counted[0].usage is None and all(c.usage is not None for c in counted[1:])
    so_far = [c.usage.completion_tokens for c in counted[1:]]
    assert so_far == sorted(so_far) and counts(counted[-1].usage) == counts(whole.usage)
    assert all(c.usage.prompt_tokens == whole.usage.prompt_tokens for c in counted[1:])


def test_completions_streamed_and_not(client):
    prompt = "The capital of France is"
    whole = client.completions.create(model="llm", prompt=prompt, temperature=0, max_tokens=8)
    assert whole.choices[0].text and whole.usage.completion_tokens == 8 and whole.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model="llm", prompt=prompt, temperature=0, max_tokens=8, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage
    echoed = client.completions.create(model="llm", prompt=prompt, temperature=0, max_tokens=8, echo=True)
    assert echoed.choices[0].text == prompt + whole.choices[0].text


def test_stop_string_ends_the_answer_before_it(client):
    whole = client.completions.create(model="llm", prompt="Count: 1, 2, 3,", temperature=0, max_tokens=24)
    text = whole.choices[0].text
    stop = text.strip().split()[2]  # a word the greedy answer reaches
    cut = client.completions.create(model="llm", prompt="Count: 1, 2, 3,", temperature=0, max_tokens=24, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].text and text.startswith(cut.choices[0].text)


def test_seed_reproduces_a_sample_and_n_gives_that_many_choices(client):
    kwargs = dict(model="llm", messages=[{"role": "user", "content": "Write a word."}], temperature=1.0,
                  max_tokens=12, seed=1234, n=3)
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.usage.prompt_tokens == second.usage.prompt_tokens  # counted once, not per choice


def test_streamed_n_choices_are_interleaved_by_index(client):
    chunks = list(client.completions.create(model="llm", prompt="Hello", temperature=0, max_tokens=6, n=2,
                                            stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.text
    assert texts[0] == texts[1] and texts[0]  # greedy: both choices are the same text


def test_logprobs_name_the_tokens(client):
    r = client.chat.completions.create(model="llm", messages=QUESTION, temperature=0, max_tokens=6, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token  # greedy: the best is the chosen
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
    legacy = client.completions.create(model="llm", prompt="Paris is", temperature=0, max_tokens=4, logprobs=1)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text and len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


@pytest.mark.parametrize("kwargs, param", [
    (dict(temperature=-1), "temperature"),  # the server's own check; its message names the field
    (dict(n=0), "n"),
    (dict(top_logprobs=3), "top_logprobs"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tool_choice"),  # "auto" needs a parser
    (dict(logit_bias={"99999999": 5}), "logit_bias"),  # the server's: outside the vocabulary
    (dict(logit_bias={"1": 500}), "logit_bias"),  # the server's: outside [-100, 100]
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
     "guided_json is invalid"),  # the server's schema check: a 400, not a 500
    (dict(stream=True, temperature=-1), "temperature"),  # streamed: still a 400, not an error inside a 200 stream
    (dict(extra_body={"guided_regex": "[0-9"}), "guided_regex is invalid"),  # the server's regex check
    (dict(extra_body={"guided_choice": ["a", ""]}), "guided_choice must be a list of non-empty strings"),
])
def test_bad_input_is_a_400_in_openai_shape(client, kwargs, param):
    stream = kwargs.pop("stream", False)
    with pytest.raises(openai.BadRequestError) as info:
        r = client.chat.completions.create(model="llm", messages=QUESTION, max_tokens=4, stream=stream, **kwargs)
        list(r) if stream else r
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param or param in error["message"]


def test_echo_with_logprobs_scores_the_prompt(client):
    """lm-evaluation-harness's loglikelihood request (echo, logprobs, max_tokens 1): one logprob per prompt token
    (none for the first), and a prompt token's logprob is what sampling it there reported."""
    asked = client.completions.create(model="llm", prompt="The capital of France is", temperature=0, max_tokens=1,
                                      logprobs=1)
    [answer_lp] = asked.choices[0].logprobs.token_logprobs
    prompt = "The capital of France is" + asked.choices[0].text
    for stream in (False, True):
        r = client.completions.create(model="llm", prompt=prompt, temperature=0, max_tokens=1, logprobs=2, echo=True,
                                      stream=stream)
        lp = r.choices[0].logprobs if not stream else merged_logprobs(r)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(x < 0 for x in lp.token_logprobs[1:]) and all(len(t) == 2 for t in lp.top_logprobs[1:])
        assert "".join(lp.tokens[:-1]) == prompt  # the prompt's tokens, then the one generated
        assert lp.token_logprobs[-2] == pytest.approx(answer_lp, abs=1e-3)
        assert lp.text_offset[-1] == len(prompt)


def test_token_id_prompts_answer_as_their_text_and_echo_it(client, default_model_folder):
    """OpenAI's token-id prompts (lm-evaluation-harness sends them by default): the same answer as the text, and
    an echo made of the tokens' texts, scored when logprobs are asked (its loglikelihood request)."""
    from kvtriton.backend.engine.tokenizer import Tokenizer

    text = "The capital of France is"
    ids = Tokenizer.from_pretrained(default_model_folder).encode(text)
    ask = dict(model="llm", temperature=0, max_tokens=4)
    plain = client.completions.create(prompt=text, **ask).choices[0].text
    [one, two] = client.completions.create(prompt=[ids, ids], **ask).choices
    assert one.text == two.text == plain
    echoed = client.completions.create(prompt=ids, echo=True, **ask).choices[0]
    assert echoed.text == text + plain and echoed.logprobs is None
    scored = client.completions.create(prompt=ids, echo=True, logprobs=1, **dict(ask, max_tokens=1)).choices[0]
    assert len(scored.logprobs.token_logprobs) == len(ids) + 1 and scored.logprobs.token_logprobs[0] is None


def test_vllms_prompt_logprobs_rank_each_prompt_token(client, default_model_folder):
    """vLLM's prompt_logprobs (extra_body): per prompt token after the first, {token id: logprob, rank, text},
    the prompt's token first, then the top N ranked 1 .. N; the same numbers as an echo's logprobs, whose top
    list keeps its own N. Chat answers carry them once, beside the choices."""
    text = "The capital of France is"
    ids = Tokenizer.from_pretrained(default_model_folder).encode(text)
    r = client.completions.create(model="llm", prompt=text, temperature=0, max_tokens=1, logprobs=1, echo=True,
                                  extra_body={"prompt_logprobs": 2}).choices[0]
    ranked = r.model_extra["prompt_logprobs"]
    assert len(ranked) == len(ids) and ranked[0] is None
    for token_id, entry, logprob, top in zip(ids[1:], ranked[1:], r.logprobs.token_logprobs[1:],
                                             r.logprobs.top_logprobs[1:]):
        (own_id, own), *_ = entry.items()
        assert own_id == str(token_id) and own["logprob"] == pytest.approx(logprob, abs=1e-6)
        assert {e["rank"] for e in entry.values()} >= {1, 2} and len(entry) == (2 if own["rank"] <= 2 else 3)
        assert max(entry.values(), key=lambda e: e["logprob"])["rank"] == 1 and len(top) == 1
        assert all(isinstance(e["decoded_token"], str) for e in entry.values())
    chat = client.chat.completions.create(model="llm", messages=QUESTION, max_tokens=1, n=2,
                                          extra_body={"prompt_logprobs": 0})
    ranked = chat.model_extra["prompt_logprobs"]
    assert ranked[0] is None and len(ranked) == chat.usage.prompt_tokens
    assert all(len(entry) == 1 and next(iter(entry.values()))["rank"] >= 1 for entry in ranked[1:])
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(model="llm", prompt=text, max_tokens=1, stream=True,
                                  extra_body={"prompt_logprobs": 1})


def post(frontend, path: str, body: dict | None) -> tuple[int, dict]:
    """A JSON request to the frontend's root (vLLM's routes); body None: a GET."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(frontend.url.removesuffix("/v1") + path, data,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_lone_surrogate_in_text_is_a_400_naming_it(frontend, llm_server):
    """JSON may escape half a surrogate pair ("\\ud800", valid JSON, not Unicode): a 400 naming the field from
    every route, where it was a 500 from whatever encoded it later (the gRPC client, a response echoing it), and
    the server's own check for a chat that reaches it (the model's messages input): the server serves on."""
    for path, body, field in [
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages.0.content"),
            ("/v1/chat/completions", {"messages": QUESTION, "guided_choice": ["a", "\udfff"]}, "guided_choice.1"),
            ("/v1/completions", {"prompt": "hi \udfff"}, "prompt"),
            ("/v1/completions", {"prompt": "hi", "logit_bias": {"\ud800": 1}}, "a key of logit_bias"),
            ("/v1/responses", {"input": "hi", "text": {"format": {"type": "json_schema", "name": "\ud800",
                                                                  "schema": {"type": "object"}}}}, "text.format.name"),
            ("/tokenize", {"prompt": "\ud800"}, "prompt")]:
        status, error = post(frontend, path, {"model": "llm", **body})
        assert status == 400, (path, error)
        assert error["error"]["message"].startswith(f"{field} must be valid Unicode: a lone surrogate"), error
    status, error = triton_post(llm_server, "/v2/models/llm/generate", {
        "messages": json.dumps([{"role": "user", "content": "hi \ud800"}]), "parameters": {"max_tokens": 2}})
    assert status == 400 and "a lone surrogate U+D800" in error["error"], error
    status, answer = post(frontend, "/v1/completions", {"model": "llm", "prompt": "Hi", "max_tokens": 2})
    assert status == 200 and answer["usage"]["completion_tokens"] == 2


def test_vllms_tokenize_counts_what_the_generation_reads_and_detokenize_reverses_it(client, frontend,
                                                                                    default_model_folder):
    """/tokenize of a prompt: the tokenizer's ids; of a chat: as many as a chat completion's prompt_tokens, the
    template's own special tokens only. /detokenize: the text back."""
    ids = Tokenizer.from_pretrained(default_model_folder).encode("The capital of France is")
    status, text = post(frontend, "/tokenize", {"model": "llm", "prompt": "The capital of France is"})
    assert status == 200 and (text["tokens"], text["count"]) == (ids, len(ids)) and text["max_model_len"] > len(ids)
    status, chat = post(frontend, "/tokenize", {"messages": QUESTION})
    usage = client.chat.completions.create(model="llm", messages=QUESTION, max_tokens=1).usage
    assert status == 200 and chat["count"] == usage.prompt_tokens == len(chat["tokens"])
    assert post(frontend, "/detokenize", {"model": "llm", "tokens": ids}) == (200, {"prompt":
                                                                                  "The capital of France is"})
    assert post(frontend, "/detokenize", {"tokens": []}) == (200, {"prompt": ""})
    for path, body, status, param in [
            ("/tokenize", {"prompt": "x", "messages": QUESTION}, 400, "messages"),
            ("/tokenize", {"messages": []}, 400, "messages"),
            ("/tokenize", {"prompt": "x", "return_token_strs": True}, 400, "return_token_strs"),
            ("/tokenize", {"messages": QUESTION, "add_special_tokens": True}, 400, "add_special_tokens"),
            ("/tokenize", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
            ("/detokenize", {"tokens": [10**8]}, 400, None)]:
        got, answer = post(frontend, path, body)
        assert (got, answer["error"]["param"]) == (status, param), answer


def test_usage_counts_the_prompt_tokens_the_prefix_cache_served(client):
    """OpenAI's usage.prompt_tokens_details.cached_tokens (the Responses API's input_tokens_details): the same long
    prompt again is served from the prefix cache, whole blocks of it."""
    question = [{"role": "user", "content": "Summarise this: " + " ".join(f"item {i}" for i in range(40))}]
    first, again = (client.chat.completions.create(model="llm", messages=question, max_tokens=1).usage
                    for _ in range(2))
    cached = again.prompt_tokens_details.cached_tokens
    assert first.prompt_tokens == again.prompt_tokens and first.prompt_tokens_details.cached_tokens < cached
    assert again.prompt_tokens - 16 <= cached < again.prompt_tokens  # all its full 16-token blocks, the last token not
    streamed = client.chat.completions.create(model="llm", messages=question, max_tokens=1, stream=True,
                                              stream_options={"include_usage": True})
    assert [c.usage for c in streamed if c.usage][0].prompt_tokens_details.cached_tokens == cached
    response = client.responses.create(model="llm", input=question[0]["content"], max_output_tokens=1)
    assert response.usage.input_tokens_details.cached_tokens > 0


def merged_logprobs(stream):
    """A streamed completion's logprobs, joined across its chunks."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                token_logprobs += choice.logprobs.token_logprobs
                top_logprobs += choice.logprobs.top_logprobs
                text_offset += choice.logprobs.text_offset
    return type("Logprobs", (), dict(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs,
                                     text_offset=text_offset))


def test_logit_bias_steers_the_answer(client, default_model_folder):
    """OpenAI's logit_bias (token id strings -> bias): -100 keeps the greedy answer's first token out, +100
    makes one token the whole answer."""
    tokenizer = Tokenizer.from_pretrained(default_model_folder)
    ask = dict(model="llm", messages=QUESTION, temperature=0, max_tokens=6)
    plain = client.chat.completions.create(**ask).choices[0].message.content
    first = tokenizer.encode(plain, add_special_tokens=False)[0]
    banned = client.chat.completions.create(**ask, logit_bias={str(first): -100}).choices[0].message.content
    assert tokenizer.encode(banned, add_special_tokens=False)[0] != first
    forced = tokenizer.encode(" Paris", add_special_tokens=False)[-1]
    r = client.chat.completions.create(**ask, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == tokenizer.decode([forced] * 6)


def test_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=4)
    assert info.value.body["code"] == "model_not_found" and "'llm'" in info.value.body["message"]


def test_response_format_asks_the_server_for_structured_output(client):
    """json_schema becomes sampling key guided_json, json_object guided_json_object: the output parses."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    r = client.chat.completions.create(model="llm", messages=QUESTION, max_tokens=48, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "city", "schema": schema}})
    assert isinstance(json.loads(r.choices[0].message.content)["city"], str)
    r = client.chat.completions.create(model="llm", messages=QUESTION, max_tokens=48, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_vllms_guided_fields_constrain_the_output(client):
    """vLLM's extensions as its users send them, in extra_body: guided_choice and structured_outputs, chat and
    completions, streamed too."""
    choices = ["Paris", "London", "Rome"]
    r = client.chat.completions.create(model="llm", messages=QUESTION, max_tokens=8, temperature=0,
                                       extra_body={"guided_choice": choices})
    assert r.choices[0].message.content in choices and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="llm", prompt="The capital of France is", max_tokens=8, stream=True,
                                       extra_body={"structured_outputs": {"regex": "[0-9]{3}"}})
    assert re.fullmatch("[0-9]{3}", "".join(c.choices[0].text for c in stream))


def test_continue_final_message_prefills_the_answer(client):
    """vLLM's continue_final_message: the answer continues the assistant's last message (greedy, so the same as
    the answer's own continuation past that prefix); chat_template_kwargs reach the template (SmolLM2's ignores
    an unknown variable, as Jinja does)."""
    prefill = "The capital of France is"
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."},
                {"role": "assistant", "content": prefill}]
    r = client.chat.completions.create(model="llm", messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"add_generation_prompt": False, "continue_final_message": True,
                                                   "chat_template_kwargs": {"enable_thinking": False}})
    continued = r.choices[0].message.content
    assert "Paris" in continued and not continued.startswith(prefill)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="llm", messages=messages, max_tokens=4,
                                       extra_body={"continue_final_message": True})
    assert info.value.body["param"] == "continue_final_message"


def test_with_an_api_key_the_sdk_s_key_is_checked(llm_server):
    """`--api-key-file` / $KVTRITON_API_KEY: the key the openai package sends as its bearer token."""
    guarded = FrontendThread(llm_server.grpc_url, "127.0.0.1", free_ports(1)[0], api_key="sk-kvtriton").start()
    try:
        with openai.OpenAI(base_url=guarded.url, api_key="sk-kvtriton", max_retries=0, timeout=60) as c:
            assert c.chat.completions.create(model="llm", messages=QUESTION, max_tokens=2).usage.completion_tokens
        with openai.OpenAI(base_url=guarded.url, api_key="sk-other", max_retries=0, timeout=60) as c:
            with pytest.raises(openai.AuthenticationError):
                c.chat.completions.create(model="llm", messages=QUESTION, max_tokens=2)
    finally:
        guarded.stop()


def test_server_not_ready_is_a_503():
    port = free_ports(1)[0]
    dead = FrontendThread(f"127.0.0.1:{free_ports(1)[0]}", "127.0.0.1", port, connect_retries=0).start()
    try:
        with openai.OpenAI(base_url=dead.url, api_key="unused", max_retries=0) as c:
            with pytest.raises(openai.InternalServerError) as info:
                c.chat.completions.create(model="llm", messages=QUESTION, max_tokens=4)
        assert info.value.status_code == 503
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
        assert health.value.code == 503
    finally:
        dead.stop()


def _generated(server) -> float:
    return metric(server, "kvtriton_generation_tokens_total")


def closing_mid_stream_frees_the_kv_blocks(llm_server, open_stream) -> None:
    """`open_stream()` starts a stream that would generate far more than 1000 tokens; a few events in, closing
    it cancels the request on the server."""
    assert _settled_usage(llm_server) == 0.0
    before = _generated(llm_server)
    stream = open_stream()
    for _, _event in zip(range(5), stream):
        pass  # tokens are flowing: the request holds KV blocks
    assert _wait_usage_positive(llm_server)
    stream.close()  # closes the HTTP connection
    assert _settled_usage(llm_server) == 0.0
    assert metric(llm_server, "kvtriton_num_requests_running") == 0
    assert _generated(llm_server) - before < 1000  # cancelled: far from the 2000 tokens asked for


def test_a_disconnect_mid_stream_frees_the_kv_blocks(client, llm_server):
    closing_mid_stream_frees_the_kv_blocks(llm_server, lambda: client.chat.completions.create(
        model="llm", messages=[{"role": "user", "content": "Tell a story."}], stream=True, **LONG))


def test_a_disconnect_before_a_whole_answer_frees_the_kv_blocks(frontend, llm_server):
    assert _settled_usage(llm_server) == 0.0
    before = _generated(llm_server)
    started = time.monotonic()
    with openai.OpenAI(base_url=frontend.url, api_key="unused", max_retries=0, timeout=3) as impatient:
        with pytest.raises(openai.APITimeoutError):  # the client gives up and closes the connection
            impatient.completions.create(model="llm", prompt="Tell a story.", **LONG)
    assert time.monotonic() - started < 30
    assert _settled_usage(llm_server) == 0.0
    assert _generated(llm_server) - before < 1000  # cancelled: far from the 2000 tokens asked for


def test_kvtriton_serve_starts_the_frontend_beside_the_server(tmp_path):
    """... with an engine parameter set on the command line (--engine-arg), over the shipped config.pbtxt."""
    port = free_ports(1)[0]
    serve = ServeProcess(MODEL_REPOSITORY, tmp_path,
                         extra=["--openai-port", str(port), "--engine-arg", "scheduling_policy=priority"])
    serve.command[:3] = [sys.executable, "-m", "kvtriton.client.cli", "serve"]  # the command, with the client
    with serve:
        assert f"OpenAI   http://127.0.0.1:{port}/v1 (open: no API key" in serve.output  # in the banner
        assert "llm: scheduling_policy=priority (over its config.pbtxt)" in serve.output
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0) as c:
            r = c.chat.completions.create(model="llm", messages=QUESTION, temperature=0, max_tokens=8,
                                          extra_body={"priority": 1})  # a 400 under the shipped fcfs
        assert "Paris" in r.choices[0].message.content
    assert read_parameters(MODEL_REPOSITORY / "llm" / "config.pbtxt")["scheduling_policy"] == "fcfs"  # untouched
