"""Structured output through a real tritonserver on the default model (SmolLM2-135M-Instruct, CPU): 20 prompts
with a JSON schema give 20 outputs that parse and validate (HTTP and gRPC), a regex holds, and an invalid
schema, regex or grammar gets a clear error while the server keeps serving."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest

from kvtriton.backend.engine.tokenizer import Tokenizer

from tests.city_schema import CITIES, CITY_SCHEMA
from tests.test_triton_llm import _settled_usage, grpc_stream, post

pytestmark = [pytest.mark.server, pytest.mark.slow]

@pytest.fixture(scope="module")
def chat(default_model_folder):
    tokenizer = Tokenizer.from_pretrained(default_model_folder)
    return lambda text: tokenizer.apply_chat_template([{"role": "user", "content": text}])


def http_generate(server, prompt, sampling):
    status, body = post(server, "/v2/models/llm/generate", {
        "text_input": prompt, "exclude_input_in_output": True, "sampling_parameters": json.dumps(sampling)})
    return (body["text_output"], body["finish_reason"]) if status == 200 else (None, body["error"])


def grpc_generate(server, prompt, sampling):
    chunks, error = grpc_stream(server, text_input=prompt, stream=True, sampling_parameters=json.dumps(sampling),
                                timeout=300)
    if error is not None:
        return None, str(error)
    return "".join(c["text"] for c in chunks), chunks[-1]["finish_reason"]


def test_twenty_prompts_with_a_schema_give_twenty_valid_objects(llm_server, chat):
    """Half over HTTP (schema as a JSON string), half over a gRPC stream (schema as an object), all in flight
    together: continuous batching with a guided row per request."""
    def one(i):
        prompt = chat(f"Describe the city of {CITIES[i]} as a JSON object with its name, country, population in "
                      "millions and up to three landmarks.")
        if i % 2:
            return grpc_generate(llm_server, prompt, {"guided_json": CITY_SCHEMA, "max_tokens": 200,
                                                      "temperature": 0})
        return http_generate(llm_server, prompt, {"guided_json": json.dumps(CITY_SCHEMA), "max_tokens": 200,
                                                  "temperature": 0})

    with ThreadPoolExecutor(len(CITIES)) as pool:
        results = list(pool.map(one, range(len(CITIES))))
    for city, (text, finish_reason) in zip(CITIES, results):
        assert text is not None, finish_reason
        assert finish_reason == "stop", (city, text)
        jsonschema.validate(json.loads(text), CITY_SCHEMA)
    assert sum(json.loads(text)["name"] == city for city, (text, _) in zip(CITIES, results)) >= 10
    assert _settled_usage(llm_server) == 0.0


def test_regex_and_json_object(llm_server, chat):
    date, reason = http_generate(llm_server, chat("When did the Berlin wall fall? Answer with a date."),
                                 {"guided_regex": r"(19|20)[0-9]{2}-[01][0-9]-[0-3][0-9]", "max_tokens": 20,
                                  "temperature": 0})
    assert reason == "stop" and len(date) == 10 and date[4] == date[7] == "-", date
    text, reason = grpc_generate(llm_server, chat("Return a JSON object with two keys, city and country, for Paris."),
                                 {"guided_json_object": True, "max_tokens": 200, "temperature": 0})
    assert reason == "stop" and json.loads(text) == {"city": "Paris", "country": "France"}, text
    choice, reason = http_generate(llm_server, chat("Is Paris in France? Answer yes or no."),
                                   {"guided_grammar": 'root ::= "yes" | "no"', "temperature": 0})
    assert (choice, reason) == ("yes", "stop")


@pytest.mark.parametrize("sampling, message", [
    ({"guided_json": {"type": "foo"}}, "guided_json is invalid: Invalid type: foo"),
    ({"guided_json": "{not json"}, "guided_json is not valid JSON"),
    ({"guided_regex": "[0-9"}, "guided_regex is invalid"),
    ({"guided_grammar": "root ::= missing"}, "guided_grammar is invalid"),
    ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "give at most one guided_* constraint"),
])
def test_invalid_constraint_gets_a_clear_error_and_the_server_serves_on(llm_server, sampling, message):
    text, error = http_generate(llm_server, "Hi", sampling)
    assert text is None and message in error, error
    text, error = grpc_generate(llm_server, "Hi", sampling)
    assert text is None and message in error, error
    text, reason = http_generate(llm_server, "Hi", {"guided_regex": "[a-z]{4}", "temperature": 0})
    assert reason == "stop" and len(text) == 4
    assert _settled_usage(llm_server) == 0.0


def test_the_readme_example(llm_server):
    """README's curl body, sent as is: the schema as an object inside the sampling_parameters string."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
              "required": ["name", "country"], "additionalProperties": False}
    status, body = post(llm_server, "/v2/models/llm/generate", {
        "text_input": "<|im_start|>user\nDescribe Paris as JSON.<|im_end|>\n<|im_start|>assistant\n",
        "exclude_input_in_output": True,
        "sampling_parameters": json.dumps({"temperature": 0, "max_tokens": 200, "guided_json": schema})})
    assert status == 200 and body["finish_reason"] == "stop", body
    assert json.loads(body["text_output"]) == {"name": "Paris", "country": "France"}
