"""Fixtures shared by burrow's tests: a real relay on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import RelayHarness, run_relay


@pytest.fixture(scope="session")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayHarness]:
    """One relay shared by the tests that only need a working relay."""
    with run_relay(tmp_path_factory.mktemp("relay")) as harness:
        yield harness


@pytest.fixture
def own_relay(tmp_path: Path) -> Iterator[RelayHarness]:
    """A relay of the test's own, for tests that stop it or look at its state."""
    with run_relay(tmp_path / "relay") as harness:
        yield harness
