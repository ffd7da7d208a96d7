"""Tool calls in the OpenAI frontend without a server: the parsers that turn a chat's output into content and
`tool_calls` (streamed in any split, they give what the whole text gives), the schema a forced call is held
to, and the request fields that choose them."""

from __future__ import annotations

import json

import pytest

from kvtriton.client.openai.chat_output import ChatOptions, ChatOutput, tool_call_parser, whole_message
from kvtriton.client.openai.protocol import ChatCompletionRequest
from kvtriton.client.openai.tool_calls import (
    HermesCalls,
    JsonCalls,
    Llama3JsonCalls,
    MistralCalls,
    NamedCall,
    PythonicCalls,
    python_calls,
    required_calls,
    required_calls_schema,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "required": ["city"],
                                                           "properties": {"city": {"type": "string"}}}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(**fields) -> ChatCompletionRequest:
    r = ChatCompletionRequest(model="llm", messages=[{"role": "user", "content": "Weather in Paris?"}], **fields)
    r.check()
    return r


def parse(parser, deltas):
    """The whole message from a parser fed `deltas`, through ChatOutput as the frontend feeds it."""
    output = ChatOutput(request(), ChatOptions())
    output._tools = parser
    return whole_message([output.feed(d) for d in deltas] + [output.feed("", last=True)])


def stream(parser, deltas):
    """The streamed deltas for `deltas`, without the None of a delta that sent nothing."""
    output = ChatOutput(request(), ChatOptions())
    output._tools = parser
    return [output.feed(d) for d in deltas]


def splits(text):
    """The text whole, a character at a time, and in 3-character deltas."""
    return [[text], list(text), [text[i:i + 3] for i in range(0, len(text), 3)]]


HERMES = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
         '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize("deltas", splits(HERMES))
def test_hermes_finds_the_calls_however_the_text_is_split(deltas):
    message = parse(HermesCalls(), deltas)
    assert message.content == "Let me look.\n"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in message.tool_calls}) == 2 and all(c.id.startswith("call_") for c in message.tool_calls)


def test_hermes_text_without_calls_is_content_as_written():
    text = "Paris is sunny. I use <b>tags</b> and a lone <tool"
    for deltas in splits(text):
        message = parse(HermesCalls(), deltas)
        assert message.content == text and message.tool_calls == []


def test_hermes_keeps_a_block_that_is_not_a_call_as_content():
    text = "<tool_call>not json</tool_call> and <tool_call>{\"name\": \"f\", \"arguments\": {}}"
    message = parse(HermesCalls(), [text])
    assert message.content == "<tool_call>not json</tool_call> and "
    assert [c.function.name for c in message.tool_calls] == ["f"]  # unclosed at the end: still a call


def test_hermes_one_call_when_parallel_calls_are_off():
    message = parse(HermesCalls(max_calls=1), [HERMES])
    assert [c.function.name for c in message.tool_calls] == ["get_weather"]


def test_hermes_streams_content_before_the_call_is_whole():
    deltas = ["Sure. <tool", '_call>{"name": "get_time", "argu', 'ments": {}}</tool_call>']
    first, held, call = stream(HermesCalls(), deltas)
    assert first.content == "Sure. " and held is None  # "<tool" was held back, then the call was not whole
    assert call.content is None and [(c.index, c.function.name) for c in call.tool_calls] == [(0, "get_time"),
                                                                                              (0, None)]
    assert call.tool_calls[0].id.startswith("call_") and call.tool_calls[1].function.arguments == "{}"


@pytest.mark.parametrize("deltas", splits('[{"name": "get_weather", "parameters": {"city": "Paris"}}, '
                                          '{"name":"get_time","parameters":{}}]'))
