"""A fleet of real relays: the fleet document's revocations, key rotation, a full relay.

Three relays on loopback read one fleet document, as every relay of a fleet
reads its own copy; a token revoked there ends its sessions on all of them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from backends import http_server
from click.testing import CliRunner
from harness import DOMAIN, RelayHarness, run_relay, wait_until

import burrow
from burrow import Tunnel, fleet, tokens
from burrow.agent.client import runtime
from burrow.exception import AuthError, RelayError
from burrow.fleetcli import fleet as fleet_command
from burrow.relay.revocation import REVOCATION_CHECK_SECONDS
from burrow.wire import protocol

# The promise: a token revoked in the fleet document ends its sessions
# on every relay within 5 s (each looks every REVOCATION_CHECK_SECONDS).
REVOKED_WITHIN = 5.0


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    """(signing key, public key) of the operator, in ``tmp_path/keys``."""
    directory = tmp_path / "keys"
    directory.mkdir()
    key = tokens.generate_signing_key()
    tokens.write_signing_key(key, directory / "token-signing.pem")
    tokens.write_public_key(key, directory / "token-public.pem")
    return directory / "token-signing.pem", directory / "token-public.pem"


def sign(
    signing: Path, out: Path, serial: int, relays: list[RelayHarness], revoked: Path | None = None
) -> None:
    """``burrow fleet sign``, as an operator runs it."""
    relays_file = out.with_name("relays.toml")
    relays_file.write_text(
        "".join(
            f'[[relay]]\nname = "r{n}"\naddress = "{DOMAIN}:{relay.port}"\nregion = "lo"\n'
            for n, relay in enumerate(relays, start=1)
        )
        or '[[relay]]\nname = "r1"\naddress = "r1.localhost:443"\n'
    )
    args = ["sign", "--key", str(signing), "--serial", str(serial), "--expires", "1h"]
    args += ["--relays", str(relays_file), "--out", str(out)]
    if revoked is not None:
        args += ["--revoked-tokens", str(revoked)]
    result = CliRunner().invoke(fleet_command, args)
    assert result.exit_code == 0, result.output


def replace(path: Path, text: str) -> None:
    """Write ``path`` whole (a relay reading it meanwhile sees the old or the new)."""
    new = path.with_name(path.name + ".new")
    new.write_text(text)
    os.replace(new, path)


def mint(signing: Path, subject: str) -> str:
    return tokens.mint(tokens.read_signing_key(signing), subject=subject, ttl_seconds=3600)


def curl(relay: RelayHarness, tunnel: Tunnel) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *("curl", "-sS", "-i", "--max-time", "20", "--cacert", str(relay.ca)),
            *("--resolve", f"{tunnel.host}:{relay.port}:127.0.0.1", tunnel.url + "/"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


def sessions_of(relay: RelayHarness, token: str) -> int:
    token_id = tokens.token_id_of(token)

    async def count() -> int:
        return sum(
            s.grant.token_id == token_id and not s.closed
            for s in relay.relay.registry.sessions.values()
        )

    return relay.call(count())


def relay_warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "burrow.relay" and r.levelno == logging.WARNING and text in r.getMessage()
    ]


@pytest.fixture
def fleet_of_three(tmp_path: Path, keys: tuple[Path, Path]) -> Iterator[list[RelayHarness]]:
    """Three relays with the operator's key, each reading ``tmp_path/fleet.jws``."""
    signing, public = keys
    document = tmp_path / "fleet.jws"
    sign(signing, document, 1, [])
    with ExitStack() as stack:
        yield [
            stack.enter_context(run_relay(tmp_path / f"r{n}", public_key=public, fleet=document))
            for n in (1, 2, 3)
        ]


