"""vLLM's /tokenize and /detokenize: a prompt's or a chat's token ids, and token ids' text, from the model.

The frontend has no tokenizer (the model's lives with the model), so both go to the `llm` model as its
tokenize and detokenize tasks (AsyncLLMClient.tokenize / detokenize), which answer without generating. A
chat's ids are those its generation starts from: the messages (with tools and template variables) rendered by
the model's own template, encoded without added special tokens; a prompt's are encoded with them. Those are
vLLM's defaults, and the only ones here: `add_special_tokens` set otherwise is a 400, as is
`return_token_strs` (the model returns ids, not vocabulary entries).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from kvtriton.client.api import AsyncLLMClient
from kvtriton.client.errors import LLMClientError
from kvtriton.client.openai import protocol as p
from kvtriton.client.openai.errors import OpenAIError, from_client_error


class TokenizeRequest(p.RequestBody):
    """vLLM's two /tokenize bodies in one: `prompt` (text), or `messages` with the chat's fields."""

    model: str | None = None
    prompt: str | None = None
    messages: list[p.ChatMessage] | None = Field(None, min_length=1)  # as a chat completion's: checked here
    tools: list[p.Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool | None = None  # vLLM's default: true for a prompt, false for a chat (its template's)
    return_token_strs: bool = False

    def chat(self, model: str) -> p.ChatCompletionRequest | None:
        """The chat to render (checked as a chat completion's would be), or None for a prompt; OpenAIError (400)
        naming the field for what cannot be honoured."""
        if (self.prompt is None) == (self.messages is None):
            raise OpenAIError("give prompt (a text) or messages (a chat), one of the two", param="messages")
        if self.return_token_strs:
            raise OpenAIError("return_token_strs is not supported by this server (it returns token ids)",
                              param="return_token_strs")
        if self.add_special_tokens is not None and self.add_special_tokens != (self.messages is None):
            raise OpenAIError("add_special_tokens: this server encodes a prompt with the tokenizer's special tokens "
                              "and a chat without them (its template writes them), as a generation does",
                              param="add_special_tokens")
        if self.messages is None:
            for name in ("tools", "chat_template_kwargs"):
                if getattr(self, name) is not None:
                    raise OpenAIError(f"{name} needs messages", param=name)
            return None
        chat = p.ChatCompletionRequest(model=model, messages=self.messages, tools=self.tools,
                                       chat_template_kwargs=self.chat_template_kwargs,
                                       add_generation_prompt=self.add_generation_prompt,
                                       continue_final_message=self.continue_final_message)
        chat.check()
        return chat


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None  # return_token_strs (not supported)


class DetokenizeRequest(p.RequestBody):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


async def tokenize(client: AsyncLLMClient, request: TokenizeRequest, model: str) -> TokenizeResponse:
    chat = request.chat(model)
    try:
        if chat is None:
            tokens = await client.tokenize(request.prompt)
        else:
            tokens = await client.tokenize(messages=chat.template_messages(), tools=chat.template_tools(),
                                           chat_template_kwargs=chat.template_kwargs())
    except LLMClientError as e:
        raise from_client_error(e) from None
    return TokenizeResponse(count=tokens.count, max_model_len=tokens.max_model_len, tokens=list(tokens.token_ids))


async def detokenize(client: AsyncLLMClient, request: DetokenizeRequest) -> DetokenizeResponse:
    if not request.tokens:
        return DetokenizeResponse(prompt="")
    try:
        return DetokenizeResponse(prompt=await client.detokenize(request.tokens))
    except LLMClientError as e:
        raise from_client_error(e) from None