def test_required_sends_each_call_once_its_object_is_whole(deltas):
    message = parse(required_calls(), deltas)
    assert message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_required_cut_short_returns_the_rest_as_text():
    message = parse(required_calls(), ['[{"name": "get_time", "parameters": {}}, {"name": "get_wea'])
    assert [c.function.name for c in message.tool_calls] == ["get_time"]
    assert message.content == ', {"name": "get_wea'


LLAMA3 = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}'


@pytest.mark.parametrize("deltas", splits(LLAMA3) + splits("<|python_tag|>" + LLAMA3))
def test_llama3_json_finds_the_calls_however_the_text_is_split(deltas):
    message = parse(Llama3JsonCalls(), deltas)
    assert message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]


@pytest.mark.parametrize("text", ["Paris is sunny today.", "<b>bold</b> claim", '{"answer": 42}', "  "])
def test_llama3_json_answers_without_calls_are_content(text):
    for deltas in splits(text):
        message = parse(Llama3JsonCalls(), deltas)
        assert message.content == text and message.tool_calls == []


def test_llama3_json_streams_plain_answers_at_once_and_calls_when_whole():
    parser = Llama3JsonCalls()
    assert parser.feed(" ") == [] and [p.text for p in parser.feed("Sun")] == [" Sun"]
    assert [p.text for p in parser.feed("ny")] == ["ny"]
    parser = Llama3JsonCalls(max_calls=1)
    assert parser.feed('{"name": "get_time", "param') == []
    assert [p.name for p in parser.feed('eters": {}}; ')] == ["get_time", None]
    assert parser.feed('{"name": "get_weather", "parameters": {}}') == [] and parser.finish() == []


PYTHONIC = '[get_weather(city="Paris", days=3, metric=True, hours=[9, 18], extra=None), get_time()]'


@pytest.mark.parametrize("deltas", splits(PYTHONIC) + splits("<|python_start|>" + PYTHONIC + "<|python_end|>")
                         + splits("\n " + PYTHONIC + "\n"))
def test_pythonic_finds_the_calls_however_the_text_is_split(deltas):
    message = parse(PythonicCalls(), deltas)
    assert message.content is None or message.content == ""
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 3, "metric": True, "hours": [9, 18], "extra": None}),
        ("get_time", {})]


@pytest.mark.parametrize("text", ["Paris is sunny today.", "[1, 2, 3]", "[f(1)]", "[f(**kw)]", "[os.system('x')]",
                                  "[f(a=g())]", "[f(a=1)", "[" * 5000, "  "])
def test_pythonic_answers_that_are_not_calls_are_content_as_written(text):
    for deltas in splits(text):
        message = parse(PythonicCalls(), deltas)
        assert message.content == text and message.tool_calls == []


def test_pythonic_streams_plain_answers_at_once_and_holds_a_list_to_its_end():
    assert [d.content for d in stream(PythonicCalls(), ["Sunny", " and warm"]) if d] == ["Sunny", " and warm"]
    assert [d for d in stream(PythonicCalls(), ["[get_", "time()]"]) if d] == []  # sent by the last feed
    assert python_calls("[f(a=1), g(b='x')]") == [("f", {"a": 1}), ("g", {"b": "x"})]
    assert parse(PythonicCalls(max_calls=1), [PYTHONIC]).tool_calls[0].function.name == "get_weather"
    assert len(parse(PythonicCalls(max_calls=1), [PYTHONIC]).tool_calls) == 1


MISTRAL_V3 = 'Let me check. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, ' \
             '{"name": "get_time", "arguments": {}}]'
MISTRAL_V11 = 'Let me check. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}'


@pytest.mark.parametrize("deltas", splits(MISTRAL_V3) + splits(MISTRAL_V11))
def test_mistral_finds_the_calls_in_either_format_however_the_text_is_split(deltas):
    message = parse(MistralCalls(), deltas)
    assert message.content == "Let me check. "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("get_weather", {"city": "Paris"}), ("get_time", {})]


