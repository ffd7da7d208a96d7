"""The Responses API without a server: a request as the chat completion it asks for (messages, tools, tool
choice, text format, sampling), the fields this stateless server refuses, and a chat choice's deltas as the
response's items and events, checked against the `openai` package's own models and stream accumulator."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager

import pytest
from fastapi.testclient import TestClient
from openai import omit
from openai.lib.streaming.responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from kvtriton.client.api import AsyncLLMClient
from kvtriton.client.errors import ServerError
from kvtriton.client.openai import protocol as p
from kvtriton.client.openai.app import create_app
from kvtriton.client.openai.chat_output import ChatOptions, ChatOutput, whole_message
from kvtriton.client.openai.errors import OpenAIError
from kvtriton.client.openai.responses import ResponseBuilder, _as_delta, respond_events
from kvtriton.client.openai.responses_protocol import Response as OurResponse
from kvtriton.client.openai.responses_protocol import ResponsesRequest
from kvtriton.client.types import Chunk

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": CITY}
USAGE = p.Usage(prompt_tokens=5, completion_tokens=7, total_tokens=12)


def request(**fields) -> ResponsesRequest:
    r = ResponsesRequest(**{"model": "llm", "input": "Hi", **fields})
    r.check()
    return r


def test_a_string_input_is_one_user_message_and_the_settings_are_the_chats():
    r = request(instructions="Be brief.", max_output_tokens=9, temperature=0.5, top_p=0.9, user="u", store=True,
                metadata={"k": "v"}, truncation="disabled", reasoning={})
    assert r.chat.template_messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert r.chat.sampling(0) == {"max_tokens": 9, "temperature": 0.5, "top_p": 0.9}
    assert r.chat.n == 1 and request().chat.sampling(0) == {}
    assert request(priority=1).chat.sampling(0) == {"priority": 1}  # vLLM's, as on the chat route


def test_a_conversation_of_items_becomes_the_chats_messages():
    """Parts joined, developer as system; a call joins the assistant turn before it (an earlier response's
    message and calls, sent back as its output) and the calls after it; earlier reasoning is left out."""
    r = request(input=[
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                                        {"type": "input_text", "text": "in Paris and Rome?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": [], "logprobs": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city": "Paris"}', "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "Rain"}]},
        {"role": "user", "content": "Thanks"},
        {"type": "function_call", "call_id": "call_3", "name": "get_weather", "arguments": "{}"},
    ], tools=[WEATHER], tool_choice="none")
    call = lambda i, city: {"id": f"call_{i}", "type": "function",  # noqa: E731
                            "function": {"name": "get_weather", "arguments": city}}
    assert r.chat.template_messages() == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "Let me look.",
         "tool_calls": [call(1, '{"city": "Paris"}'), call(2, '{"city": "Rome"}')]},
        {"role": "tool", "content": "Sunny", "tool_call_id": "call_1"},
        {"role": "tool", "content": "Rain", "tool_call_id": "call_2"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "", "tool_calls": [call(3, "{}")]},
    ]


def test_tools_and_tool_choice_take_the_chats_nested_shape():
    r = request(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
    assert r.chat.template_tools() == [{"type": "function", "function": {k: v for k, v in WEATHER.items()
                                                                          if k != "type"}}]
    assert r.chat.tool_mode == "named" and json.loads(r.chat.sampling(0)["guided_json"]) == CITY
    assert request(tools=[WEATHER], tool_choice="required").chat.tool_mode == "required"
    assert request(tools=[WEATHER]).chat.tool_mode == "auto"


def test_text_format_is_the_chats_response_format():
    fmt = {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}
    assert json.loads(request(text={"format": fmt}).chat.sampling(0)["guided_json"]) == CITY
    assert request(text={"format": {"type": "json_object"}}).chat.sampling(0) == {"guided_json_object": True}
    assert request(text={"format": {"type": "text"}}).chat.response_format is None


@pytest.mark.parametrize("fields, param", [
    (dict(previous_response_id="resp_1"), "previous_response_id"),
    (dict(conversation="conv_1"), "conversation"),
    (dict(prompt={"id": "pmpt_1"}), "prompt"),
    (dict(background=True), "background"),
    (dict(include=["message.output_text.logprobs"]), "include"),
    (dict(truncation="auto"), "truncation"),
    (dict(reasoning={"summary": "detailed"}), "reasoning"),
    (dict(reasoning={"generate_summary": "concise"}), "reasoning"),
    (dict(reasoning={"effort": "extreme"}), "reasoning"),
    (dict(tools=[{"type": "web_search"}]), "tools"),
    (dict(tools=[WEATHER], tool_choice={"type": "function", "name": "other"}), "tool_choice"),
    (dict(text={"format": {"type": "json_schema", "name": "x"}}), "text"),
    (dict(tools=[WEATHER], tool_choice="required", text={"format": {"type": "json_object"}}), "text"),
    (dict(input=[]), "input"),
    (dict(max_output_tokens=0), "max_output_tokens"),
])
def test_what_this_server_cannot_do_is_a_400_naming_the_field(fields, param):
    with pytest.raises(OpenAIError) as info:
        request(**fields)
    assert info.value.status == 400 and info.value.param == param


@pytest.fixture
def app_client():
    # Nothing listens on port 9: every check here answers before a request would reach Triton.
    with TestClient(create_app(AsyncLLMClient("127.0.0.1:9", connect_retries=0), "llm")) as c:
        yield c


@pytest.mark.parametrize("body, status, param", [
    ({"model": "llm", "input": "Hi", "frobnicate": 1}, 400, "frobnicate"),
    ({"model": "llm", "input": "Hi", "previous_response_id": "resp_1"}, 400, "previous_response_id"),
    ({"model": "llm", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400,
     "input"),
    ({"model": "llm", "input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input"),
    ({"model": "llm", "input": [{"type": "function_call", "name": "f"}]}, 400, "input.list.0.function_call.call_id"),
    ({"model": "llm"}, 400, "input"),
    ({"model": "gpt-4o", "input": "Hi"}, 404, "model"),
    ({"model": "llm", "input": "Hi", "stream": True, "tools": [{"type": "web_search"}]}, 400, "tools"),
])
def test_bad_requests_get_openai_errors_before_reaching_triton(app_client, body, status, param):
    r = app_client.post("/v1/responses", json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"].startswith(param) and error["message"]


def test_no_server_is_a_503_streamed_too(app_client):
    for stream in (False, True):
        r = app_client.post("/v1/responses", json={"model": "llm", "input": "Hi", "stream": stream})
        assert r.status_code == 503


def built(req: ResponsesRequest, texts: list[str], options: ChatOptions, finish: str = "stop"):
    """The events of `texts` streamed through ChatOutput and the builder, and the whole response of the same
    text, as respond() builds it."""
    output, builder = ChatOutput(req.chat, options), ResponseBuilder(OurResponse.started(req, "llm"))
    events = [builder.event("response.created", response=builder.response)]
    for i, text in enumerate(texts):
        events += builder.feed(output.feed(text, last=i == len(texts) - 1))
    events += builder.finish(finish, USAGE)
    whole = ResponseBuilder(OurResponse.started(req, "llm"))
    whole.feed(_as_delta(whole_message([ChatOutput(req.chat, options).feed("".join(texts), last=True)])))
    whole.finish(finish, USAGE)
    return events, whole.response.model_dump(mode="json", by_alias=True)


def without_ids(response: dict) -> list[dict]:
    return [{k: v for k, v in item.items() if k not in ("id", "call_id")} for item in response["output"]]


@pytest.mark.parametrize("texts, options, fields, kinds", [
    (["The capital", " is Paris", "."], ChatOptions(), {}, ["message"]),
    ([], ChatOptions(), {}, ["message"]),  # nothing generated: an empty message
    (["Hm, Paris", "</think>", "\n\n", "Paris."], ChatOptions(reasoning_parser="deepseek_r1"), {},
     ["reasoning", "message"]),
    (["Hm", "</think>\n "], ChatOptions(reasoning_parser="deepseek_r1"), {}, ["reasoning"]),  # no answer: no message
    (["Let me look. <tool_", 'call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n',
      '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'],
     ChatOptions(tool_call_parser="hermes"), dict(tools=[WEATHER]), ["message", "function_call", "function_call"]),
    (["\n", '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'], ChatOptions(tool_call_parser="hermes"),
     dict(tools=[WEATHER]), ["function_call"]),  # blank beside a call: no message
    (['{"city"', ': "Par', 'is"}'], ChatOptions(), dict(tools=[WEATHER], tool_choice={"type": "function",
                                                                                     "name": "get_weather"}),
     ["function_call"]),
])
def test_streamed_events_parse_and_join_to_the_whole_response(texts, options, fields, kinds):
    req = request(**fields)
    events, whole = built(req, texts, options)
    parse = TypeAdapter(ResponseStreamEvent).validate_python  # the openai package's models, validated strictly
    assert [parse(e).sequence_number for e in events] == list(range(len(events)))
    final = events[-1]
    assert final["type"] == "response.completed" and final["response"]["status"] == "completed"
    assert [item["type"] for item in final["response"]["output"]] == kinds
    assert without_ids(final["response"]) == without_ids(whole)
    assert Response.model_validate(whole).output_text == Response.model_validate(final["response"]).output_text
    state = ResponseStreamState(input_tools=omit, text_format=omit)  # the SDK's own stream accumulator
    for event in events:
        state.handle_event(parse(event))
    assert state._completed_response.output_text == Response.model_validate(whole).output_text
    # each item's deltas join to its whole text
    for index, item in enumerate(final["response"]["output"]):
        deltas = "".join(e["delta"] for e in events if e.get("output_index") == index and "delta" in e)
        assert deltas == (item["arguments"] if item["type"] == "function_call" else item["content"][0]["text"])


def test_a_cut_output_is_incomplete():
    events, whole = built(request(max_output_tokens=3), ["The capital", " is"], ChatOptions(), finish="length")
    assert events[-1]["type"] == "response.incomplete" and whole["status"] == "incomplete"
    assert whole["incomplete_details"] == {"reason": "max_output_tokens"}
    assert whole["output"][0]["status"] == "incomplete"
    parsed = Response.model_validate(whole)
    assert parsed.output_text == "The capital is" and parsed.usage.total_tokens == 12


def test_the_response_echoes_the_requests_settings():
    req = request(instructions="Be brief.", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
                  parallel_tool_calls=False, metadata={"k": "v"}, temperature=0.2)
    body = Response.model_validate(OurResponse.started(req, "llm").model_dump(mode="json", by_alias=True))
    assert body.id.startswith("resp_") and body.object == "response" and body.status == "in_progress"
    assert body.instructions == "Be brief." and body.tools[0].name == "get_weather" and body.temperature == 0.2
    assert body.tool_choice.name == "get_weather" and body.parallel_tool_calls is False
    assert body.metadata == {"k": "v"} and body.text.format.type == "text"
    assert OurResponse.started(request(), "llm").tool_choice == "none"
    fmt = {"type": "json_schema", "name": "city", "schema": CITY}
    assert OurResponse.started(request(text={"format": fmt}), "llm").model_dump(by_alias=True)["text"] == \
        {"format": fmt}  # as given, no nulls beside it


class _Fails:
    """A client whose one stream sends "Hello" and then fails, as a server that goes away mid-answer."""

    @asynccontextmanager
    async def _stream(self):
        async def chunks():
            yield Chunk("Hello", 1, "", num_input_tokens=5)
            raise ServerError("the server went away")
        yield chunks()

    def stream(self, prompt, messages=None, tools=None, **sampling):
        return self._stream()


def test_an_error_mid_stream_is_response_failed_the_last_event():
    async def events():
        return [e async for e in respond_events(_Fails(), request(stream=True), "llm")]
    sse = asyncio.run(events())
    assert all(e.startswith("event: ") and e.endswith("\n\n") for e in sse)
    parsed = [TypeAdapter(ResponseStreamEvent).validate_json(e.split("data: ", 1)[1]) for e in sse]
    assert [e.type for e in parsed][-2:] == ["response.output_text.delta", "response.failed"]
    failed = parsed[-1].response
    assert failed.status == "failed" and "went away" in failed.error.message
    assert failed.output[0].content[0].text == "Hello" and failed.output[0].status == "in_progress"


def test_a_summary_left_to_the_server_is_accepted_and_none_is_made():
    """Codex CLI and the Agents SDK send reasoning.summary "auto" by default; vLLM accepts it too."""
    request(reasoning={"effort": "low", "summary": "auto"})
    request(reasoning={"generate_summary": "auto"})
