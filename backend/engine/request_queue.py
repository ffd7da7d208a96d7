"""The scheduler's waiting queue, in the order its sequences are admitted: FCFS or by priority.

vLLM's two scheduling policies (`--scheduling-policy`):
- fcfs: arrival order. A preempted sequence goes back to the front: it arrived
  before every sequence still waiting.
- priority: a request's `priority` first (lower runs sooner, as in vLLM; 0 by
  default, negative allowed), then arrival. A preempted sequence goes back to
  its place by that key, which with equal priorities is again the front.
Both hand the scheduler the same interface, so admission reads the same under
either: peek at the head, pop it, never skip ahead of it.
"""

from __future__ import annotations

import bisect
from collections import deque
from typing import Iterator

from kvtriton.backend.engine.sequence import Sequence


def priority_key(seq: Sequence) -> tuple[int, float]:
    """The priority policy's order, for the waiting queue and the running list alike."""
    return seq.params.priority, seq.arrival_time


class FCFSQueue:
    def __init__(self) -> None:
        self._seqs: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        """A new arrival: last."""
        self._seqs.append(seq)

    def requeue(self, seq: Sequence) -> None:
        """A preempted sequence: first."""
        self._seqs.appendleft(seq)

    def peek(self) -> Sequence:
        return self._seqs[0]

    def pop(self) -> Sequence:
        return self._seqs.popleft()

    def remove(self, seq: Sequence) -> None:
        self._seqs.remove(seq)

    def __len__(self) -> int:
        return len(self._seqs)

    def __iter__(self) -> Iterator[Sequence]:
        return iter(self._seqs)

    def __contains__(self, seq: object) -> bool:
        return seq in self._seqs


class PriorityQueue(FCFSQueue):
    """Kept sorted by priority_key (a list: queues are hundreds long at most, and insertion is one bisect)."""

    def __init__(self) -> None:
        self._seqs: list[Sequence] = []  # type: ignore[assignment]

    def add(self, seq: Sequence) -> None:
        bisect.insort_right(self._seqs, seq, key=priority_key)

    requeue = add

    def pop(self) -> Sequence:
        return self._seqs.pop(0)


def waiting_queue(policy: str) -> FCFSQueue:
    """policy: one of config.SCHEDULING_POLICIES (EngineConfig checked it)."""
    return {"fcfs": FCFSQueue, "priority": PriorityQueue}[policy]()
