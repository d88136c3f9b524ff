"""``burrow fleet sign|verify`` (burrow.fleetcli), run in process as an operator runs them."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from burrow import fleet, tokens
from burrow.fleetcli import fleet as fleet_command

RELAYS = """
[[relay]]
name = "r1"
address = "r1.example.com:443"
region = "eu-west"

[[relay]]
name = "r2"
address = "r2.example.com:443"
weight = 3
"""


@pytest.fixture
def operator(tmp_path: Path) -> Path:
    """A directory with a key pair, relays.toml and a revocation list."""
    key = tokens.generate_signing_key()
    tokens.write_signing_key(key, tmp_path / "signing.pem")
    tokens.write_public_key(key, tmp_path / "public.pem")
    (tmp_path / "relays.toml").write_text(RELAYS)
    tokens.append_revocation(tmp_path / "revoked", "gone-1", "alice")
    return tmp_path


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(fleet_command, list(args))
    return result.exit_code, result.output


def sign(operator: Path, *extra: str) -> tuple[int, str]:
    return run(
        "sign",
        *("--key", str(operator / "signing.pem"), "--serial", "3"),
        *("--relays", str(operator / "relays.toml"), "--out", str(operator / "fleet.jws")),
        *extra,
    )


def test_sign_then_verify(operator: Path) -> None:
    code, out = sign(operator, "--revoked-tokens", str(operator / "revoked"), "--expires", "1d")
    assert code == 0, out
    assert out.startswith("fleet document 3 (2 relays, 1 revoked tokens, expires ")
    document = operator / "fleet.jws"
    assert stat.S_IMODE(document.stat().st_mode) == 0o644
    assert not list(operator.glob(".fleet.jws.*"))  # written whole, by rename
    code, out = run("verify", "--token-key", str(operator / "public.pem"), str(document))
    assert code == 0, out
    kid = tokens.key_id(tokens.read_signing_key(operator / "signing.pem"))
    lines = out.splitlines()
    assert lines[:2] == ["serial: 3", f"key: {kid}"]
    assert lines[4:] == [
        "relays: 2",
        "  r1 r1.example.com:443 region=eu-west weight=1",
        "  r2 r2.example.com:443 weight=3",
        "revoked: 1",
        "  gone-1",
    ]
    checked = fleet.verify(document.read_text(), tokens.read_public_key(operator / "public.pem"))
    assert checked.expires - checked.issued == 86400


def test_sign_checks_the_kid_and_wants_an_expiry(operator: Path) -> None:
    kid = tokens.key_id(tokens.read_signing_key(operator / "signing.pem"))
    assert sign(operator, "--kid", kid)[0] == 0
    code, out = sign(operator, "--kid", "0123456789abcdef")
    assert code == 1 and f"is not the id of {operator / 'signing.pem'} ({kid})" in out
    code, out = sign(operator, "--expires", "never")
    assert code == 1 and "a fleet document must expire" in out


def test_sign_refuses_a_bad_relays_file(operator: Path) -> None:
    (operator / "relays.toml").write_text('[[relay]]\nname = "r1"\naddress = "r1.example.com"\n')
    code, out = sign(operator)
    assert code == 1 and "has no port (host:port)" in out
    assert not (operator / "fleet.jws").exists()


def test_verify_refuses_with_the_reason(operator: Path) -> None:
    assert sign(operator)[0] == 0
    other = tokens.generate_signing_key()
    tokens.write_public_key(other, operator / "other.pem")
    code, out = run(
        "verify", "--token-key", str(operator / "other.pem"), str(operator / "fleet.jws")
    )
    assert code == 1 and "which this relay does not hold" in out
    # Both keys, as a relay in a rotation holds them: fine.
    code, out = run(
        "verify",
        *("--token-key", str(operator / "other.pem"), "--token-key", str(operator / "public.pem")),
        str(operator / "fleet.jws"),
    )
    assert code == 0, out
    (operator / "fleet.jws").write_text("garbage")
    code, out = run(
        "verify", "--token-key", str(operator / "public.pem"), str(operator / "fleet.jws")
    )
    assert code == 1 and "fleet document is malformed" in out
