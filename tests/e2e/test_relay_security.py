"""Security at the relay: revoked tokens, visitor allowlists, and sessions kept apart.

Real relays on loopback, real agents (``burrow.forward``), real visitors (curl,
sockets), and where a hostile agent is needed, one that speaks the protocol
by hand (:class:`RawConnection`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from backends import free_port_on_both, http_server, tcp_echo_server
from harness import DOMAIN, RelayHarness, run_relay

import burrow
from burrow import Tunnel, tokens
from burrow.exception import AuthError, InvalidError
from burrow.relay.revocation import REVOCATION_CHECK_SECONDS
from burrow.relay.server import Relay
from burrow.wire import allowlist, protocol

# How long anything here may take; only a hung test waits this long.
TIMEOUT = 10.0

# A revocation takes effect within one check of the file; the rest is slack
# for a loaded machine.
REVOKED_WITHIN = REVOCATION_CHECK_SECONDS + 5.0

FORBIDDEN_BODY = "burrow: this tunnel does not accept visitors from your address\n"
BURROW = [sys.executable, "-m", "burrow"]


# -- clients ------------------------------------------------------------------------


@dataclass
class Curl:
    returncode: int
    stdout: str
    stderr: str


def curl(relay: RelayHarness, url: str, *args: str, ip: str = "127.0.0.1") -> Curl:
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    address = f"[{ip}]" if ":" in ip else ip
    out = subprocess.run(
        [
            *("curl", "-sS", "--max-time", "20", "--cacert", str(relay.ca)),
            *("--resolve", f"{host}:{port}:{address}", *args, url),
        ],
        capture_output=True,
        timeout=30,
    )
    return Curl(out.returncode, out.stdout.decode(), out.stderr.decode())


def assert_serves(relay: RelayHarness, tunnel: Tunnel, marker: str, ip: str = "127.0.0.1") -> None:
    out = curl(relay, tunnel.url + "/", "--fail", ip=ip)
    assert out.returncode == 0, out.stderr
    assert marker in out.stdout


def assert_forbidden(
    relay: RelayHarness, tunnel: Tunnel, *args: str, ip: str = "127.0.0.1"
) -> None:
    out = curl(relay, tunnel.url + "/", "-i", *args, ip=ip)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 403 Forbidden\r\n"), out.stdout
    assert out.stdout.endswith("\r\n\r\n" + FORBIDDEN_BODY)


def assert_not_found(relay: RelayHarness, tunnel: Tunnel) -> None:
    out = curl(relay, tunnel.url + "/", "-i")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 404 Not Found\r\n"), out.stdout


def tcp_exchange(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``data`` and half-close; everything that comes back until the close."""
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        with contextlib.suppress(OSError):  # the relay may have closed already
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return bytes(received)


def frame(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack("!I", len(payload)) + payload


class RawConnection:
    """A connection to the relay's public port that speaks burrow frames by hand."""

    def __init__(self, relay: RelayHarness, alpn: str, sni: str = DOMAIN) -> None:
        context = ssl.create_default_context(cafile=str(relay.ca))
        context.set_alpn_protocols([alpn])
        raw = socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT)
        self.sock = context.wrap_socket(raw, server_hostname=sni)
        assert self.sock.selected_alpn_protocol() == alpn
        self.received = bytearray()  # every byte the relay sent on this connection
        self._buffer = bytearray()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    @property
    def local_address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def send(self, **message: Any) -> None:
        self.sock.sendall(frame(message))

    def _read(self) -> bool:
        """One read from the relay into the buffer; False once it has closed."""
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            return False
        self.received += chunk
        self._buffer += chunk
        return bool(chunk)

    def _exactly(self, size: int) -> bytes | None:
        while len(self._buffer) < size:
            if not self._read():
                return None
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def receive(self) -> dict[str, Any] | None:
        """The next frame, or None once the relay has closed."""
        head = self._exactly(4)
        if head is None:
            return None
        body = self._exactly(struct.unpack("!I", head)[0])
        assert body is not None, "the relay closed in the middle of a frame"
        message: dict[str, Any] = json.loads(body)
        return message

    def reply(self, *types: str) -> dict[str, Any]:
        """The next frame of one of ``types``, answering pings and skipping dials."""
        while True:
            message = self.receive()
            assert message is not None, f"the relay closed before sending {types}"
            if message["type"] in types:
                return message
            if message["type"] == "ping":
                self.send(type="pong", seq=message["seq"])
            else:
                assert message["type"] == "dial", message

    def has_pending(self) -> bool:
        """Whether the relay has sent anything not yet taken, without waiting for it.

        (A readable socket is not enough: TLS session tickets arrive too.)
        """
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    if not self._read():
                        return True  # closed: that is news too
                except ssl.SSLWantReadError:
                    return bool(self._buffer)
        finally:
            self.sock.settimeout(TIMEOUT)


