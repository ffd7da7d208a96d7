"""Load generator: drives an AsyncLLMClient and records every request's timeline.

Two load shapes, as in vLLM's and Triton's benchmarks:
- closed loop: `concurrency` requests always in flight (a new one starts when one ends);
- open loop: Poisson arrivals at `request_rate` requests/s (inf: all at once),
  however many are then in flight.
Records are raw (times, token counts, inter-token gaps); bench_report turns them
into statistics, the same way for every source (see crosscheck).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from kvtriton.client.api import AsyncLLMClient, user_turn
from kvtriton.client.errors import LLMClientError
from kvtriton.client.prompts import BenchPrompt
from kvtriton.client.types import CompletionBuilder


@dataclass(frozen=True)
class LoadPoint:
    """One point of a sweep: exactly one of concurrency and request_rate."""

    concurrency: int | None = None
    request_rate: float | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("a load point has exactly one of concurrency and request_rate")
        if self.concurrency is not None and not (isinstance(self.concurrency, int) and self.concurrency >= 1):
            raise ValueError(f"concurrency must be an integer >= 1, got {self.concurrency!r}")
        if self.request_rate is not None and not self.request_rate > 0:
            raise ValueError(f"request rate must be > 0 requests/s (inf: all at once), got {self.request_rate!r}")

    @property
    def label(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency is not None else f"rate {self.request_rate:g}/s"

    def to_dict(self) -> dict[str, Any]:
        rate = self.request_rate
        return {"concurrency": self.concurrency, "request_rate": "inf" if rate == math.inf else rate}


@dataclass
class RequestRecord:
    """One request's timeline; times are time.perf_counter() seconds."""

    start: float
    end: float
    first_token: float | None = None
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)  # one entry per token after the first
    error: str | None = None

    @classmethod
    def from_chunks(cls, start: float, end: float, chunk_times: Sequence[float], chunk_tokens: Sequence[int],
                    num_input_tokens: int, error: str | None = None) -> "RequestRecord":
        # A response may carry k > 1 tokens (the server coalesces); the gap before it is
        # spread evenly over them, so the mean ITL stays the time per output token.
        itl = []
        for i in range(1, len(chunk_times)):
            k = chunk_tokens[i]
            itl += [(chunk_times[i] - chunk_times[i - 1]) / k] * k
        return cls(start, end, chunk_times[0] if chunk_times else None, num_input_tokens, sum(chunk_tokens), itl,
                   error)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class PointRun:
    point: LoadPoint
    records: list[RequestRecord]


async def run_request(client: AsyncLLMClient, prompt: BenchPrompt, sampling: dict[str, Any],
                      raw: bool = True) -> RequestRecord:
    """One streamed request; `raw` False sends the prompt as one user message (the model's chat template)."""
    start = time.perf_counter()
    stream = client.stream(**user_turn(prompt.text, raw), **{**sampling, "max_tokens": prompt.max_tokens})
    error = None
    try:
        async with stream:
            async for _ in stream:
                pass
    except LLMClientError as e:
        error = f"{type(e).__name__}: {e}"
    end = time.perf_counter()
    b: CompletionBuilder | None = stream.builder
    if b is None:
        return RequestRecord(start, end, error=error)
    return RequestRecord.from_chunks(b.sent_at, b.last_at or end, b.chunk_times, b.chunk_tokens,
                                     b.num_input_tokens, error)


async def run_point(client: AsyncLLMClient, prompts: Sequence[BenchPrompt], point: LoadPoint,
                    sampling: dict[str, Any], seed: int = 0,
                    on_done: Callable[[RequestRecord], None] | None = None, raw: bool = True) -> PointRun:
    """Send every prompt under `point`'s load; records in completion order. `raw`: as run_request's."""
    records: list[RequestRecord] = []

    async def one(prompt: BenchPrompt) -> None:
        record = await run_request(client, prompt, sampling, raw)
        records.append(record)
        if on_done is not None:
            on_done(record)

    if point.concurrency is not None:
        pending = iter(prompts)  # shared by the workers; next() never awaits, so no two take the same

        async def worker() -> None:
            for prompt in pending:
                await one(prompt)

        await asyncio.gather(*(worker() for _ in range(min(point.concurrency, len(prompts)))))
    else:
        rng = random.Random(seed)
        tasks = []
        for i, prompt in enumerate(prompts):
            tasks.append(asyncio.create_task(one(prompt)))
            if point.request_rate != math.inf and i + 1 < len(prompts):
                await asyncio.sleep(rng.expovariate(point.request_rate))
        await asyncio.gather(*tasks)
    return PointRun(point, records)
