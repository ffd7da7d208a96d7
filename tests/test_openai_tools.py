"""Tool calling through the OpenAI frontend and a real tritonserver, driven by the official `openai` package:
a named function and "required" (the output held to the calls' JSON by structured output), "auto" with the
Hermes and Llama 3 JSON parsers, the 400 without one, and a conversation that carries a call and its result.
Default model, CPU."""

from __future__ import annotations

import json

import openai
import pytest

from kvtriton.backend.entrypoints.tritonserver import free_ports
from kvtriton.client.openai.server import FrontendThread

from tests.test_openai_api import client, frontend  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.server, pytest.mark.slow]

ASK = dict(model="llm", messages=[{"role": "user", "content": "What is the weather in Paris?"}], temperature=0,
           max_tokens=48)
CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 24}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": CITY}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                         "parameters": {"type": "object", "additionalProperties": False,
                                                        "properties": {}}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module", params=["hermes", "llama3_json", "pythonic", "mistral"])
def auto_client(llm_server, request):
    thread = FrontendThread(llm_server.grpc_url, "127.0.0.1", free_ports(1)[0], tool_call_parser=request.param).start()
    with openai.OpenAI(base_url=thread.url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c
    thread.stop()


def test_a_named_function_is_called_with_arguments_that_fit_its_schema(client):
    r = client.chat.completions.create(**ASK, tools=[WEATHER, TIME], tool_choice=NAMED)
    [choice] = r.choices
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    assert choice.message.content is None and choice.finish_reason == "stop"  # OpenAI's, for a named call


def test_a_streamed_named_call_adds_up_to_the_whole_one(client):
    whole = client.chat.completions.create(**ASK, tools=[WEATHER], tool_choice=NAMED).choices[0].message
    chunks = list(client.chat.completions.create(**ASK, tools=[WEATHER], tool_choice=NAMED, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id and all(d.index == 0 for d in deltas)
    assert "".join(d.function.arguments or "" for d in deltas) == whole.tool_calls[0].function.arguments
    assert len(deltas) > 2  # the arguments came in pieces as they were generated
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_required_calls_one_of_the_tools(client, stream):
    ask = dict(ASK, max_tokens=64, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    if stream:
        chunks = list(client.chat.completions.create(**ask, stream=True))
        calls = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        names, arguments = [calls[0].function.name], ["".join(d.function.arguments or "" for d in calls)]
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = client.chat.completions.create(**ask).choices[0]
        names = [c.function.name for c in choice.message.tool_calls]
        arguments = [c.function.arguments for c in choice.message.tool_calls]
        finish = choice.finish_reason
    assert len(names) == 1 and names[0] in ("get_weather", "get_time")
    assert isinstance(json.loads(arguments[0]), dict) and finish == "tool_calls"


def test_auto_needs_a_tool_call_parser(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**ASK, tools=[WEATHER])
    assert info.value.body["param"] == "tool_choice" and "--tool-call-parser" in info.value.body["message"]


def test_auto_with_a_parser_answers_in_text_when_the_model_calls_nothing(auto_client):
    """The default model's template shows it no tools, so it answers in words: content, no calls, "stop" (with the
    mistral parser, which asks for special tokens in the text, no end-of-turn token either)."""
    choice = auto_client.chat.completions.create(**ASK, tools=[WEATHER]).choices[0]
    assert choice.message.content and not choice.message.tool_calls and "<|im_end|>" not in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    chunks = list(auto_client.chat.completions.create(**ASK, tools=[WEATHER], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content


def test_a_conversation_with_a_call_and_its_result(client):
    """The call the model made and the tool's answer go back in the next request (OpenAI's loop)."""
    first = client.chat.completions.create(**ASK, tools=[WEATHER], tool_choice=NAMED).choices[0].message
    messages = [*ASK["messages"], first.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "Sunny, 24 C"}]
    r = client.chat.completions.create(**dict(ASK, messages=messages), tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.content and r.usage.prompt_tokens > 30