@dataclass
class RawSession:
    control: RawConnection
    welcome: dict[str, Any]

    def attach(self, relay: RelayHarness) -> RawConnection:
        """A data connection of this session, as the agent's pool would open it."""
        data = RawConnection(relay, protocol.ALPN_DATA, self.welcome["data_name"])
        data.send(type="attach", session=self.welcome["session"], key=self.welcome["key"])
        return data

    def open(self, tunnel_id: int, **members: Any) -> dict[str, Any]:
        self.control.send(
            **{
                "type": "open",
                "id": tunnel_id,
                "local_port": 9,
                "tcp": False,
                "h2": False,
                **members,
            }
        )
        return self.control.reply("opened", "error")


@contextlib.contextmanager
def raw_session(relay: RelayHarness, token: str) -> Iterator[RawSession]:
    with RawConnection(relay, protocol.ALPN_CONTROL) as control:
        control.send(
            type="hello", version=protocol.PROTOCOL_VERSION, token=token, agent="security-test"
        )
        welcome = control.reply("welcome")
        yield RawSession(control, welcome)


def refused_attach(connection: RawConnection) -> dict[str, Any]:
    """The error the relay sends a data connection it refuses, then its close."""
    error = connection.receive()
    assert error is not None and error["type"] == "error", error
    assert connection.receive() is None, "the relay kept a refused data connection open"
    return error


# -- looking at the relay ----------------------------------------------------------


async def _sessions_of(relay: RelayHarness, token_id: str) -> list[tuple[str, str]]:
    return [
        (session.id, session.key)
        for session in relay.relay.registry.sessions.values()
        if session.grant.token_id == token_id and not session.closed
    ]


def sessions_of(relay: RelayHarness, token: str) -> list[tuple[str, str]]:
    """(id, key) of the relay's live sessions for ``token``."""
    token_id = tokens.token_id_of(token)
    return relay.call(_sessions_of(relay, token_id))


async def _pooled(relay: RelayHarness) -> set[str]:
    return {
        channel.stream.peername
        for session in relay.relay.registry.sessions.values()
        for channel in session._pool
    }


def wait_until(predicate: Callable[[], object], what: str, seconds: float = TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {seconds}s waiting for {what}"
        time.sleep(0.02)


def relay_logs(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "burrow.relay" and record.levelno == level and text in record.getMessage()
    ]


def revoke(list_file: Path, token_or_id: str) -> subprocess.CompletedProcess[str]:
    """``burrow token revoke``, run as an operator runs it."""
    return subprocess.run(
        [*BURROW, "token", "revoke", "--list", str(list_file), token_or_id],
        capture_output=True,
        text=True,
        timeout=60,
    )


# -- token revocation -----------------------------------------------------------------


@pytest.fixture(scope="module")
def revoking_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayHarness]:
    """A relay reading a revoked-tokens file, ``relay.state_dir / "revoked"``."""
    state = tmp_path_factory.mktemp("revoking-relay")
    revoked = state / "revoked"
    revoked.write_text("# revoked burrow tokens\n")
    with run_relay(state / "relay", revoked_tokens=revoked) as relay:
        yield relay