@pytest.mark.parametrize("text", ["Paris is sunny [TOOL", "[TOOL_CALLS] not json", "[TOOL_CALLS][ARGS]{}",
                                  "[TOOL_CALLS] [1, 2]", "x [TOOL_CALLS]f[ARGS]{oops"])
def test_mistral_text_that_is_not_calls_is_content_as_written(text):
    for deltas in splits(text):
        message = parse(MistralCalls(), deltas)
        assert message.content == text and message.tool_calls == []


def test_mistral_asks_for_special_tokens_in_the_text_for_auto_only():
    mistral = ChatOptions(tool_call_parser="mistral")
    assert mistral.sampling(request(tools=[WEATHER]), 0) == {"skip_special_tokens": False}
    assert mistral.sampling(request(tools=[WEATHER], skip_special_tokens=True), 0) == {"skip_special_tokens": True}
    assert mistral.sampling(request(), 0) == {} and ChatOptions("hermes").sampling(request(tools=[WEATHER]), 0) == {}
    assert [d.content for d in stream(MistralCalls(), ["Sure", ".", " [TOOL_", "CALLS]"]) if d] == ["Sure", ".", " "]


def test_named_call_streams_its_arguments():
    first, second = stream(NamedCall("get_weather"), ['{"city"', ': "Paris"}'])
    assert first.tool_calls[0].function.name == "get_weather" and first.tool_calls[0].type == "function"
    assert first.tool_calls[1].function.arguments == '{"city"'
    assert second.tool_calls[0].function.arguments == ': "Paris"}' and second.tool_calls[0].id is None
    message = parse(NamedCall("get_weather"), ['{"city": "Paris"}'])
    assert message.content is None and message.tool_calls[0].function.arguments == '{"city": "Paris"}'


def test_tool_choice_picks_the_parser_and_the_constraint():
    named = request(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert isinstance(tool_call_parser(named, None), NamedCall)
    assert json.loads(named.sampling(0)["guided_json"]) == WEATHER["function"]["parameters"]
    required = request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert isinstance(tool_call_parser(required, None), JsonCalls)
    assert json.loads(required.sampling(0)["guided_json"]) == required_calls_schema([WEATHER, TIME], True)
    auto = request(tools=[WEATHER])
    assert auto.tool_mode == "auto" and "guided_json" not in auto.sampling(0)
    assert isinstance(tool_call_parser(auto, "hermes"), HermesCalls)
    assert isinstance(tool_call_parser(auto, "llama3_json"), Llama3JsonCalls)
    assert isinstance(tool_call_parser(auto, "pythonic"), PythonicCalls)
    assert isinstance(tool_call_parser(auto, "mistral"), MistralCalls)
    none = request(tools=[WEATHER], tool_choice="none")
    assert tool_call_parser(none, "hermes") is None and none.template_tools() == [WEATHER]
    assert tool_call_parser(request(), "hermes") is None and request().template_tools() is None


def test_auto_without_a_parser_is_a_400_that_says_how():
    from kvtriton.client.openai.errors import OpenAIError
    with pytest.raises(OpenAIError) as info:
        tool_call_parser(request(tools=[WEATHER]), None)
    assert info.value.status == 400 and info.value.param == "tool_choice"
    assert "--tool-call-parser (hermes or llama3_json or pythonic or mistral)" in str(info.value)


def test_required_schema_names_each_tool_and_its_parameters():
    schema = required_calls_schema([WEATHER, TIME], one_call=False)
    assert schema["minItems"] == 1 and "maxItems" not in schema
    [weather, time] = schema["items"]["anyOf"]
    assert weather["properties"]["name"] == {"type": "string", "enum": ["get_weather"]}
    assert weather["properties"]["parameters"] == WEATHER["function"]["parameters"]
    assert time["properties"]["parameters"] == {"type": "object"}


def test_tool_turns_reach_the_template_with_their_fields():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    r = ChatCompletionRequest(model="llm", messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert r.template_messages() == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}]