def test_a_token_revoked_in_the_fleet_document_ends_its_sessions_on_every_relay(
    tmp_path: Path,
    keys: tuple[Path, Path],
    fleet_of_three: list[RelayHarness],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="burrow.relay")
    signing, _ = keys
    relays = fleet_of_three
    alice, bob = mint(signing, "alice"), mint(signing, "bob")
    with ExitStack() as stack:
        # One process forwards a port once: a page server for each tunnel.
        def forward(relay: RelayHarness, token: str) -> Tunnel:
            server = stack.enter_context(http_server(marker="the-page"))
            return stack.enter_context(burrow.forward(server.port, client=relay.client(token)))

        alice_tunnels = [forward(relay, alice) for relay in relays]
        bob_tunnel = forward(relays[0], bob)
        for relay, tunnel in zip(relays, alice_tunnels, strict=True):
            assert "the-page" in curl(relay, tunnel).stdout

        revoked = tmp_path / "revoked"
        tokens.append_revocation(revoked, tokens.token_id_of(alice), "alice")
        sign(signing, tmp_path / "fleet.jws", 2, relays, revoked)
        signed_at = time.monotonic()
        for relay in relays:  # no agent says hello meanwhile: each relay's own timer finds it
            wait_until(lambda r=relay: sessions_of(r, alice) == 0, "alice's sessions to end", 10)
        took = time.monotonic() - signed_at
        assert took <= REVOKED_WITHIN, f"the revocation took {took:.1f}s to reach every relay"

        for relay, tunnel in zip(relays, alice_tunnels, strict=True):
            assert curl(relay, tunnel).stdout.startswith("HTTP/1.1 404 Not Found"), tunnel
            with pytest.raises(AuthError, match="was revoked"):  # noqa: SIM117
                with burrow.forward(8000, client=relay.client(alice)):
                    pass
        assert "the-page" in curl(relays[0], bob_tunnel).stdout
        for relay in relays:
            assert relay.relay.fleet is not None and relay.relay.fleet.fleet.serial == 2

        # A bad or older document changes nothing, and each relay says so once.
        document = tmp_path / "fleet.jws"
        good = document.read_text()
        for text, said in (
            ("garbage\n", "refused (fleet document is malformed"),
            (
                fleet.sign(tokens.read_signing_key(signing), serial=1, expires=2**32, relays=[]),
                "serial 1 is not newer",
            ),
        ):
            replace(document, text)
            wait_until(
                lambda said=said: len(relay_warnings(caplog, said)) == 3,
                "each relay to refuse the document",
                REVOCATION_CHECK_SECONDS * 3,
            )
            with pytest.raises(AuthError, match="was revoked"):  # noqa: SIM117
                with burrow.forward(8000, client=relays[1].client(alice)):
                    pass
        time.sleep(REVOCATION_CHECK_SECONDS * 1.5)  # another look: no second line
        assert len(relay_warnings(caplog, "serial 1 is not newer")) == 3
        assert len(relay_warnings(caplog, "fleet document is malformed")) == 3
        replace(document, good)


# -- welcome.fleet ---------------------------------------------------------------------


async def say_hello(relay: RelayHarness, token: str, fleet_serial: int | None) -> protocol.Message:
    """The relay's answer to a hello with ``fleet_serial``, over a real control connection."""
    context = ssl.create_default_context(cafile=str(relay.ca))
    context.set_alpn_protocols([protocol.ALPN_CONTROL])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", relay.port, ssl=context, server_hostname=DOMAIN
    )
    connection = protocol.Connection(protocol.Kind.CONTROL, protocol.Role.AGENT)
    hello = protocol.Hello(
        version=protocol.PROTOCOL_VERSION, token=token, agent="probe", fleet_serial=fleet_serial
    )
    writer.write(connection.send(hello))
    try:
        while (event := connection.next_event()) is protocol.NEED_DATA:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the relay closed without an answer"
            connection.receive_data(data)
        return event
    finally:
        writer.close()


def test_welcome_hands_a_newer_document_to_agents_that_take_one(
    tmp_path: Path, keys: tuple[Path, Path], fleet_of_three: list[RelayHarness]
) -> None:
    signing, public = keys
    relay = fleet_of_three[0]
    token = mint(signing, "probe")
    text = (tmp_path / "fleet.jws").read_text().strip()
    for serial, expected in ((None, None), (0, text), (1, None), (5, None)):
        welcome = asyncio.run(say_hello(relay, token, serial))
        assert isinstance(welcome, protocol.Welcome), welcome
        assert welcome.fleet == expected, serial
    assert fleet.verify(text, tokens.read_public_key(public)).serial == 1
    # An agent that sends no fleet_serial (one older than fleet documents) works as before.
    with (
        http_server(marker="old-agent") as server,
        burrow.forward(server.port, client=relay.client(token)) as tunnel,
    ):
        assert "old-agent" in curl(relay, tunnel).stdout