def revoked_file(relay: RelayHarness) -> Path:
    path = relay.relay.config.revoked_tokens
    assert path is not None
    return path


def test_revoking_a_token_ends_its_live_session(
    revoking_relay: RelayHarness, caplog: pytest.LogCaptureFixture
) -> None:
    relay = revoking_relay
    caplog.set_level(logging.INFO, logger="burrow.relay")
    alice, bob = relay.mint("alice"), relay.mint("bob")
    alice_id = tokens.token_id_of(alice)
    with (
        http_server(marker="alice-page") as alice_server,
        http_server(marker="bob-page") as bob_server,
        burrow.forward(alice_server.port, client=relay.client(alice)) as alice_tunnel,
        burrow.forward(bob_server.port, client=relay.client(bob)) as bob_tunnel,
    ):
        assert_serves(relay, alice_tunnel, "alice-page")
        assert_serves(relay, bob_tunnel, "bob-page")
        (bob_session,) = sessions_of(relay, bob)

        out = revoke(revoked_file(relay), alice)
        assert out.returncode == 0, out.stderr
        assert f"revoked token {alice_id}" in out.stdout
        # No agent says hello meanwhile: the relay's own timer finds the change.
        wait_until(
            lambda: not sessions_of(relay, alice), "the revoked session to end", REVOKED_WITHIN
        )

        assert_not_found(relay, alice_tunnel)
        assert_serves(relay, bob_tunnel, "bob-page")
        assert sessions_of(relay, bob) == [bob_session]

    ended = relay_logs(caplog, logging.WARNING, f"token {alice_id} was revoked")
    assert ended and "ended" in ended[0] and "alice" in ended[0], ended

    with pytest.raises(AuthError, match=f"token {alice_id} was revoked"):  # noqa: SIM117
        with burrow.forward(8000, client=relay.client(alice)):
            pass
    refused = relay_logs(caplog, logging.WARNING, "refused: token")
    assert any(f"token {alice_id} was revoked" in line for line in refused), refused
    assert not sessions_of(relay, alice)

    with (
        http_server(marker="bob-again") as server,
        burrow.forward(server.port, client=relay.client(bob)) as tunnel,
    ):
        assert_serves(relay, tunnel, "bob-again")


def test_a_token_revoked_by_id_is_refused_at_once(revoking_relay: RelayHarness) -> None:
    relay = revoking_relay
    carol = relay.mint("carol")
    carol_id = tokens.token_id_of(carol)
    with http_server(marker="carol-page") as server:
        with burrow.forward(server.port, client=relay.client(carol)) as tunnel:
            assert_serves(relay, tunnel, "carol-page")
        assert sessions_of(relay, carol)  # her session outlives the tunnel
        out = revoke(revoked_file(relay), carol_id)
        assert out.returncode == 0, out.stderr
        # The next hello looks at the file before the relay's timer does: it is
        # refused, and carol's live session is over by the time the answer comes.
        with RawConnection(relay, protocol.ALPN_CONTROL) as control:
            control.send(
                type="hello", version=protocol.PROTOCOL_VERSION, token=carol, agent="security-test"
            )
            error = control.reply("error")
            assert control.receive() is None
        assert error == {
            "type": "error",
            "code": protocol.CODE_AUTH,
            "message": f"token {carol_id} was revoked",
        }
        assert not sessions_of(relay, carol)


def test_revoke_cli_appends_and_creates_the_file(tmp_path: Path) -> None:
    key = tokens.generate_signing_key()
    token = tokens.mint(key, subject="ci-runner", ttl_seconds=60)
    token_id = tokens.token_id_of(token)
    path = tmp_path / "revoked"

    out = revoke(path, token)  # a whole token; no key needed
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    line = path.read_text().splitlines()[0]
    assert line.startswith(f"{token_id}  # subject ci-runner, revoked ")

    out = revoke(path, "some-other-id")
    assert out.returncode == 0, out.stderr
    out = revoke(path, token_id)
    assert out.returncode == 0, out.stderr
    assert "already revoked" in out.stdout
    assert tokens.parse_revocation_list(path.read_text()) == {token_id, "some-other-id"}

    for bad in ("not.a.token!", "two words"):
        out = revoke(path, bad)
        assert out.returncode != 0
        assert "Error" in out.stderr
    assert len(path.read_text().splitlines()) == 2


