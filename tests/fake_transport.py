"""Test helper: the `llm` model as kvtriton.client's transports see it, without a server. Every request is
recorded and answered "ok" (a tokenize task: two ids and max_model_len), the model config shows the given
lora_modules, and the readiness probe says what `ready` says. `installed` puts it behind every LLMClient and
AsyncLLMClient a test builds, whatever the URL, through their transport tables."""

from __future__ import annotations

import json
from typing import Any

from kvtriton.client.api import AsyncLLMClient, LLMClient
from kvtriton.client.probe import READY, Probe
from kvtriton.client.types import Chunk, GenerateRequest

MAX_MODEL_LEN = 4096


class FakeModel:
    def __init__(self, lora_modules: str | None = None, ready: bool = True):
        self.ready = ready
        self.requests: list[GenerateRequest] = []
        parameters = {} if lora_modules is None else {"lora_modules": {"string_value": lora_modules}}
        self.config: dict[str, Any] = {"name": "llm", "backend": "python", "parameters": parameters}

    def probe(self) -> Probe:
        return READY if self.ready else Probe(False, True, "server is up but not ready (models still loading?)")

    def answer(self, request: GenerateRequest) -> list[Chunk]:
        self.requests.append(request)
        if request.task == "tokenize":
            return [Chunk("", 0, "stop", token_ids=(1, 2), max_model_len=MAX_MODEL_LEN)]
        return [Chunk("ok", 1, "stop", num_input_tokens=3)]

    def sampling(self, index: int = -1) -> dict[str, Any]:
        """The sampling_parameters JSON of a recorded request, as it goes on the wire."""
        return json.loads(self.requests[index].inputs()["sampling_parameters"])

    def generated(self) -> list[GenerateRequest]:
        return [r for r in self.requests if r.task == "generate"]

    def installed(self, monkeypatch) -> "FakeModel":
        monkeypatch.setattr(LLMClient, "_TRANSPORTS", dict.fromkeys(("grpc", "http"), lambda *_: _Transport(self)))
        monkeypatch.setattr(AsyncLLMClient, "_TRANSPORTS",
                            dict.fromkeys(("grpc", "http"), lambda *_: _AsyncTransport(self)))
        return self


class _Transport:
    def __init__(self, model: FakeModel):
        self.model = model

    def probe(self) -> Probe:
        return self.model.probe()

    def responses(self, request: GenerateRequest):
        yield from self.model.answer(request)

    def close(self) -> None:
        pass


class _AsyncTransport:
    def __init__(self, model: FakeModel):
        self.model = model

    async def probe(self) -> Probe:
        return self.model.probe()

    async def model_config(self) -> dict[str, Any]:
        return self.model.config

    async def responses(self, request: GenerateRequest):
        for chunk in self.model.answer(request):
            yield chunk

    async def close(self) -> None:
        pass
