"""Typed client errors: every failure a caller can act on has its own class.

- ServerUnavailableError: nothing ready answers at the URL (not running, wrong
  port or protocol, model not loaded); retrying later may help.
- ServerError: the server took the request and answered with an error; carries
  the server's message verbatim. InvalidRequestError is the subset caused by the
  request itself (a bad sampling parameter, a missing input): retrying the same
  request will fail the same way. ServerBusyError is the subset that says the
  server cannot take it now (queue full, engine restarting): the same request may succeed later.
- RequestTimeoutError: the server went quiet for longer than the client's timeout.
"""

from __future__ import annotations

import re


class LLMClientError(Exception):
    """Base of every error kvtriton.client raises."""


class ServerUnavailableError(LLMClientError):
    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class ServerError(LLMClientError):
    def __init__(self, message: str):
        super().__init__(message)
        self.server_message = message


class InvalidRequestError(ServerError):
    """The server rejected the request's content; the message names the field."""


class ServerBusyError(ServerError):
    """The server cannot take the request now (its queue is full, or its engine is restarting); the same request
    may succeed later."""


class RequestTimeoutError(LLMClientError):
    pass


# Neither Triton's HTTP frontend (400 for every model error) nor its gRPC stream
# (message only) carries an error code for a model's error response, so the class
# comes from the message. These are the phrasings of kvtriton's request validation
# (SamplingParams, the adapter's request parsing, engine limits: tests/test_admission_errors.py holds each
# refusal of admission to them) and of Triton's own input checks.
_INVALID_REQUEST = re.compile(
    r"must be|must hold|is required|is not valid|not valid JSON|guided_\w+ is invalid|unknown sampling parameter|"
    r"both set|allow no token in common|"
    r"the model's context|lower max_tokens|prompt is empty|prompt token ids|"
    r"needs scheduling_policy|is not a LoRA adapter|more than this model allows|is not available here|"
    r"unexpected inference input|unexpected datatype|unexpected shape|expected \d+ inputs|"
    r"unknown model|is not found",
    re.IGNORECASE,
)


# The engine's EngineBusyError (max_num_waiting reached) and EngineDeadError (restarting after a fault).
_BUSY = re.compile(r"^server busy:|is being restarted; retry", re.IGNORECASE)


def server_error(message: str) -> ServerError:
    """The typed error for a server's error message."""
    if _INVALID_REQUEST.search(message):
        return InvalidRequestError(message)
    return (ServerBusyError if _BUSY.search(message) else ServerError)(message)
