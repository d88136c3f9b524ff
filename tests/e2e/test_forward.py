"""burrow.forward() and burrow.Client: every error a caller can meet, against a real relay.

Each error is checked on its type and its exact message, since both are API:
code written for ``modal.forward`` catches the same types and shows the
same text.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import free_port, http_server, tcp_echo_server
from harness import DOMAIN, RelayHarness

import burrow
from burrow import tokens
from burrow.agent import client as client_module
from burrow.agent.session import AgentSession
from burrow.exception import AuthError, ConnectionError, InvalidError
from burrow.wire import protocol

LABEL_HOST = re.compile(r"[a-z0-9]{14}\." + re.escape(DOMAIN))
ENV_NAMES = ("BURROW_RELAY", "BURROW_TOKEN", "BURROW_CA")


def curl_ok(relay: RelayHarness, url: str) -> str:
    out = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", "20", "--cacert", str(relay.ca), url + "/"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No relay settings anywhere: neither in the environment nor from a running `burrow dev`."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BURROW_STATE_DIR", str(tmp_path / "no-dev-relay"))


def enter(tunnel: burrow.forward) -> None:
    """Open and close a tunnel at once: for the errors that opening raises."""
    with tunnel:
        pass


# -- arguments ----------------------------------------------------------------


@pytest.mark.parametrize("port", ["8000", 80.0, None, True, False, b"80", [80]])
def test_port_must_be_an_int(relay: RelayHarness, port: Any) -> None:
    with pytest.raises(InvalidError) as info:
        burrow.forward(port, client=relay.client())
    assert str(info.value) == f"The port argument should be an int, not {port!r}"


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_port_must_be_in_range(relay: RelayHarness, port: int) -> None:
    with pytest.raises(InvalidError) as info:
        burrow.forward(port, client=relay.client())
    assert str(info.value) == f"Invalid port number {port}"


@pytest.mark.parametrize("port", [1, 65535])
def test_port_range_ends_are_accepted(relay: RelayHarness, port: int) -> None:
    assert burrow.forward(port, client=relay.client()).port == port


def test_h2_needs_an_encrypted_port(relay: RelayHarness) -> None:
    with pytest.raises(InvalidError) as info:
        burrow.forward(8000, h2_enabled=True, unencrypted=True, client=relay.client())
    assert str(info.value) == "H2 can only be used with encrypted ports"


def test_argument_errors_come_before_settings(no_env: None) -> None:
    # A bad port is the caller's first mistake to hear about, even with no relay set up.
    with pytest.raises(InvalidError) as info:
        burrow.forward("8000")  # type: ignore[arg-type]
    assert str(info.value) == "The port argument should be an int, not '8000'"


# -- the same port twice --------------------------------------------------------


def test_same_port_twice_at_once(relay: RelayHarness) -> None:
    with http_server() as server:
        with burrow.forward(server.port, client=relay.client()) as first:
            with pytest.raises(InvalidError) as info:
                enter(burrow.forward(server.port, client=relay.client()))
            assert str(info.value) == f"Port {server.port} is already forwarded"
            with pytest.raises(InvalidError) as info:
                enter(burrow.forward(server.port, unencrypted=True, client=relay.client()))
            assert str(info.value) == f"Port {server.port} is already forwarded"
            # The refused attempt did not disturb the first tunnel.
            assert server.marker in curl_ok(relay, first.url)
        with burrow.forward(server.port, client=relay.client()) as again:
            assert again.host != first.host
            assert server.marker in curl_ok(relay, again.url)


async def test_same_port_twice_at_once_async(relay: RelayHarness) -> None:
    with http_server() as server:
        async with burrow.forward(server.port, client=relay.client()):
            with pytest.raises(InvalidError) as info:
                async with burrow.forward(server.port, client=relay.client()):
                    pass
            assert str(info.value) == f"Port {server.port} is already forwarded"
        async with burrow.forward(server.port, client=relay.client()) as again:
            assert LABEL_HOST.fullmatch(again.host)


def test_same_port_twice_with_two_tokens_for_one_relay(relay: RelayHarness) -> None:
    # DESIGN.md: one session per process and relay; a port is forwarded once per process.
    with http_server() as server, burrow.forward(server.port, client=relay.client()):
        other = relay.client(token=relay.mint(subject="second-token"))
        with pytest.raises(InvalidError) as info:
            enter(burrow.forward(server.port, client=other))
        assert str(info.value) == f"Port {server.port} is already forwarded"


# -- settings from the environment ----------------------------------------------


def test_no_credentials_outside_a_workload(no_env: None) -> None:
    with pytest.raises(InvalidError) as info:
        burrow.forward(8000)
    message = str(info.value)
    assert "only inside a burrow workload" in message
    assert "BURROW_RELAY" in message
    assert "BURROW_TOKEN" in message


@pytest.mark.parametrize("missing", ["BURROW_RELAY", "BURROW_TOKEN"])
def test_one_credential_missing(
    relay: RelayHarness, no_env: None, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    for name, value in relay.env().items():
        if name != missing:
            monkeypatch.setenv(name, value)
    with pytest.raises(InvalidError) as info:
        burrow.forward(8000)
    assert f"({missing} not set)" in str(info.value)


def test_settings_from_the_environment(
    relay: RelayHarness, no_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in relay.env().items():
        monkeypatch.setenv(name, value)
    with http_server() as server, burrow.forward(server.port) as tunnel:
        assert LABEL_HOST.fullmatch(tunnel.host)
        assert server.marker in curl_ok(relay, tunnel.url)


# -- refusals from the relay ---------------------------------------------------------


def test_token_signed_by_another_key(relay: RelayHarness) -> None:
    stranger = tokens.mint(tokens.generate_signing_key(), subject="test", ttl_seconds=3600)
    with pytest.raises(AuthError) as info:
        enter(burrow.forward(8000, client=relay.client(token=stranger)))
    assert str(info.value).startswith(
        f"the relay at {relay.address} refused the token: token is signed with key "
    )
    assert str(info.value).endswith(
        f", which this relay does not hold (it holds {tokens.key_id(relay.signing_key)})"
    )


def test_expired_token(relay: RelayHarness) -> None:
    expired = relay.mint(ttl_seconds=60, now=time.time() - 3600)
    with pytest.raises(AuthError) as info:
        enter(burrow.forward(8000, client=relay.client(token=expired)))
    message = str(info.value)
    assert message.startswith(f"the relay at {relay.address} refused the token: token expired at ")


@pytest.mark.parametrize("garbage", ["not-a-token", "a.b.c", "x" * 5000])
def test_garbage_token(relay: RelayHarness, garbage: str) -> None:
    with pytest.raises(AuthError) as info:
        enter(burrow.forward(8000, client=relay.client(token=garbage)))
    assert str(info.value).startswith(
        f"the relay at {relay.address} refused the token: token is malformed"
    )


def test_relay_that_stays_unreachable(relay: RelayHarness) -> None:
    address = f"{DOMAIN}:{free_port()}"
    client = burrow.Client(relay=address, token=relay.token, ca=str(relay.ca))
    with pytest.raises(ConnectionError) as info:
        enter(burrow.forward(8000, client=client))
    assert str(info.value).startswith(f"could not reach the burrow relay at {address} after ")


def test_relay_certificate_not_trusted(
    relay: RelayHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BURROW_CA", raising=False)
    client = burrow.Client(relay=relay.address, token=relay.token)
    with pytest.raises(ConnectionError) as info:
        enter(burrow.forward(8000, client=client))
    message = str(info.value)
    assert relay.address in message
    assert "certificate" in message
    assert "BURROW_CA" in message


# -- the Tunnel that forward() yields ----------------------------------------------------


def test_tunnel_fields(relay: RelayHarness) -> None:
    with http_server() as server, burrow.forward(server.port, client=relay.client()) as tunnel:
        assert LABEL_HOST.fullmatch(tunnel.host), tunnel.host
        assert tunnel.port == relay.port
        assert tunnel.url == f"https://{tunnel.host}:{relay.port}"
        assert tunnel.tls_socket == (tunnel.host, relay.port)
        with pytest.raises(InvalidError) as info:
            _ = tunnel.tcp_socket
        assert str(info.value) == (
            "This tunnel is not configured for unencrypted TCP. "
            "Please use `forward(..., unencrypted=True)`."
        )


def test_tunnel_fields_unencrypted(relay: RelayHarness) -> None:
    with (
        tcp_echo_server() as echo,
        burrow.forward(echo.port, unencrypted=True, client=relay.client()) as tunnel,
    ):
        assert LABEL_HOST.fullmatch(tunnel.host), tunnel.host
        assert tunnel.url == f"https://{tunnel.host}:{relay.port}"
        tcp_host, tcp_port = tunnel.tcp_socket
        assert tcp_host == DOMAIN
        low, high = relay.relay.config.tcp_ports
        assert low <= tcp_port <= high
        assert tcp_port != relay.port


def test_every_tunnel_gets_its_own_label(relay: RelayHarness) -> None:
    with (
        http_server() as a,
        http_server() as b,
        burrow.forward(a.port, client=relay.client()) as ta,
        burrow.forward(b.port, client=relay.client()) as tb,
    ):
        assert ta.host != tb.host


# -- one session per process ---------------------------------------------------------


def test_second_tunnel_costs_one_round_trip(
    relay: RelayHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = relay.client()
    with http_server() as a, http_server() as b, burrow.forward(a.port, client=client):
        session = client_module.runtime._sessions[client.config()]
        sessions_before = relay.call(_count_sessions(relay))

        sent: list[protocol.Message] = []
        original_send = AgentSession._send

        def counting_send(self: AgentSession, message: protocol.Message) -> None:
            sent.append(message)
            original_send(self, message)

        control_connections: list[object] = []
        original_serve_control = relay.relay._serve_control

        def counting_serve_control(stream: Any) -> Any:
            control_connections.append(stream)
            return original_serve_control(stream)

        monkeypatch.setattr(AgentSession, "_send", counting_send)
        monkeypatch.setattr(relay.relay, "_serve_control", counting_serve_control)
        with burrow.forward(b.port, client=client) as tunnel:
            requests = [m for m in sent if not isinstance(m, protocol.Ping | protocol.Pong)]
            assert [type(m) for m in requests] == [protocol.Open]
            assert control_connections == []
            assert relay.call(_count_sessions(relay)) == sessions_before
            assert client_module.runtime._sessions[client.config()] is session
            assert b.marker in curl_ok(relay, tunnel.url)


async def _count_sessions(relay: RelayHarness) -> int:
    return len(relay.relay.registry.sessions)


@pytest.fixture(autouse=True)
def _relay_sessions_survive(relay: RelayHarness) -> Iterator[None]:
    yield
    # No test here may leave the shared relay unable to serve.
    assert relay.relay.registry.sessions is not None
    assert relay.loop.is_running()
