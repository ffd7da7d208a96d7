"""What the tests of an engine's death share: how a dead engine looks to its callers."""

from __future__ import annotations

import pytest

from kvtriton.backend.engine.llm_engine import EngineDeadError
from kvtriton.backend.engine.sampling_params import SamplingParams


def assert_engine_dead(engine, last_outputs, error: str) -> None:
    """`engine` (an LLMEngine or EngineProcess) has died: each of its requests in flight ended (its last output
    in `last_outputs`) with an error that says `error`, it reports unhealthy, and it refuses a new request at once
    rather than queueing it for no one."""
    for last in last_outputs:
        assert last.finish_reason == "error" and error in last.error, (last.finish_reason, last.error)
    assert not engine.is_healthy()
    with pytest.raises(EngineDeadError):
        engine.add_request("after", "hello", SamplingParams(max_tokens=1))
