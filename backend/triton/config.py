"""AdapterConfig: the Triton adapter's own knobs, typed and validated at load.

config.pbtxt `parameters` hold both the adapter's keys and the engine's:
`AdapterConfig.from_parameters` takes the adapter's and hands the rest on to
`EngineConfig.from_mapping`, which fails the load on any key neither knows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from kvtriton.backend.config import convert_parameter


@dataclass(frozen=True)
class AdapterConfig:
    # Streamed tokens per response: each response is an IPC round trip to the server, so coalescing
    # tokens keeps large batches from being capped by the sends.
    stream_interval: int = 1
    # How often each in-flight request's sender is asked whether its client cancelled; every ask is an
    # IPC round trip. 0: as often as the poller's floor allows (CancellationWatcher.MIN_INTERVAL_S).
    cancel_poll_interval_s: float = 0.0
    # finalize(): how long in-flight requests may run on before they are aborted.
    shutdown_timeout_s: float = 30.0
    # A failed engine (one broken beyond one step) has answered every request with an error; then the stub
    # process exits so that the failure is visible to a supervisor (kvtriton serve restarts the server).
    exit_on_engine_failure: bool = True
    # Run the engine in a process of its own (EngineProcess): every response send holds the stub's GIL for
    # an IPC round trip, which would otherwise stall the engine loop once per streamed token.
    engine_process: bool = True

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1 (tokens per streamed response), "
                             f"got {self.stream_interval}")
        if self.cancel_poll_interval_s < 0:
            raise ValueError(f"cancel_poll_interval_s must be >= 0 seconds, got {self.cancel_poll_interval_s}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0 seconds, got {self.shutdown_timeout_s}")

    @classmethod
    def from_parameters(cls, values: Mapping[str, str]) -> tuple["AdapterConfig", dict[str, str]]:
        """(the adapter's config, the parameters that are not the adapter's), from string values."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        mine = {key: convert_parameter(key, fields[key].type, raw) for key, raw in values.items() if key in fields}
        rest = {key: raw for key, raw in values.items() if key not in fields}
        return cls(**mine), rest
