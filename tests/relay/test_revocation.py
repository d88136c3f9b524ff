"""Tests for burrow.relay.revocation: the revoked-tokens file, read again when it changes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from burrow.exception import InvalidError
from burrow.relay.revocation import RevocationList


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def test_the_file_is_read_at_once(tmp_path: Path) -> None:
    path = tmp_path / "revoked"
    write(path, "aaa  # alice's laptop\n\n# a comment line\nbbb\n")
    revoked = RevocationList(path)
    assert revoked.ids == {"aaa", "bbb"}
    assert "aaa" in revoked and "ccc" not in revoked


def test_a_missing_file_is_an_error_at_start(tmp_path: Path) -> None:
    with pytest.raises(InvalidError, match="cannot read the revoked-tokens file"):
        RevocationList(tmp_path / "nothing-here")


def test_refresh_returns_only_newly_revoked_ids(tmp_path: Path) -> None:
    path = tmp_path / "revoked"
    write(path, "aaa\n")
    revoked = RevocationList(path)
    assert revoked.refresh() == frozenset()  # unchanged: not even read
    with path.open("a") as f:
        f.write("bbb\n")
    assert revoked.refresh() == {"bbb"}
    assert revoked.ids == {"aaa", "bbb"}
    assert revoked.refresh() == frozenset()


def test_an_id_taken_off_the_list_is_accepted_again(tmp_path: Path) -> None:
    path = tmp_path / "revoked"
    write(path, "aaa\nbbb\n")
    revoked = RevocationList(path)
    write(path, "aaa\n")
    assert revoked.refresh() == frozenset()
    assert "bbb" not in revoked


def test_a_file_replaced_by_rename_is_seen(tmp_path: Path) -> None:
    # Editors and config tools write a new file and rename it over the old
    # one: same size and maybe the same mtime tick, but a new inode.
    path = tmp_path / "revoked"
    write(path, "aaa\n")
    revoked = RevocationList(path)
    stat = os.stat(path)
    new = tmp_path / "revoked.new"
    write(new, "ccc\n")
    os.utime(new, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(new, path)
    assert revoked.refresh() == {"ccc"}


def test_a_file_that_goes_away_keeps_the_last_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="burrow.relay")
    path = tmp_path / "revoked"
    write(path, "aaa\n")
    revoked = RevocationList(path)
    path.unlink()
    assert revoked.refresh() == frozenset()
    assert revoked.refresh() == frozenset()
    assert "aaa" in revoked
    gone = [r for r in caplog.records if "cannot be read" in r.getMessage()]
    assert len(gone) == 1 and gone[0].levelno == logging.WARNING  # logged once, not per look
    write(path, "aaa\nbbb\n")
    assert revoked.refresh() == {"bbb"}
    assert any("can be read again" in r.getMessage() for r in caplog.records)
