"""The models a request's `model` may name, as vLLM serves them: the Triton model under its served name (the
base), and each LoRA adapter in its config's lora_modules, which goes to the model as the request's lora_name.
/v1/models lists the base's card, then one per adapter (vLLM's `root`: its path, `parent`: the base).

What only the model can tell (its adapters, its max_model_len) is asked once it is ready, then kept. Until then
a look is one readiness probe, never a wait (clients poll /v1/models while the server starts), and only the base
name is known; a request naming the base never looks.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from kvtriton.client.api import AsyncLLMClient
from kvtriton.client.errors import LLMClientError
from kvtriton.client.openai import protocol as p
from kvtriton.client.openai.errors import OpenAIError


class ServedModels:
    """The base model and its adapters, behind one client."""

    def __init__(self, client: AsyncLLMClient, base: str):
        self.client, self.base = client, base
        self._told: dict[str, Any] = {}  # what the model told: "max_model_len", "adapters" (name -> path)

    async def _ask(self, key: str, ask: Callable[[], Awaitable[Any]]) -> Any:
        """The model's answer to `ask`, kept from its first; None while the model is not ready."""
        if key not in self._told:
            try:
                if (await self.client.probe()).ready:
                    self._told[key] = await ask()
            except LLMClientError:
                pass  # not ready after all: unknown, this time
        return self._told.get(key)

    async def adapters(self) -> dict[str, str]:
        """The LoRA adapters, name -> path ({} until the model is ready)."""
        return await self._ask("adapters", self.client.lora_modules) or {}

    async def lora_name(self, model: str) -> str | None:
        """The adapter a request's `model` names, None for the base; for any other name the 404
        model_not_found, naming every served model."""
        if model == self.base:
            return None
        adapters = await self.adapters()
        if model not in adapters:
            names = ", ".join(repr(name) for name in (self.base, *adapters))
            raise OpenAIError(f"the model {model!r} does not exist; this server serves {names}", status=404,
                              param="model", code="model_not_found")
        return model

    async def cards(self) -> list[p.ModelCard]:
        """/v1/models: the base (with max_model_len once known), then the adapters."""
        max_model_len = await self._ask("max_model_len", self._max_model_len)
        adapters = await self.adapters()
        return [p.ModelCard(id=self.base, max_model_len=max_model_len),
                *(p.ModelCard(id=name, root=path, parent=self.base) for name, path in adapters.items())]

    async def card(self, model: str) -> p.ModelCard:
        """/v1/models/{model}: its card, or lora_name's 404."""
        await self.lora_name(model)
        return next(card for card in await self.cards() if card.id == model)

    async def _max_model_len(self) -> int:
        return (await self.client.tokenize("")).max_model_len
