"""StopStringMatcher: stop strings split across deltas are caught and never streamed."""

import random

import pytest

from kvtriton.backend.engine.stop_strings import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    StopStringMatcher,
    check_stop_strings,
)


def run(stop, deltas):
    """(everything streamed, stopped) for one sequence, flushing if no stop string matched."""
    matcher = StopStringMatcher(stop)
    out = []
    for delta in deltas:
        text, stopped = matcher.feed(delta)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_split_across_three_deltas():
    matcher = StopStringMatcher(["<|end|>"])
    assert matcher.feed("Paris.<|") == ("Paris.", False)
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("d|> ignored") == ("", True)
    assert matcher.matched == "<|end|>"
    assert matcher.flush() == ""


def test_include_stop_ends_the_text_with_the_stop_string_and_nothing_after():
    matcher = StopStringMatcher(["<|end|>", "\n\n"], include_stop=True)
    assert matcher.feed("Paris.<|") == ("Paris.", False)  # still held back: it may be a stop string
    assert matcher.feed("end|> ignored") == ("<|end|>", True)
    matcher = StopStringMatcher(["\n\n"], include_stop=True)
    assert matcher.feed("a\n\nb") == ("a\n\n", True)


def test_false_prefix_is_released_once_disproved():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("a ST") == ("a ", False)
    assert matcher.feed("O") == ("", False)
    assert matcher.feed("RM") == ("STORM", False)


def test_held_text_is_released_by_flush():
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.feed("last line\n") == ("last line", False)
    assert matcher.flush() == "\n"
    assert matcher.flush() == ""


def test_stop_at_the_very_start():
    assert StopStringMatcher(["###"]).feed("### and more") == ("", True)
    assert run(["###"], ["#", "#", "#"]) == ("", True)


def test_overlapping_candidates():
    # "aab" inside "aaab": the first 'a' is released, the rest is the stop string.
    assert run(["aab"], ["a", "a", "a", "b", "tail"]) == ("a", True)
    # The held suffix restarts inside a failed candidate: "abab" after "ab" + "abab".
    assert run(["abab"], ["ab", "a", "c", "ab", "ab"]) == ("abac", True)
    assert run(["abc"], ["xab", "ab", "c"]) == ("xab", True)


def test_multiple_stop_strings_the_first_complete_wins():
    matcher = StopStringMatcher(["world", "lo w", "\n"])
    assert matcher.feed("hello wor") == ("hel", True)
    assert matcher.matched == "lo w"
    # A stop string inside a longer one ends first; of two ending together, the longer wins.
    assert run(["abcd", "bc"], ["abcd"]) == ("a", True)
    matcher = StopStringMatcher(["c", "abc"])
    assert matcher.feed("xabc") == ("x", True) and matcher.matched == "abc"
    # The longest possible prefix of any stop string is held back.
    matcher = StopStringMatcher(["xyz", "yz!"])
    assert matcher.feed("axy") == ("a", False)
    assert matcher.feed("z") == ("", True)
    assert matcher.matched == "xyz"


def test_no_stop_strings_pass_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything <|end|>") == ("anything <|end|>", False)
    assert matcher.feed("") == ("", False)
    assert matcher.flush() == ""


@pytest.mark.parametrize("seed", range(20))
def test_random_splits_match_a_whole_text_search(seed):
    rng = random.Random(seed)
    alphabet = "ab <|>\n中😀"
    stops = [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
    ]
    text = "".join(rng.choice(alphabet) for _ in range(300))
    # The first stop string complete in the text (earliest end; the longer of two ending together).
    hits = [(i + len(s), -len(s)) for s in stops if (i := text.find(s)) >= 0]
    end, minus_len = min(hits, default=(None, None))
    expected = (text[: end + minus_len], True) if hits else (text, False)
    cuts = sorted(rng.sample(range(1, len(text)), 60))
    deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    assert run(stops, deltas) == expected


def test_held_text_stays_short():
    matcher = StopStringMatcher(["</answer>"])
    streamed = 0
    for _ in range(1000):
        text, _ = matcher.feed("<</answe")  # every delta is a near miss
        streamed += len(text)
    assert streamed + len(matcher.flush()) == 8000
    assert streamed >= 8000 - len("</answer>")


def test_invalid_stop_lists_are_rejected():
    with pytest.raises(TypeError, match="list of strings"):
        StopStringMatcher("stop")
    with pytest.raises(ValueError, match=r"stop\[1\] must be a non-empty string"):
        StopStringMatcher(["ok", ""])
    with pytest.raises(ValueError, match=r"stop\[0\]"):
        StopStringMatcher([3])
    matcher = StopStringMatcher(["x"])
    matcher.feed("x")
    with pytest.raises(RuntimeError, match="after a stop string"):
        matcher.feed("more")


def test_limits_are_checked_with_messages_naming_them():
    check_stop_strings(["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS)  # at the limits: fine
    with pytest.raises(ValueError, match=rf"stop must hold at most {MAX_STOP_STRINGS} strings, got 17"):
        check_stop_strings(["x"] * (MAX_STOP_STRINGS + 1))
    too_long = rf"stop\[1\] must be at most {MAX_STOP_STRING_CHARS} characters long, got 257"
    with pytest.raises(ValueError, match=too_long):
        check_stop_strings(["ok", "x" * (MAX_STOP_STRING_CHARS + 1)])


def test_work_per_character_does_not_grow_with_the_output():
    """The worst case for a naive matcher: long stop strings whose every prefix keeps matching. Work is
    counted, not timed (a timed test fails on a busy machine): the automata's failure-link lookups."""

    class CountingList(list):
        lookups = 0

        def __getitem__(self, i):
            CountingList.lookups += 1
            return super().__getitem__(i)

    near = "a" * (MAX_STOP_STRING_CHARS - 2)
    matcher = StopStringMatcher([near + "ab", near + "c"])
    for automaton in matcher._automata:
        automaton.fail = CountingList(automaton.fail)

    def lookups_for(n):
        CountingList.lookups = 0
        for _ in range(n):
            assert not matcher.feed("a")[1]
        return CountingList.lookups

    lookups_for(1000)  # the held window is full from here on
    small, large = lookups_for(2000), lookups_for(8000)
    # KMP: amortized O(1) lookups a character and automaton, whatever the stop strings' length.
    assert large <= 4 * small + 2 * len(matcher._automata) and large <= 2 * 8000 * len(matcher._automata)
    assert len(matcher._held) == MAX_STOP_STRING_CHARS - 1  # the window stays bounded
    assert matcher.feed("b") == ("", True) and matcher.matched == near + "ab"
