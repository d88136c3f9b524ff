"""Tests for burrow.wire.text: peer-supplied strings made safe for one log line."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from burrow.wire.text import MAX_LOGGED, loggable


def test_printable_text_is_left_alone() -> None:
    assert loggable("burrow/0.1.0 (café)") == "burrow/0.1.0 (café)"


def test_line_breaks_and_escapes_cannot_forge_a_line() -> None:
    forged = "burrow/1\n2026-12-01 12:00:00 WARNING burrow.relay: session x for admin\r"
    assert loggable(forged) == (
        "burrow/1\\n2026-12-01 12:00:00 WARNING burrow.relay: session x for admin\\r"
    )
    assert loggable("\x1b[2J\x00\u2028\u202e") == "\\x1b[2J\\x00\\u2028\\u202e"


def test_a_backslash_is_escaped_so_the_escapes_stay_unambiguous() -> None:
    assert loggable("a\\nb") == "a\\\\nb"
    assert loggable("a\\nb") != loggable("a\nb")


def test_long_text_is_cut_and_says_so() -> None:
    assert loggable("x" * 1000) == "x" * MAX_LOGGED + "...(800 more)"
    assert loggable("x" * 10, limit=4) == "xxxx...(6 more)"
    assert loggable("\n" * 10, limit=4) == "\\n\\n...(8 more)"


def test_anything_else_is_shown_as_its_str() -> None:
    assert loggable(None) == "None"
    assert loggable(OSError(5, "a\nb")) == "[Errno 5] a\\nb"


@given(st.text())
def test_the_result_is_always_one_short_printable_line(text: str) -> None:
    out = loggable(text)
    assert out.isprintable()
    assert len(out) <= MAX_LOGGED + len("...(99999999 more)")
