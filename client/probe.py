"""Readiness: what one look at the server found, and the bounded retry loop around it."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from kvtriton.client.errors import ServerUnavailableError

FIRST_BACKOFF_S = 0.2
MAX_BACKOFF_S = 2.0
PROBE_TIMEOUT_S = 2.0  # one health request; a server that is up answers in milliseconds


@dataclass(frozen=True)
class Probe:
    ready: bool
    retry: bool  # False when waiting cannot help (the server is up but has no such model)
    reason: str = ""


READY = Probe(True, False)


def _backoffs(retries: int):
    delay = FIRST_BACKOFF_S
    for _ in range(retries):
        yield delay
        delay = min(delay * 2, MAX_BACKOFF_S)


def wait_ready(url: str, probe: Callable[[], Probe], retries: int) -> None:
    """Probe until ready; after `retries` failed retries (exponential backoff) raise ServerUnavailableError."""
    started = time.monotonic()
    result = probe()
    for delay in _backoffs(retries):
        if result.ready or not result.retry:
            break
        time.sleep(delay)
        result = probe()
    _raise_unless_ready(url, result, retries, started)


async def async_wait_ready(url: str, probe: Callable[[], Awaitable[Probe]], retries: int) -> None:
    started = time.monotonic()
    result = await probe()
    for delay in _backoffs(retries):
        if result.ready or not result.retry:
            break
        await asyncio.sleep(delay)
        result = await probe()
    _raise_unless_ready(url, result, retries, started)


def _raise_unless_ready(url: str, result: Probe, retries: int, started: float) -> None:
    if result.ready:
        return
    if not result.retry:
        raise ServerUnavailableError(url, result.reason)
    raise ServerUnavailableError(
        url, f"{result.reason} (gave up after {retries + 1} attempt(s) in {time.monotonic() - started:.1f} s); "
             "start the server (kvtriton serve), check the URL and protocol, or allow more connect retries")
