"""Reasoning: a thinking model's `<think>...</think>` as `reasoning_content`, apart from the answer's content.

vLLM's `--reasoning-parser` names and rules:
- `deepseek_r1` (DeepSeek-R1 and its Qwen and Llama distills): their chat template opens `<think>` in the
  prompt, so the output is reasoning from its first character (a `<think>` it writes anyway is dropped)
  until `</think>`, and the answer after it; an output that never closes it is all reasoning.
- `qwen3`: thinking is optional, so an output is reasoning only from a leading `<think>` to `</think>`;
  one that does not start with `<think>` is all content.
The split streams: text is sent as it arrives, but for a tail that may be the start of a tag.
"""

from __future__ import annotations

from typing import Literal

from kvtriton.client.openai.streamed_tags import held_back

START, END = "<think>", "</think>"


class ThinkSplit:
    """One choice's output, fed as it arrives, as (reasoning, content) deltas."""

    def __init__(self, opens_in_reasoning: bool) -> None:
        self._opens_in_reasoning = opens_in_reasoning
        self._state: Literal["start", "reasoning", "content"] = "start"
        self._pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        self._pending += text
        reasoning = content = ""
        if self._state == "start":
            head = self._pending.lstrip()
            if not head or (START.startswith(head) and head != START):
                return "", ""  # may still become "<think>"
            if head.startswith(START):
                self._pending, self._state = head[len(START):], "reasoning"
            else:
                self._state = "reasoning" if self._opens_in_reasoning else "content"
        if self._state == "reasoning":
            end = self._pending.find(END)
            if end < 0:
                cut = len(self._pending) - held_back(self._pending, END)
                reasoning, self._pending = self._pending[:cut], self._pending[cut:]
                return reasoning, ""
            reasoning, self._pending, self._state = self._pending[:end], self._pending[end + len(END):], "content"
        content, self._pending = self._pending, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held back: a tail that never became a tag is text of the state it was held in."""
        rest, self._pending = self._pending, ""
        if self._state == "reasoning" or (self._state == "start" and self._opens_in_reasoning):
            return rest, ""
        return "", rest


# `--reasoning-parser` names (vLLM's) -> whether the output opens inside the reasoning.
REASONING_PARSERS = {"deepseek_r1": True, "qwen3": False}
