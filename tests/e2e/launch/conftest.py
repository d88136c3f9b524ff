"""Fixtures of the launcher tests: a ``burrow dev`` per module, ``burrow launch`` per test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from devrelay import DevRelay, dev_relay
from launchers import Launched, LaunchFactory, launched


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevRelay]:
    """One ``burrow dev`` for the module's launchers."""
    with dev_relay(tmp_path_factory.mktemp("dev")) as running:
        yield running


@pytest.fixture
def launch(relay: DevRelay, tmp_path: Path) -> LaunchFactory:
    """``launch("shell", "--max-shells", "1")``: a context manager running ``burrow launch``."""
    count = 0

    def start(*args: str, cwd: Path | None = None) -> AbstractContextManager[Launched]:
        nonlocal count
        count += 1
        return launched(relay, tmp_path / f"launch-{count}", args, cwd)

    return start
