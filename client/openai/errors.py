"""OpenAI's error shape, {"error": {"message", "type", "param", "code"}}, and its HTTP status.

kvtriton.client already sorts what Triton answers into typed errors (kvtriton.client.errors); this
maps each onto the status an OpenAI client acts on: 400 the request is wrong (the server's message
names the field), 404 no such model, 503 nothing ready answers or it is full (retry later), 504 the server went
quiet, 500 anything else the server reported.
"""

from __future__ import annotations

from typing import Any

from kvtriton.client.errors import (
    InvalidRequestError,
    LLMClientError,
    RequestTimeoutError,
    ServerBusyError,
    ServerUnavailableError,
)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          503: "service_unavailable_error", 504: "timeout_error"}

# The sampling keys structured output maps onto; a server without it rejects them as unknown.
STRUCTURED_OUTPUT_KEYS = ("guided_json", "guided_json_object", "guided_regex", "guided_choice", "guided_grammar")


class OpenAIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def from_client_error(error: LLMClientError) -> OpenAIError:
    message = str(error)
    if isinstance(error, InvalidRequestError):
        if "unknown sampling parameter" in message and any(repr(k) in message for k in STRUCTURED_OUTPUT_KEYS):
            return OpenAIError("this request needs structured output (the guided_* sampling keys), which this "
                               f"server's llm model does not have: {message}")
        return OpenAIError(message)
    if isinstance(error, (ServerUnavailableError, ServerBusyError)):
        return OpenAIError(message, 503)
    if isinstance(error, RequestTimeoutError):
        return OpenAIError(message, 504)
    return OpenAIError(message, 500)