def test_a_revoked_tokens_file_that_goes_away_keeps_its_list(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="burrow.relay")
    revoked = tmp_path / "revoked"
    revoked.write_text("")
    with run_relay(tmp_path / "relay", revoked_tokens=revoked) as relay:
        dave, erin = relay.mint("dave"), relay.mint("erin")
        assert revoke(revoked, dave).returncode == 0
        with pytest.raises(AuthError, match="was revoked"):  # noqa: SIM117
            with burrow.forward(8000, client=relay.client(dave)):
                pass
        revoked.unlink()
        wait_until(
            lambda: relay_logs(caplog, logging.WARNING, "cannot be read"),
            "a warning that the file is gone",
            REVOKED_WITHIN,
        )
        (warning,) = relay_logs(caplog, logging.WARNING, "cannot be read")
        assert str(revoked) in warning and "keeping its last 1 ids" in warning
        with pytest.raises(AuthError, match="was revoked"):  # noqa: SIM117
            with burrow.forward(8000, client=relay.client(dave)):
                pass
        # Back again, with erin instead: the new list is the list.
        assert revoke(revoked, erin).returncode == 0
        with pytest.raises(AuthError, match="was revoked"):  # noqa: SIM117
            with burrow.forward(8000, client=relay.client(erin)):
                pass
        with (
            http_server(marker="dave-page") as server,
            burrow.forward(server.port, client=relay.client(dave)) as tunnel,
        ):
            assert_serves(relay, tunnel, "dave-page")
    assert len(relay_logs(caplog, logging.WARNING, "cannot be read")) == 1  # said once


