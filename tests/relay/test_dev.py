"""Tests for burrow.relay.dev: what ``burrow dev`` prepares in its state dir and tells clients."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from burrow import tokens
from burrow.relay import dev


def test_prepare_makes_a_loopback_relay_for_r1_localhost(tmp_path: Path) -> None:
    prepared = dev.prepare(tmp_path / "state", 0, (21000, 21999))
    config = prepared.config
    assert config.domain == dev.DEV_DOMAIN == "r1.localhost"
    assert config.listen == (("127.0.0.1", 0), ("::1", 0))
    assert config.tcp_ports == (21000, 21999)
    assert config.plain_data_listen is None
    for path in (config.cert, config.key, config.public_key, prepared.ca):
        assert path.is_file() and path.is_relative_to(tmp_path / "state")
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    # Its token is one the relay it configures accepts.
    grant = tokens.verify(prepared.token, tokens.read_public_key(config.public_key))
    assert grant.subject == "dev"


def test_a_second_prepare_reuses_the_ca_and_keys(tmp_path: Path) -> None:
    first = dev.prepare(tmp_path, 4443, (20000, 29999))
    second = dev.prepare(tmp_path, 4443, (20000, 29999))
    assert first.ca.read_bytes() == second.ca.read_bytes()
    assert first.config.public_key.read_bytes() == second.config.public_key.read_bytes()
    # The first token stays good: a client started earlier keeps working.
    tokens.verify(first.token, tokens.read_public_key(second.config.public_key))


def test_a_lost_public_key_is_written_again_from_the_signing_key(tmp_path: Path) -> None:
    first = dev.prepare(tmp_path, 4443, (20000, 29999))
    first.config.public_key.unlink()
    second = dev.prepare(tmp_path, 4443, (20000, 29999))
    tokens.verify(first.token, tokens.read_public_key(second.config.public_key))


def test_env_tells_clients_the_relay_token_and_ca(tmp_path: Path) -> None:
    prepared = dev.prepare(tmp_path, 0, (20000, 29999))
    assert prepared.env(34567) == {
        "BURROW_RELAY": "r1.localhost:34567",
        "BURROW_TOKEN": prepared.token,
        "BURROW_CA": str(prepared.ca),
    }


def test_plain_data_is_offered_on_loopback_and_told_to_clients(tmp_path: Path) -> None:
    prepared = dev.prepare(tmp_path, 0, (20000, 29999), plain_data=True)
    assert prepared.config.plain_data_listen == ("127.0.0.1", 0)
    assert prepared.env(4443)["BURROW_PLAIN_DATA"] == "1"


def _shared_sticky_dir(tmp_path: Path) -> Path:
    """A directory like /tmp: anyone may create files there, only their owner may remove them."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    return shared


def test_env_file_is_not_written_through_a_file_another_user_made(tmp_path: Path) -> None:
    shared = _shared_sticky_dir(tmp_path)
    target = shared / "burrow.env"
    # Another local user guesses the temporary name and creates it first, to own the result.
    guess = shared / ".burrow.env.tmp"
    guess.write_text("")
    guess.chmod(0o666)
    if os.getuid() == 0:
        os.chown(guess, 65534, 65534)
    dev.write_env_file(target, {"BURROW_TOKEN": "secret-token"})
    info = target.stat()
    assert info.st_uid == os.getuid()
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert "secret-token" in target.read_text()
    assert guess.read_text() == ""


def test_env_file_is_not_written_through_a_symlink(tmp_path: Path) -> None:
    shared = _shared_sticky_dir(tmp_path)
    elsewhere = tmp_path / "victim"
    elsewhere.write_text("untouched\n")
    (shared / ".burrow.env.tmp").symlink_to(elsewhere)
    dev.write_env_file(shared / "burrow.env", {"BURROW_TOKEN": "secret-token"})
    assert elsewhere.read_text() == "untouched\n"
    assert not (shared / "burrow.env").is_symlink()
    assert stat.S_IMODE((shared / "burrow.env").stat().st_mode) == 0o600
