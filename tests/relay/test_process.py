"""Tests for burrow.relay.process: the parts of a relay's process life that need no listener."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from burrow.exception import InvalidError
from burrow.relay import process
from burrow.relay.config import RelayConfig


@pytest.fixture
def unraisable() -> Iterator[list[Any]]:
    """sys.unraisablehook replaced by one that records, restored afterwards."""
    seen: list[Any] = []
    saved = sys.unraisablehook
    sys.unraisablehook = seen.append
    yield seen
    sys.unraisablehook = saved


def test_bad_server_names_are_logged_not_printed(
    unraisable: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="burrow.relay")
    process.quiet_bad_server_names()
    process.quiet_bad_server_names()  # twice is once: the hook does not wrap itself
    bad_name = SimpleNamespace(exc_value=UnicodeDecodeError("ascii", b"\xff", 0, 1, "no"))
    other = SimpleNamespace(exc_value=ValueError("something else"))
    sys.unraisablehook(bad_name)  # type: ignore[arg-type]
    sys.unraisablehook(other)  # type: ignore[arg-type]
    assert unraisable == [other]
    assert [r.getMessage() for r in caplog.records] == [
        "refused a TLS server name that is not ASCII"
    ]


def test_run_returns_what_main_returns() -> None:
    async def main() -> int:
        return 42

    assert process.run(main) == 42


def test_a_relay_thread_that_cannot_start_raises_and_leaves_no_thread(tmp_path: Path) -> None:
    config = RelayConfig(
        domain="r1.localhost",
        cert=tmp_path / "missing-cert.pem",
        key=tmp_path / "missing-key.pem",
        public_key=tmp_path / "missing-token-public.pem",
        listen=(("127.0.0.1", 0),),
    )
    before = threading.active_count()
    relay_thread = process.RelayThread(config, name="test-relay-thread")
    with pytest.raises(InvalidError, match=r"missing-token-public\.pem"):
        relay_thread.start()
    assert threading.active_count() == before
    assert relay_thread.loop.is_closed()
