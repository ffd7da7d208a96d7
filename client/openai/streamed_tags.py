"""Tags in text that streams in deltas: a delta may end inside one ("<tool_", "</thi"), so a parser holds
that tail back until the next delta says whether it is the tag."""

from __future__ import annotations


def held_back(text: str, tag: str) -> int:
    """How many characters at the end of `text` may be the start of `tag`."""
    return next((n for n in range(min(len(tag) - 1, len(text)), 0, -1) if tag.startswith(text[-n:])), 0)
