"""Fixtures shared by burrow's tests: a real relay on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import RelayHarness, run_relay


@pytest.fixture(scope="session", autouse=True)
def _no_dev_relay_of_the_user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Keep a `burrow dev` the developer runs on this machine out of the tests' settings."""
    saved = os.environ.get("BURROW_STATE_DIR")
    os.environ["BURROW_STATE_DIR"] = str(tmp_path_factory.mktemp("no-dev-relay"))
    for name in ("BURROW_RELAY", "BURROW_TOKEN", "BURROW_CA"):
        os.environ.pop(name, None)
    yield
    if saved is None:
        os.environ.pop("BURROW_STATE_DIR", None)
    else:
        os.environ["BURROW_STATE_DIR"] = saved


@pytest.fixture(scope="session")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayHarness]:
    """One relay shared by the tests that only need a working relay."""
    with run_relay(tmp_path_factory.mktemp("relay")) as harness:
        yield harness


@pytest.fixture(scope="session")
def plain_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayHarness]:
    """A relay that also takes plaintext data connections, and clients that use them."""
    with run_relay(
        tmp_path_factory.mktemp("plain-relay"), plain_data_listen=("127.0.0.1", 0)
    ) as harness:
        yield harness


@pytest.fixture
def own_relay(tmp_path: Path) -> Iterator[RelayHarness]:
    """A relay of the test's own, for tests that stop it or look at its state."""
    with run_relay(tmp_path / "relay") as harness:
        yield harness