def test_a_missing_revoked_tokens_file_is_a_clear_error(
    relay: RelayHarness, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-file"
    config = relay.relay.config
    with pytest.raises(InvalidError, match=f"revoked-tokens file {missing}"):
        Relay(dataclasses.replace(config, revoked_tokens=missing))
    out = subprocess.run(
        [
            *BURROW,
            *("relay", "--domain", DOMAIN, "--cert", str(config.cert)),
            *("--key", str(config.key), "--token-key", str(config.public_key)),
            *("--listen", "127.0.0.1:0", "--revoked-tokens", str(missing)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out
    assert "--revoked-tokens" in out.stderr and "does not exist" in out.stderr


# -- visitor allowlists ------------------------------------------------------------------


def test_an_allowlist_with_the_visitor_on_it_serves(relay: RelayHarness) -> None:
    with (
        http_server(marker="allowed-page") as server,
        tcp_echo_server() as echo,
        burrow.forward(
            server.port, inbound_cidr_allowlist=["127.0.0.1/32"], client=relay.client()
        ) as tunnel,
        burrow.forward(
            echo.port,
            unencrypted=True,
            inbound_cidr_allowlist=["192.0.2.0/24", "127.0.0.0/8"],
            client=relay.client(),
        ) as tcp_tunnel,
    ):
        assert_serves(relay, tunnel, "allowed-page")
        assert tcp_exchange(tcp_tunnel.tcp_socket[1], b"let me in") == b"let me in"
        assert echo.connections == 1


def test_an_allowlist_without_the_visitor_refuses_it(
    relay: RelayHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="burrow.relay")
    with (
        http_server() as server,
        tcp_echo_server() as echo,
        burrow.forward(
            server.port, inbound_cidr_allowlist=["10.0.0.0/8"], client=relay.client()
        ) as tunnel,
        burrow.forward(
            echo.port,
            unencrypted=True,
            inbound_cidr_allowlist=["10.0.0.0/8"],
            client=relay.client(),
        ) as tcp_tunnel,
    ):
        assert_forbidden(relay, tunnel)
        assert_forbidden(relay, tcp_tunnel)  # its TLS name too
        assert tcp_exchange(tcp_tunnel.tcp_socket[1], b"let me in") == b""
        assert server.requests_served == 0
        assert echo.connections == 0  # not even a connection reached the local server
    refusals = relay_logs(caplog, logging.INFO, "refused by the allowlist")
    assert len(refusals) == 3, refusals
    assert all("127.0.0.1:" in line for line in refusals)
    assert any(tunnel.host in line for line in refusals)
    assert any(tcp_tunnel.host in line for line in refusals)


def test_an_empty_allowlist_lets_no_one_in(relay: RelayHarness) -> None:
    with (
        tcp_echo_server() as echo,
        burrow.forward(
            echo.port, unencrypted=True, inbound_cidr_allowlist=[], client=relay.client()
        ) as tunnel,
    ):
        assert_forbidden(relay, tunnel)
        assert tcp_exchange(tunnel.tcp_socket[1], b"anyone?") == b""
        assert echo.connections == 0


def test_an_h2_visitor_left_out_is_closed(relay: RelayHarness) -> None:
    with (
        http_server() as server,
        burrow.forward(
            server.port,
            h2_enabled=True,
            inbound_cidr_allowlist=["10.0.0.0/8"],
            client=relay.client(),
        ) as tunnel,
    ):
        out = curl(relay, tunnel.url + "/", "--http2", "-i")
        assert out.returncode != 0  # a close, not HTTP/1.1 bytes inside h2
        assert "403" not in out.stdout
        assert_forbidden(relay, tunnel, "--http1.1")  # over HTTP/1.1 it says why
        assert server.requests_served == 0


def test_ipv6_visitors_and_ipv4_allowlists(tmp_path: Path) -> None:
    port = free_port_on_both()
    with run_relay(tmp_path / "relay", listen=(("127.0.0.1", port), ("::1", port))) as relay:
        with (
            http_server(marker="v4-page") as server,
            tcp_echo_server() as echo,
            burrow.forward(
                server.port, inbound_cidr_allowlist=["127.0.0.0/8"], client=relay.client()
            ) as v4_only,
            burrow.forward(
                echo.port,
                unencrypted=True,
                inbound_cidr_allowlist=["127.0.0.0/8"],
                client=relay.client(),
            ) as v4_only_tcp,
        ):
            assert_serves(relay, v4_only, "v4-page")
            assert_forbidden(relay, v4_only, ip="::1")
            assert tcp_exchange(v4_only_tcp.tcp_socket[1], b"v6", host="::1") == b""
            assert echo.connections == 0
            assert tcp_exchange(v4_only_tcp.tcp_socket[1], b"v4") == b"v4"
        with (
            http_server(marker="v6-page") as server,
            burrow.forward(
                server.port, inbound_cidr_allowlist=["::1/128"], client=relay.client()
            ) as v6_only,
        ):
            assert_serves(relay, v6_only, "v6-page", ip="::1")
            assert_forbidden(relay, v6_only)


@pytest.mark.parametrize(
    ("allowlist_value", "named"),
    [
        (["10.0.0.0/8", "banana"], "'banana'"),
        (["10.0.0.0/33"], "'10.0.0.0/33'"),
        (["10.0.0.0/8,192.0.2.0/24"], "'10.0.0.0/8,192.0.2.0/24'"),
        ("10.0.0.0/8", "not one string"),
        ([7], "7"),
    ],
)
def test_a_bad_allowlist_is_invalid(relay: RelayHarness, allowlist_value: Any, named: str) -> None:
    before = len(relay.relay.registry.routes)
    with pytest.raises(InvalidError, match="inbound_cidr_allowlist") as info:
        burrow.forward(8000, inbound_cidr_allowlist=allowlist_value, client=relay.client())
    assert named in str(info.value)
    assert len(relay.relay.registry.routes) == before


def test_the_relay_checks_allow_itself(relay: RelayHarness) -> None:
    too_many = ",".join(f"10.0.{i // 256}.{i % 256}/32" for i in range(allowlist.MAX_ENTRIES + 1))
    with raw_session(relay, relay.mint("raw-agent")) as agent:
        for tunnel_id, bad, named in [
            (1, "10.0.0.0/8,banana", "'banana'"),
            (2, "10.0.0.0/8,", "''"),
            (3, "10.0.0.0/8;192.0.2.0/24", "'10.0.0.0/8;192.0.2.0/24'"),
            (4, too_many, f"at most {allowlist.MAX_ENTRIES}"),
        ]:
            error = agent.open(tunnel_id, allow=bad)
            assert error["type"] == "error", error
            assert error["id"] == tunnel_id
            assert error["code"] == protocol.CODE_BAD_REQUEST
            assert named in error["message"]
        # The session goes on, and the allow it sends is what the relay enforces.
        opened = agent.open(5, allow="")
        assert opened["type"] == "opened", opened
        assert_forbidden(relay, Tunnel(host=opened["host"], port=opened["port"]))
        opened = agent.open(6, allow="127.0.0.1/32")
        assert opened["type"] == "opened", opened
        # A visitor let in is bound to one of our data connections.
        context = ssl.create_default_context(cafile=str(relay.ca))
        with (
            agent.attach(relay) as data,
            socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname=opened["host"]),
        ):
            bind = data.receive()
        assert bind is not None and bind["type"] == "bind" and bind["id"] == 6, bind


def test_forward_cli_allow(relay: RelayHarness, tmp_path: Path) -> None:
    env = {**os.environ, **relay.env()}
    with http_server() as server:
        proc = subprocess.Popen(
            [
                *BURROW,
                *("forward", str(server.port)),
                *("--allow", "10.0.0.0/8", "--allow", "192.0.2.0/24"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        watchdog = threading.Timer(60, proc.kill)
        watchdog.start()
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert url.startswith("https://"), (url, proc.stderr.read() if proc.stderr else "")
            host, _, port = url.removeprefix("https://").partition(":")
            assert_forbidden(relay, Tunnel(host=host, port=int(port)))
            assert server.requests_served == 0
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
            watchdog.cancel()
    out = subprocess.run(
        [*BURROW, "forward", "8000", "--allow", "banana"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "'banana'" in out.stderr


# -- sessions kept apart ----------------------------------------------------------------


def test_a_session_cannot_close_another_sessions_tunnel(relay: RelayHarness) -> None:
    alice = relay.mint("alice")
    with (
        http_server(marker="alice-page") as server,
        burrow.forward(server.port, client=relay.client(alice)) as tunnel,
        raw_session(relay, relay.mint("mallory")) as mallory,
    ):
        # Tunnel ids belong to a session: alice's first tunnel is 1, as any would be.
        for tunnel_id in range(0, 8):
            mallory.control.send(type="close", id=tunnel_id)
            error = mallory.control.reply("error", "closed")
            assert error["type"] == "error", error
            assert error["id"] == tunnel_id
            assert error["code"] == protocol.CODE_BAD_REQUEST
        assert_serves(relay, tunnel, "alice-page")
        # Her own tunnel 1 is hers to close.
        assert mallory.open(1)["type"] == "opened"
        mallory.control.send(type="close", id=1)
        assert mallory.control.reply("error", "closed") == {"type": "closed", "id": 1}
        assert_serves(relay, tunnel, "alice-page")


def test_a_session_learns_nothing_of_another(relay: RelayHarness) -> None:
    alice = relay.mint("alice-the-secret-subject")
    with (
        tcp_echo_server() as echo,
        burrow.forward(echo.port, unencrypted=True, client=relay.client(alice)) as tunnel,
    ):
        ((alice_session, alice_key),) = sessions_of(relay, alice)
        secrets_of_alice = [
            tunnel.host.split(".", 1)[0],
            alice_session,
            alice_key,
            tokens.token_id_of(alice),
            "alice-the-secret-subject",
        ]  # (not her TCP port: a port number is no secret, anyone can scan for it)
        with raw_session(relay, relay.mint("mallory")) as mallory:
            data = [mallory.attach(relay) for _ in range(2)]
            try:
                # Everything an agent can make the relay say: opens, good and bad,
                # closes of what is not hers, a visitor of her own, pings.
                opened = mallory.open(1, tcp=True)
                assert opened["type"] == "opened"
                mallory.open(1)
                mallory.open(2, allow="nope")
                mallory.control.send(type="close", id=42)
                mallory.control.reply("error")
                with socket.create_connection(("127.0.0.1", opened["tcp_port"])):
                    wait_until(lambda: any(d.has_pending() for d in data), "a bind for her visitor")
                mallory.control.send(type="ping", seq=7)
                assert mallory.control.reply("pong") == {"type": "pong", "seq": 7}
            finally:
                for connection in data:
                    connection.close()
            heard = bytes(mallory.control.received) + b"".join(bytes(d.received) for d in data)
        assert b'"type":"welcome"' in heard and b'"type":"bind"' in heard  # she heard plenty
        for secret in secrets_of_alice:
            assert secret.encode() not in heard, secret


def test_a_visitor_is_bound_only_to_its_own_sessions_data_connections(
    relay: RelayHarness,
) -> None:
    alice = relay.mint("alice")
    visits = 3 * relay.relay.config.pool_size
    with (
        http_server(marker="alice-page") as server,
        burrow.forward(server.port, client=relay.client(alice)) as tunnel,
        raw_session(relay, relay.mint("mallory")) as mallory,
    ):
        # Mallory publishes the same tunnel id as alice's and fills her pool.
        assert mallory.open(1)["type"] == "opened"
        data = [mallory.attach(relay) for _ in range(relay.relay.config.pool_size)]
        try:
            wait_until(
                lambda: {d.local_address for d in data} <= relay.call(_pooled(relay)),
                "mallory's data connections in her pool",
            )
            for _ in range(visits):
                assert_serves(relay, tunnel, "alice-page")
            assert server.requests_served == visits
            # A bind is sent before any visitor byte moves, so one would be here by now.
            assert not any(d.has_pending() for d in data)
            assert {d.local_address for d in data} <= relay.call(_pooled(relay))
        finally:
            for connection in data:
                connection.close()


def test_attach_needs_the_sessions_own_key(relay: RelayHarness) -> None:
    with (
        raw_session(relay, relay.mint("alice")) as alice,
        raw_session(relay, relay.mint("mallory")) as mallory,
    ):
        alice_id, alice_key = alice.welcome["session"], alice.welcome["key"]
        for key in (mallory.welcome["key"], secrets.token_urlsafe(32), "", alice_key[:-1]):
            for sni in (DOMAIN, alice.welcome["data_name"], mallory.welcome["data_name"]):
                with RawConnection(relay, protocol.ALPN_DATA, sni) as probe:
                    probe.send(type="attach", session=alice_id, key=key)
                    assert refused_attach(probe)["code"] == protocol.CODE_BAD_ATTACH
        # Mallory's own session id with alice's key: the key is per session.
        with RawConnection(relay, protocol.ALPN_DATA) as probe:
            probe.send(type="attach", session=mallory.welcome["session"], key=alice_key)
            assert refused_attach(probe)["code"] == protocol.CODE_BAD_ATTACH
        # The right key is taken (so the refusals above were about the key).
        with alice.attach(relay) as good:
            wait_until(lambda: good.local_address in relay.call(_pooled(relay)), "alice's attach")
    # Alice's session is over: her own key is worth nothing now.
    wait_until(lambda: not relay.call(_has_session(relay, alice_id)), "alice's session to end")
    for sni in (DOMAIN, alice.welcome["data_name"]):
        with RawConnection(relay, protocol.ALPN_DATA, sni) as probe:
            probe.send(type="attach", session=alice_id, key=alice_key)
            assert refused_attach(probe)["code"] == protocol.CODE_BAD_ATTACH


async def _has_session(relay: RelayHarness, session_id: str) -> bool:
    return session_id in relay.relay.registry.sessions