# -- key rotation ------------------------------------------------------------------------


def test_a_key_rotation_with_no_outage(tmp_path: Path) -> None:
    old, new = tokens.generate_signing_key(), tokens.generate_signing_key()
    ring = tmp_path / "token-keys"  # the relay's --token-key directory
    ring.mkdir()
    tokens.write_public_key(old, ring / "old.pem")
    old_token = tokens.mint(old, subject="old", ttl_seconds=3600)

    with http_server(marker="rotating") as server, http_server(marker="rotating") as other:
        # 1. The relay holds both keys: tokens of either are taken, side by side.
        tokens.write_public_key(new, ring / "new.pem")
        with run_relay(tmp_path / "relay", public_key=ring) as relay:
            port = relay.port
            # 2. Tokens are minted with the new key from now on.
            new_token = tokens.mint(new, subject="new", ttl_seconds=3600)
            with (
                burrow.forward(server.port, client=relay.client(old_token)) as old_tunnel,
                burrow.forward(other.port, client=relay.client(new_token)) as new_tunnel,
            ):
                assert "rotating" in curl(relay, old_tunnel).stdout
                assert "rotating" in curl(relay, new_tunnel).stdout
        # 3. Later, the old key goes: a relay started with the new key only.
        (ring / "old.pem").unlink()
        with run_relay(tmp_path / "relay", public_key=ring, listen=(("127.0.0.1", port),)) as relay:
            with burrow.forward(server.port, client=relay.client(new_token)) as tunnel:
                assert "rotating" in curl(relay, tunnel).stdout
            with pytest.raises(AuthError) as info:  # noqa: SIM117
                with burrow.forward(other.port, client=relay.client(old_token)):
                    pass
            assert str(info.value) == (
                f"the relay at {relay.address} refused the token: token is signed with key "
                f"{tokens.key_id(old)!r}, which this relay does not hold "
                f"(it holds {tokens.key_id(new)})"
            )


def test_a_rotation_keeps_live_sessions_of_both_keys(tmp_path: Path) -> None:
    """Both --token-key files given (not a directory); the fleet document by the new key."""
    old, new = tokens.generate_signing_key(), tokens.generate_signing_key()
    tokens.write_public_key(old, tmp_path / "old.pem")
    tokens.write_public_key(new, tmp_path / "new.pem")
    document = tmp_path / "fleet.jws"
    document.write_text(
        fleet.sign(new, serial=1, expires=int(time.time()) + 60, relays=[], revoked=[])
    )
    with run_relay(
        tmp_path / "relay", public_key=(tmp_path / "old.pem", tmp_path / "new.pem"), fleet=document
    ) as relay:
        for key in (old, new):
            token = tokens.mint(key, subject="k", ttl_seconds=3600)
            welcome = asyncio.run(say_hello(relay, token, 0))
            assert isinstance(welcome, protocol.Welcome)
            assert welcome.fleet == document.read_text()


# -- a full relay ------------------------------------------------------------------------------


def test_a_full_relay_says_so(tmp_path: Path) -> None:
    with run_relay(tmp_path / "relay", max_sessions=1) as relay, http_server() as server:
        with burrow.forward(server.port, client=relay.client()):
            with pytest.raises(RelayError) as info:  # noqa: SIM117
                with burrow.forward(8000, client=relay.client(relay.mint("other"))):
                    pass
            assert info.value.code == protocol.CODE_FULL
            assert not info.value.retryable
            assert str(info.value) == (
                f"the relay at {relay.address} is full: this relay holds its most sessions "
                "(1); try another relay"
            )
        # Room again once the session ends (the agent keeps a session for later forwards).
        runtime.run(runtime.close_all(relay.address))
        wait_until(lambda: not relay.relay.registry.sessions, "the session to end", 10)
        with burrow.forward(server.port, client=relay.client(relay.mint("other"))):
            pass
