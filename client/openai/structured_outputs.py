"""Structured output in an OpenAI request, as the `llm` model's guided_* sampling keys.

Three ways to ask, one constraint per request:
- OpenAI's `response_format`: `json_object` or `json_schema`;
- vLLM's older extra fields, which OpenAI clients send in `extra_body` (LangChain's vLLM client, outlines,
  benchmark scripts): `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`;
- vLLM's newer `structured_outputs` object: exactly one of `json`, `regex`, `choice`, `grammar`, `json_object`.

A chat request whose tool_choice forces a call is constrained too (to the call's JSON), so it takes none of
these. Whether a schema, regex or grammar compiles is the server's to say (a 400 naming the key).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvtriton.client.openai.errors import OpenAIError

GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    def sampling_keys(self) -> dict[str, Any]:
        if self.type == "json_object":
            return {"guided_json_object": True}
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema_ is None:
                raise OpenAIError('response_format {"type": "json_schema"} needs json_schema.schema',
                                  param="response_format")
            return {"guided_json": json.dumps(self.json_schema.schema_)}
        return {}


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs`. Its tuning fields (whitespace, fallback, structural tags) are 400s: the
    server's grammar engine has one setting for each."""

    model_config = ConfigDict(extra="forbid")

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def sampling_keys(self) -> dict[str, Any]:
        given = [name for name in ("json_", "regex", "choice", "grammar", "json_object")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise OpenAIError("structured_outputs takes exactly one of json, regex, choice, grammar, json_object; "
                              f"got {len(given)}", param="structured_outputs")
        [name] = given
        if name == "json_object":
            return {"guided_json_object": True}
        return guided_keys({f"guided_{name.rstrip('_')}": getattr(self, name)})


def guided_keys(fields: dict[str, Any]) -> dict[str, Any]:
    """vLLM's guided_* fields as the `llm` model's keys: a schema given as an object is sent as JSON text."""
    return {key: json.dumps(value) if isinstance(value, dict) else value
            for key, value in fields.items() if value is not None}


def one_constraint(sources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sampling keys of the one source that constrains the output ({} if none); a 400 naming the second
    when two do. `sources`: the request's field -> the keys it asks for (empty: it asks for none)."""
    given = [(field, keys) for field, keys in sources.items() if keys]
    if len(given) > 1:
        raise OpenAIError(f"{given[0][0]} and {given[1][0]} both constrain the output; give one",
                          param=given[1][0])
    return given[0][1] if given else {}
