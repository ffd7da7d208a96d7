"""The `llm` model's tokenize and detokenize tasks without a server (fake pb_utils, the real admission over a
character tokenizer that adds BOS as Llama's do): answered at once in one final response, never reaching the
engine; and a chat's prompt reaches the engine as the ids a tokenize task reports (the template's BOS only)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.fake_pb_utils import FINAL, Request, Tokenizer, flush
from tests.test_triton_adapter_errors import adapter, only_error, text  # noqa: F401 (adapter: a fixture)

BOS = Tokenizer.BOS


def answer(adapter, **inputs) -> dict:
    request, before = Request(**inputs), dict(adapter.engine.added)
    adapter.execute([request])
    flush(adapter.outbox)
    [(response, flags)] = request.sender.sent
    assert flags == FINAL and response.error is None, response.error and response.error.message
    assert adapter.engine.added == before  # the engine never saw it
    return {name: value.tolist() for name, value in response.tensors.items()}


def test_tokenize_gives_the_ids_a_generation_starts_from(adapter):
    got = answer(adapter, text_input=text("Hi"), task=text("tokenize"))
    assert got["token_ids"] == [BOS, ord("H"), ord("i")]  # text: the tokenizer's special tokens added
    assert (got["num_input_tokens"], got["max_model_len"], got["num_output_tokens"]) == ([3], [64], [0])
    chat = answer(adapter, messages=text(json.dumps([{"role": "user", "content": "Hi"}])), task=text("tokenize"))
    assert chat["token_ids"] == [ord(c) for c in "<user>Hi"]  # a rendered chat: none added
    ids = answer(adapter, input_ids=np.array([5, 6], dtype=np.int32), task=text("tokenize"))
    assert ids["token_ids"] == [5, 6]


def test_detokenize_gives_the_text_with_special_tokens(adapter):
    got = answer(adapter, input_ids=np.array([BOS, ord("o"), ord("k")], dtype=np.int32), task=text("detokenize"))
    assert (got["text_output"], got["num_input_tokens"]) == ([b"<s>ok"], [3])


def test_a_chat_reaches_the_engine_as_the_ids_tokenize_reports(adapter):
    messages = text(json.dumps([{"role": "user", "content": "Hi"}]))
    adapter.execute([Request("g", messages=messages)])
    [(prompt, _, _)] = adapter.engine.added.values()
    assert prompt == answer(adapter, messages=messages, task=text("tokenize"))["token_ids"]


@pytest.mark.parametrize("inputs, message", [
    (dict(text_input=text("Hi"), task=text("count")),
     "task must be one of generate, tokenize, detokenize, got 'count'"),
    (dict(text_input=text("Hi"), task=text("detokenize")), "task detokenize takes input_ids"),
    (dict(input_ids=np.array([5, 1000], dtype=np.int32), task=text("detokenize")), r"token ids must be in \[0, 1000\)"),
    (dict(input_ids=np.array([-1], dtype=np.int32), task=text("tokenize")), r"prompt token ids must be in \[0, 1000\)"),
    (dict(text_input=text("é" * 501), task=text("tokenize")), "text_input must be at most 1000 bytes"),
    (dict(task=text("tokenize")), "text_input is required"),
])
def test_a_bad_task_request_is_refused_naming_what_is_wrong(adapter, inputs, message):
    request = Request(**inputs)
    adapter.execute([request])
    error = only_error(adapter, request)
    assert error.code == "INVALID_ARG" and re.search(message, error.message), error.message
