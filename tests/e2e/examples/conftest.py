"""Fixtures for the tests of ``examples/``: a ``burrow dev`` relay and example processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from devrelay import DevRelay, dev_relay
from examplerun import Example, StartExample


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevRelay]:
    """A ``burrow dev`` process for the module's examples."""
    with dev_relay(tmp_path_factory.mktemp("dev")) as relay:
        yield relay


@pytest.fixture
def start_example(tmp_path: Path) -> Iterator[StartExample]:
    """``start_example(argv, env=..., cwd=...)``: an :class:`Example`, stopped after the test."""
    started: list[Example] = []

    def start(argv: list[str], *, env: dict[str, str], cwd: Path) -> Example:
        example = Example(argv, env, cwd, tmp_path / f"example-{len(started)}.stderr")
        started.append(example)
        return example

    yield start
    for example in started:
        example.stop()
