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

    def __init__(self, abort: Callable[[str], None], interval_s: float):
        self.interval_s = max(interval_s, self.MIN_INTERVAL_S)
        self._abort = abort
        self._senders: dict[str, Any] = {}  # request_id -> response sender
        self._lock = threading.Lock()
        self._last_poll = float("-inf")
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
        """Poll if the interval has passed and a response went out since the last poll (`sent`: one just did),
        or if IDLE_INTERVAL_S has passed. An abort takes effect at the engine's next step, so polls faster than
        the engine steps buy nothing, and each is an IPC round trip per request: on a 2-core CPU, where a
        32-request step takes ~0.3 s, polling all of them every 5 ms took a third of the cores and cut the
        server's output from 0.98 to 0.75 of the engine's in-process (benchmarks/serving_bench.py)."""
        self._sent_since_poll |= sent
        now = time.monotonic()
        since = now - self._last_poll
        if since >= self.interval_s and (self._sent_since_poll or since >= self.IDLE_INTERVAL_S):
            self._last_poll, self._sent_since_poll = now, False
            self.poll()

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
