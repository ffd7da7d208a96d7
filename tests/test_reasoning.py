"""Reasoning in the OpenAI frontend without a server: `<think>...</think>` as reasoning_content (vLLM's
deepseek_r1 and qwen3 rules), the same however the text is split, with tool calls parsed from the answer
only, and no split where the output is held to a schema."""

from __future__ import annotations

import json

import pytest

from kvtriton.client.openai.chat_output import ChatOptions, ChatOutput, whole_message
from kvtriton.client.openai.protocol import ChatCompletionRequest
from kvtriton.client.openai.reasoning import ThinkSplit
from kvtriton.client.openai.streamed_tags import held_back

TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="llm", messages=[{"role": "user", "content": "Hi"}], **fields)


def message(deltas, reasoning_parser="deepseek_r1", tool_call_parser=None, **fields):
    output = ChatOutput(request(**fields), ChatOptions(tool_call_parser, reasoning_parser))
    return whole_message([output.feed(d) for d in deltas] + [output.feed("", last=True)])


def splits(text):
    return [[text], list(text), [text[i:i + 4] for i in range(0, len(text), 4)]]


@pytest.mark.parametrize("text, parser, reasoning, content", [
    ("Let me think.\n</think>\n\nParis.", "deepseek_r1", "Let me think.\n", "\n\nParis."),
    ("<think>Hmm</think>Paris.", "deepseek_r1", "Hmm", "Paris."),  # a <think> it writes anyway is dropped
    ("Still thinking when cut off", "deepseek_r1", "Still thinking when cut off", None),
    ("Ends on a partial tag </thi", "deepseek_r1", "Ends on a partial tag </thi", None),
    ("<think>Hmm</think>Paris.", "qwen3", "Hmm", "Paris."),
    ("\n<think>Hmm\n</think>\nParis.", "qwen3", "Hmm\n", "\nParis."),
    ("Paris, no thinking.", "qwen3", None, "Paris, no thinking."),
    ("<thinking> is not the tag", "qwen3", None, "<thinking> is not the tag"),
    ("<thi", "qwen3", None, "<thi"),
])
def test_reasoning_is_split_alike_however_the_text_arrives(text, parser, reasoning, content):
    for deltas in splits(text):
        m = message(deltas, parser)
        assert (m.reasoning_content, m.content) == (reasoning, content), deltas


def test_reasoning_streams_as_it_arrives_holding_back_only_a_possible_tag():
    split = ThinkSplit(opens_in_reasoning=True)
    assert split.feed("Okay, so </") == ("Okay, so ", "")
    assert split.feed("think> The answer") == ("", " The answer")
    assert split.feed(" is 4.") == ("", " is 4.")
    assert held_back("abc</thi", "</think>") == 5 and held_back("abc", "</think>") == 0


def test_tool_calls_come_from_the_answer_after_the_reasoning():
    text = 'I should call <tool_call> here.</think><tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    m = message([text], "deepseek_r1", "hermes", tools=[TOOL])
    assert m.reasoning_content == "I should call <tool_call> here."
    assert [c.function.name for c in m.tool_calls] == ["get_time"] and m.content is None


def test_an_output_held_to_a_schema_has_no_reasoning():
    forced = message(['{"a": 1}'], tools=[TOOL], tool_choice="required")
    assert forced.reasoning_content is None and forced.content == '{"a": 1}'
    schema = message(['{"a": 1}'], response_format={"type": "json_object"})
    assert schema.reasoning_content is None and json.loads(schema.content) == {"a": 1}


def test_without_a_parser_all_is_content():
    m = message(["<think>Hmm</think>Paris."], reasoning_parser=None)
    assert m.reasoning_content is None and m.content == "<think>Hmm</think>Paris."


def test_unknown_parser_names_are_refused():
    with pytest.raises(ValueError, match="--reasoning-parser 'r1' is not known; use one of deepseek_r1, qwen3"):
        ChatOptions(reasoning_parser="r1")
