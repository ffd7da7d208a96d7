"""The Responses API (POST /v1/responses) through the OpenAI frontend and a real tritonserver, driven by the
official `openai` package: whole and streamed (every event parsed by the package, the deltas joining to the
whole answer), instructions, a conversation as input items, max_output_tokens, a JSON schema, a named tool and
the call-and-result loop, the 400s of a stateless server, and a disconnect mid-stream that frees the KV blocks.
Default model, CPU."""

from __future__ import annotations

import json

import openai
import pytest

from kvtriton.backend.entrypoints.tritonserver import free_ports
from kvtriton.client.openai.server import FrontendThread

from tests.test_openai_api import client, closing_mid_stream_frees_the_kv_blocks, frontend  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.server, pytest.mark.slow]

QUESTION = "What is the capital of France?"
ASK = dict(model="llm", input=QUESTION, temperature=0, max_output_tokens=16)
CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 24}}}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": CITY}


def test_a_string_input_answers_whole(client):
    r = client.responses.create(**ASK)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed" and r.error is None
    assert "Paris" in r.output_text
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert r.usage.input_tokens > 10 and 0 < r.usage.output_tokens <= 16
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.model == "llm" and r.max_output_tokens == 16 and r.temperature == 0


def test_a_streamed_response_sends_openais_events_in_order(client):
    whole = client.responses.create(**ASK)
    events = list(client.responses.create(**ASK, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    deltas = types.count("response.output_text.delta")
    assert deltas > 1 and types == ["response.created", "response.in_progress", "response.output_item.added",
                                    "response.content_part.added", *["response.output_text.delta"] * deltas,
                                    "response.output_text.done", "response.content_part.done",
                                    "response.output_item.done", "response.completed"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-2].item.content[0].text
    done = events[-1].response
    assert done.output_text == text and done.usage == whole.usage and done.id == events[0].response.id
    assert events[0].response.status == "in_progress" and events[0].response.output == []


def test_the_sdks_stream_helper_gets_the_final_response(client):
    with client.responses.stream(**ASK) as stream:
        texts = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == final.output_text and "Paris" in final.output_text


def test_instructions_are_a_system_message_first(client):
    plain = client.responses.create(**ASK)
    r = client.responses.create(**ASK, instructions="Answer in one word.")
    assert r.instructions == "Answer in one word." and r.usage.input_tokens != plain.usage.input_tokens


def test_a_conversation_of_items(client):
    first = client.responses.create(**ASK)
    r = client.responses.create(model="llm", temperature=0, max_output_tokens=24, input=[
        {"role": "user", "content": QUESTION},
        *[item.model_dump(exclude_none=True) for item in first.output],  # the earlier answer, as it came back
        {"role": "user", "content": [{"type": "input_text", "text": "And of Italy?"}]}])
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_max_output_tokens_cuts_the_answer_incomplete(client):
    r = client.responses.create(model="llm", input="Tell a story.", temperature=0, max_output_tokens=4)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 4 and r.output[0].status == "incomplete"
    events = list(client.responses.create(model="llm", input="Tell a story.", temperature=0, max_output_tokens=4,
                                          stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == r.output_text


def test_a_json_schema_text_format_holds_the_output_to_it(client):
    r = client.responses.create(**dict(ASK, max_output_tokens=48),
                                text={"format": {"type": "json_schema", "name": "city", "schema": CITY}})
    assert isinstance(json.loads(r.output_text)["city"], str)


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_calls_the_function(client, stream):
    ask = dict(ASK, input="What is the weather in Paris?", max_output_tokens=48, tools=[WEATHER],
               tool_choice={"type": "function", "name": "get_weather"})
    if stream:
        events = list(client.responses.create(**ask, stream=True))
        [call] = events[-1].response.output
        arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert arguments == call.arguments
        assert [e.arguments for e in events if e.type == "response.function_call_arguments.done"] == [arguments]
    else:
        [call] = client.responses.create(**ask).output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert isinstance(json.loads(call.arguments)["city"], str)


def test_a_call_and_its_result_go_back_as_input(client):
    ask = dict(ASK, input="What is the weather in Paris?", max_output_tokens=32, tools=[WEATHER])
    first = client.responses.create(**ask, tool_choice={"type": "function", "name": "get_weather"})
    [call] = first.output
    r = client.responses.create(**dict(ask, input=[
        {"role": "user", "content": ask["input"]}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}]), tool_choice="none")
    assert r.output_text and r.usage.input_tokens > first.usage.input_tokens


@pytest.mark.parametrize("kwargs, param", [
    (dict(previous_response_id="resp_123"), "previous_response_id"),
    (dict(tools=[{"type": "web_search"}]), "tools"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(temperature=-1), "temperature"),  # the server's own check, through the chat path
    (dict(stream=True, temperature=-1), "temperature"),  # streamed: a 400, not an event in a 200 stream
    (dict(tools=[WEATHER]), "tool_choice"),  # "auto" needs a --tool-call-parser
])
def test_what_this_server_cannot_do_is_a_400(client, kwargs, param):
    stream = kwargs.pop("stream", False)
    with pytest.raises(openai.BadRequestError) as info:
        r = client.responses.create(**{**ASK, **kwargs}, stream=stream)
        list(r) if stream else r
    error = info.value.body
    assert info.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param or param in error["message"]


def test_reasoning_comes_as_a_reasoning_item(llm_server):
    """deepseek_r1's models open in the reasoning; the default model writes no </think>, so all is reasoning."""
    thread = FrontendThread(llm_server.grpc_url, "127.0.0.1", free_ports(1)[0], reasoning_parser="deepseek_r1").start()
    try:
        with openai.OpenAI(base_url=thread.url, api_key="unused", max_retries=0, timeout=120) as c:
            whole = c.responses.create(**ASK)
            events = list(c.responses.create(**ASK, stream=True))
    finally:
        thread.stop()
    [reasoning] = whole.output
    assert reasoning.type == "reasoning" and "Paris" in reasoning.content[0].text and whole.output_text == ""
    streamed = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert streamed == reasoning.content[0].text == events[-1].response.output[0].content[0].text


def test_a_disconnect_mid_stream_frees_the_kv_blocks(client, llm_server):
    # greedy, the default model tells this story in a loop until max_output_tokens (there is no ignore_eos here)
    closing_mid_stream_frees_the_kv_blocks(llm_server, lambda: client.responses.create(
        model="llm", input="Tell a story.", temperature=0, max_output_tokens=2000, stream=True))
