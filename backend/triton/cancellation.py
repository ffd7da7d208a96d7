"""CancellationWatcher: the in-flight requests' response senders, and the aborts of those whose client cancelled.

The engine knows nothing of Triton, so the adapter asks each sender
`is_cancelled()` and calls `engine.abort(request_id)`, which frees the
request's KV blocks at the next step and ends its stream with 'abort'.

Threads: `watch` runs on Triton's execute() thread, `forget` on the engine
thread (a sink's final output), `poll` on the ResponseOutbox thread between
sends. One lock guards the registry; the senders are asked outside it, since
every ask is an IPC round trip. Because polls and sends share the outbox
thread and a request is forgotten before its final response is enqueued, a
sender is never asked after its final response went out.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger("kvtriton")


class CancellationWatcher:
    # Floor on the poll interval: 0 ("as often as possible") must not turn the poller into a spin.
    MIN_INTERVAL_S = 0.005
    # Between polls with no response sent meanwhile (the engine made no visible progress: a long step, a queue
    # that does not move), the watcher still polls this often.
    IDLE_INTERVAL_S = 0.5
    # The pause after a poll is at least this many times the poll's own duration, so that polling takes at most
    # a fifth of the response thread whatever the number of requests (each is a round trip).
    PAUSE_PER_POLL_TIME = 4.0

    def __init__(self, abort: Callable[[str], None], interval_s: float):
        self.interval_s = max(interval_s, self.MIN_INTERVAL_S)
        self._abort = abort
        self._senders: dict[str, Any] = {}  # request_id -> response sender
        self._lock = threading.Lock()
        self._last_poll = float("-inf")  # when the last poll ended
        self._poll_duration = 0.0
        self._sent_since_poll = False

    def watch(self, request_id: str, sender: Any) -> None:
        """Before the request reaches the engine, so that its final output always finds it here."""
        with self._lock:
            self._senders[request_id] = sender

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._senders.pop(request_id, None)

    def __contains__(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._senders

    def __len__(self) -> int:
        with self._lock:
            return len(self._senders)

    def poll_if_due(self, sent: bool = True) -> None:
        """Poll if the pause since the last poll has passed (the interval, and PAUSE_PER_POLL_TIME times that
        poll's duration) and a response went out meanwhile (`sent`: one just did), or if IDLE_INTERVAL_S has
        passed. An abort takes effect at the engine's next step, so polls faster than the engine steps buy
        nothing, and each asks every request, a round trip each: on a 2-core CPU, where a 32-request step
        takes ~0.3 s, a poll every 5 ms took a third of the cores (benchmarks/serving_bench.py, 32 gRPC
        streams: 0.75 of the engine in-process, against 0.93-0.98 polling every 0.25 s)."""
        self._sent_since_poll |= sent
        now = time.monotonic()
        since = now - self._last_poll
        if since >= max(self.interval_s, self.PAUSE_PER_POLL_TIME * self._poll_duration) and (
                self._sent_since_poll or since >= self.IDLE_INTERVAL_S):
            self._sent_since_poll = False
            self.poll()
            self._last_poll = time.monotonic()
            self._poll_duration = self._last_poll - now

    def poll(self) -> None:
        """Abort every watched request whose client cancelled; each is aborted once, then forgotten."""
        with self._lock:
            watched = list(self._senders.items())
        for request_id, sender in watched:
            try:
                cancelled = sender.is_cancelled()
            except Exception:  # one broken connection must not stop the others' checks
                log.exception("could not ask request %s whether it was cancelled", request_id)
                continue
            if cancelled:
                self.forget(request_id)
                self._abort(request_id)
