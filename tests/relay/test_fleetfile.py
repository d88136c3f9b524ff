"""Tests for burrow.relay.fleetfile: the relay's fleet document, re-read when it changes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from burrow import fleet, tokens
from burrow.exception import InvalidError
from burrow.fleet import FleetRelay
from burrow.relay.fleetfile import FleetFile

KEY = tokens.generate_signing_key()
KEYS = tokens.KeyRing.of([KEY.public_key()])
NOW = 1_800_000_000
RELAYS = (FleetRelay("r1", "r1.example.com:443"), FleetRelay("r2", "r2.example.com:443"))


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


def document(serial: int, revoked: tuple[str, ...] = (), expires: int = NOW + 3600) -> str:
    return fleet.sign(KEY, serial=serial, expires=expires, relays=RELAYS, revoked=revoked, now=NOW)


def write(path: Path, text: str) -> None:
    # As `burrow fleet sign` does: a new file renamed over the old.
    new = path.with_name(path.name + ".new")
    new.write_text(text + "\n")
    os.replace(new, path)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.jws"
    write(path, document(5, ("aaa",)))
    return path


def test_the_document_is_read_at_start(path: Path) -> None:
    held = FleetFile(path, KEYS, clock=Clock())
    assert held.fleet.serial == 5
    assert "aaa" in held and "bbb" not in held
    assert held.revoked == {"aaa"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("garbage", "is refused: fleet document is malformed"),
        (document(1, expires=NOW - 1), "is refused: fleet document 1 expired at"),
        (
            fleet.sign(tokens.generate_signing_key(), serial=1, expires=NOW + 9, relays=RELAYS),
            "which this relay does not hold",
        ),
    ],
)
def test_a_bad_document_is_an_error_at_start(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fleet.jws"
    write(path, text)
    with pytest.raises(InvalidError, match=message):
        FleetFile(path, KEYS, clock=Clock())


def test_a_missing_document_is_an_error_at_start(tmp_path: Path) -> None:
    with pytest.raises(InvalidError, match="cannot read the fleet document"):
        FleetFile(tmp_path / "nothing-here", KEYS)


def test_a_newer_document_is_taken_and_says_what_it_revokes(path: Path) -> None:
    held = FleetFile(path, KEYS, clock=Clock())
    assert held.refresh() == frozenset()  # unchanged: not even read
    write(path, document(6, ("aaa", "bbb", "ccc")))
    assert held.refresh() == {"bbb", "ccc"}
    assert held.fleet.serial == 6 and "ccc" in held
    assert held.refresh() == frozenset()
    # An id taken off the list is accepted again.
    write(path, document(7, ("ccc",)))
    assert held.refresh() == frozenset()
    assert "aaa" not in held and "ccc" in held


def test_the_same_document_written_again_is_nothing_new(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held = FleetFile(path, KEYS, clock=Clock())
    write(path, path.read_text())
    assert held.refresh() == frozenset()
    assert warnings(caplog) == []


BAD_DOCUMENTS = {
    "garbage": ("\x00\xff garbage", "refused (fleet document is malformed"),
    "truncated": (document(9, ("zzz",))[:-20], "refused (fleet document"),
    "huge": ("a." * (fleet.MAX_FLEET_SIZE), "refused (fleet document is not a string of at most"),
    "wrongly signed": (
        fleet.sign(tokens.generate_signing_key(), serial=9, expires=NOW + 9, relays=RELAYS),
        "which this relay does not hold",
    ),
    "older serial": (document(4, ("zzz",)), "refused: serial 4 is not newer than the one in force"),
    "same serial": (document(5, ("zzz",)), "refused: serial 5 is not newer than the one in force"),
    "expired": (document(9, ("zzz",), expires=NOW - 1), "refused (fleet document 9 expired at"),
}


@pytest.mark.parametrize("case", BAD_DOCUMENTS, ids=list(BAD_DOCUMENTS))
def test_a_bad_document_is_refused_once_and_the_last_good_one_stays(
    path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    text, message = BAD_DOCUMENTS[case]
    held = FleetFile(path, KEYS, clock=Clock())
    caplog.set_level(logging.INFO, logger="burrow.relay")
    write(path, text)
    for _ in range(3):
        assert held.refresh() == frozenset()
    (warning,) = warnings(caplog)  # one line, not one every check
    assert message in warning and "keeping serial 5" in warning
    assert held.fleet.serial == 5 and "aaa" in held and "zzz" not in held
    assert held.offer(0) == held.text
    # A good one after it is taken.
    write(path, document(10, ("zzz",)))
    assert held.refresh() == {"zzz"}


def test_a_document_that_goes_away_stays_in_force(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    held = FleetFile(path, KEYS, clock=Clock())
    path.unlink()
    assert held.refresh() == frozenset()
    assert held.refresh() == frozenset()
    (warning,) = warnings(caplog)
    assert "cannot be read" in warning and "keeping serial 5" in warning
    assert "aaa" in held


def test_offer_gives_the_document_to_agents_with_an_older_one(path: Path) -> None:
    clock = Clock()
    held = FleetFile(path, KEYS, clock=clock)
    assert held.text == path.read_text().strip()
    assert held.offer(None) is None  # an agent that takes no documents
    assert held.offer(0) == held.text
    assert held.offer(4) == held.text
    assert held.offer(5) is None
    assert held.offer(6) is None


def test_an_expired_document_keeps_its_revocations_but_is_not_handed_out(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    held = FleetFile(path, KEYS, clock=clock)
    clock.now = NOW + 3600
    held.refresh()
    held.refresh()
    (warning,) = warnings(caplog)
    assert "serial 5 has expired; its revocations stay in force" in warning
    assert "aaa" in held
    assert held.offer(0) is None
    write(path, document(6, ("aaa",), expires=NOW + 7200))
    held.refresh()
    assert held.offer(0) == held.text
