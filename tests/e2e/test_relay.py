"""The relay's listeners against bad input: every peer gets a clean answer or a clean close.

A real relay on loopback, real clients (curl, openssl, Python's ssl). After
each test the shared relay must still serve a tunnel that was live before
it, open a new one, and have let no exception escape onto its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from backends import (
    HttpServer,
    TcpEchoServer,
    free_port_on_both,
    http_server,
    tcp_echo_server,
)
from harness import DOMAIN, RelayHarness, run_relay

import burrow
from burrow import Tunnel, tokens
from burrow.exception import AuthError
from burrow.wire import protocol

NOT_FOUND_BODY = "burrow: no tunnel at this address\n"
PLAIN_HTTP_BODY = "burrow: this port speaks HTTPS; use https://\n"
UNKNOWN_HOST = f"zzzzzzzzzzzzzz.{DOMAIN}"

# How long the relay may take to close on a peer that broke the rules; it
# should be immediate, this only keeps a hung test from hanging the run.
CLOSE_WITHIN = 5.0

FUZZ_SEED = 20240611
FUZZ_CASES = 200


# -- a live tunnel that every test must leave working -----------------------------


@dataclass
class Live:
    relay: RelayHarness
    http: HttpServer
    tunnel: Tunnel
    echo: TcpEchoServer
    tcp_tunnel: Tunnel
    loop_errors: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture(scope="module")
def live(relay: RelayHarness) -> Iterator[Live]:
    errors: list[dict[str, Any]] = []

    def record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(context)
        loop.default_exception_handler(context)

    async def swap(handler: Any) -> Any:
        loop = asyncio.get_running_loop()
        old = loop.get_exception_handler()
        loop.set_exception_handler(handler)
        return old

    old = relay.call(swap(record))
    client = relay.client()
    try:
        with (
            http_server() as server,
            tcp_echo_server() as echo,
            burrow.forward(server.port, client=client) as tunnel,
            burrow.forward(echo.port, unencrypted=True, client=client) as tcp_tunnel,
        ):
            yield Live(relay, server, tunnel, echo, tcp_tunnel, errors)
    finally:
        relay.call(swap(old))


def assert_serves(relay: RelayHarness, server: HttpServer, tunnel: Tunnel) -> None:
    out = curl(relay, tunnel.url + "/", "--fail")
    assert out.returncode == 0, out.stderr
    assert server.marker in out.stdout


def assert_healthy(live: Live) -> None:
    relay = live.relay
    assert relay.loop.is_running()
    assert_serves(relay, live.http, live.tunnel)
    assert tcp_echo(live.tcp_tunnel.tcp_socket[1], b"still alive") == b"still alive"
    with http_server() as server, burrow.forward(server.port, client=relay.client()) as fresh:
        assert_serves(relay, server, fresh)

    async def collect() -> None:
        gc.collect()  # "Task exception was never retrieved" is reported when a task is freed

    relay.call(collect())
    assert live.loop_errors == [], live.loop_errors


@pytest.fixture(autouse=True)
def relay_survives(live: Live) -> Iterator[None]:
    yield
    assert_healthy(live)


# -- clients ----------------------------------------------------------------------


@dataclass
class CurlResult:
    returncode: int
    stdout: str
    stderr: str


def run_curl(args: list[str]) -> CurlResult:
    # Bytes, not text=True: universal newlines would hide the \r\n of HTTP heads.
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", *args], capture_output=True, timeout=30
    )
    return CurlResult(out.returncode, out.stdout.decode(), out.stderr.decode())


def curl(relay: RelayHarness, url: str, *args: str, ip: str = "127.0.0.1") -> CurlResult:
    host_port = url.split("://", 1)[1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    address = f"[{ip}]" if ":" in ip else ip
    return run_curl(
        ["--cacert", str(relay.ca), "--resolve", f"{host}:{port}:{address}", *args, url]
    )


def tcp_echo(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    with socket.create_connection((host, port), timeout=CLOSE_WITHIN) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the relay closed on us; what we read says what came back
        return read_until_closed(sock)[0]


def read_until_closed(sock: socket.socket) -> tuple[bytes, str]:
    """Everything the peer sends until it closes: (bytes, "eof" or "reset")."""
    sock.settimeout(CLOSE_WITHIN)
    received = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(received), "reset"
        except TimeoutError:
            raise AssertionError(
                f"the relay kept the connection open for {CLOSE_WITHIN}s "
                f"(received {bytes(received[:200])!r})"
            ) from None
        if not chunk:
            return bytes(received), "eof"
        received += chunk


def frame(payload: bytes | dict[str, Any]) -> bytes:
    if isinstance(payload, dict):
        payload = json.dumps(payload, separators=(",", ":")).encode()
    return struct.pack("!I", len(payload)) + payload


def parse_frames(data: bytes) -> list[dict[str, Any]]:
    frames = []
    while data:
        assert len(data) >= 4, f"truncated frame header {data!r}"
        (length,) = struct.unpack_from("!I", data)
        assert 0 < length <= protocol.MAX_FRAME_SIZE
        assert len(data) >= 4 + length, f"truncated frame {data!r}"
        frames.append(json.loads(data[4 : 4 + length]))
        data = data[4 + length :]
    return frames


class TlsProbe:
    """A blocking TLS client over a MemoryBIO, so it can half-close and keep reading."""

    def __init__(
        self,
        relay: RelayHarness,
        *,
        sni: str | None = DOMAIN,
        alpn: list[str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        context = ssl.create_default_context(cafile=str(relay.ca))
        if sni is None:
            context.check_hostname = False
        if alpn:
            context.set_alpn_protocols(alpn)
        self.sock = socket.create_connection((host, port or relay.port), timeout=CLOSE_WITHIN)
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname=sni)
        self.tcp_eof = False

    def __enter__(self) -> TlsProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _flush(self) -> None:
        if self._out.pending:
            self.sock.sendall(self._out.read())

    def _fill(self) -> None:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the relay said nothing for {CLOSE_WITHIN}s") from None
        if data:
            self._in.write(data)
        else:
            self.tcp_eof = True
            self._in.write_eof()

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
                continue
            self._flush()
            return

    def send(self, data: bytes) -> None:
        if data:
            self.tls.write(data)
        self._flush()

    def close_notify(self) -> None:
        """End our side the TLS way (TLS 1.3 half-close); we can still read."""
        with contextlib.suppress(ssl.SSLError):
            self.tls.unwrap()
        self._flush()

    def shutdown_write(self) -> None:
        """End our side with a bare TCP FIN, no close_notify."""
        self.sock.shutdown(socket.SHUT_WR)

    def read_until_closed(self) -> tuple[bytes, str]:
        """Application bytes until the relay ends the connection, and how it ended."""
        received = bytearray()
        while True:
            try:
                data = self.tls.read(65536)
            except ssl.SSLWantReadError:
                try:
                    self._fill()
                except ConnectionResetError:
                    return bytes(received), "reset"
                continue
            except ssl.SSLZeroReturnError:
                return bytes(received), "close_notify"
            except ssl.SSLError as exc:
                if self.tcp_eof:
                    return bytes(received), "eof"
                # A fatal alert, then the close: how the relay answers a bare
                # TCP FIN (OpenSSL calls it a decode_error, a truncation attack).
                return bytes(received), f"alert {exc.reason}"
            if not data:
                return bytes(received), "eof"
            received += data


def error_then_close(probe: TlsProbe) -> dict[str, Any]:
    """The one error frame the relay sends before it closes."""
    data, _ = probe.read_until_closed()
    frames = parse_frames(data)
    assert len(frames) == 1, frames
    assert frames[0]["type"] == "error", frames
    assert "id" not in frames[0]
    assert isinstance(frames[0]["message"], str)
    return frames[0]


def hello(token: str, version: int = protocol.PROTOCOL_VERSION) -> bytes:
    return frame({"type": "hello", "version": version, "token": token, "agent": "probe"})


async def _first_session(relay: RelayHarness) -> tuple[str, str]:
    session = next(iter(relay.relay.registry.sessions.values()))
    return session.id, session.key


# -- visitors on the public TLS port ------------------------------------------------


def test_unknown_label_gets_404(live: Live) -> None:
    out = curl(live.relay, f"https://{UNKNOWN_HOST}:{live.relay.port}/", "-i")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 404 Not Found\r\n")
    assert out.stdout.endswith("\r\n\r\n" + NOT_FOUND_BODY)


def test_unknown_label_gets_404_while_the_visitor_is_still_sending(
    live: Live, tmp_path: Path
) -> None:
    """A webhook POSTing 64 MiB to a dead URL reads the 404, not a reset: the relay drops
    the body it will never use instead of closing on it (which resets the connection)."""
    body = tmp_path / "body"
    body.write_bytes(random.Random(5).randbytes(64 * 1024 * 1024))
    url = f"https://{UNKNOWN_HOST}:{live.relay.port}/hook"
    # "Expect:" makes curl send the body at once instead of waiting for a 100.
    out = curl(live.relay, url, "-i", "-H", "Expect:", "--data-binary", f"@{body}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 404 Not Found\r\n")
    assert out.stdout.endswith("\r\n\r\n" + NOT_FOUND_BODY)


def test_label_that_is_not_a_burrow_label_gets_404(live: Live) -> None:
    out = curl(live.relay, f"https://not-a-label.{DOMAIN}:{live.relay.port}/", "-i")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 404 Not Found\r\n")


def test_closed_tunnel_gets_404(live: Live) -> None:
    with http_server() as server, burrow.forward(server.port, client=live.relay.client()) as t:
        assert_serves(live.relay, server, t)
    out = curl(live.relay, t.url + "/", "-i")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 404 Not Found\r\n")


def test_relay_name_with_a_web_alpn_gets_404(live: Live) -> None:
    # The relay's own name is for agents; a browser landing there gets a plain answer.
    out = curl(live.relay, f"https://{DOMAIN}:{live.relay.port}/", "-i")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 404 Not Found\r\n")


def test_no_sni_is_refused(live: Live) -> None:
    with TlsProbe(live.relay, sni=None) as probe:
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            probe.handshake()
        assert read_until_closed(probe.sock)[0] == b""


def test_no_sni_is_refused_by_openssl_cli(live: Live) -> None:
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{live.relay.port}", "-noservername"],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0
    assert "unrecognized name" in out.stderr


@pytest.mark.parametrize(
    "name", ["evil.example.com", f"a.b.{DOMAIN}", f"{DOMAIN}.evil.com", "localhost"]
)
def test_foreign_sni_is_refused(live: Live, name: str) -> None:
    with TlsProbe(live.relay, sni=name) as probe:
        probe.tls.context.check_hostname = False
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            probe.handshake()
        assert read_until_closed(probe.sock)[0] == b""


def test_plain_http_on_the_tls_port(live: Live) -> None:
    out = run_curl(["-i", f"http://{DOMAIN}:{live.relay.port}/"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 400 Bad Request\r\n")
    assert out.stdout.endswith("\r\n\r\n" + PLAIN_HTTP_BODY)


def test_plain_http_gets_a_well_formed_answer_then_close(live: Live) -> None:
    with socket.create_connection(("127.0.0.1", live.relay.port), timeout=CLOSE_WITHIN) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: r1.localhost\r\n\r\n")
        data, _ = read_until_closed(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert headers[b"connection"] == b"close"
    assert int(headers[b"content-length"]) == len(body)
    assert body == PLAIN_HTTP_BODY.encode()


# -- agents: control connections ----------------------------------------------------------


def control_probe(relay: RelayHarness) -> TlsProbe:
    probe = TlsProbe(relay, alpn=[protocol.ALPN_CONTROL])
    probe.handshake()
    assert probe.tls.selected_alpn_protocol() == protocol.ALPN_CONTROL
    return probe


def data_probe(relay: RelayHarness) -> TlsProbe:
    probe = TlsProbe(relay, alpn=[protocol.ALPN_DATA])
    probe.handshake()
    assert probe.tls.selected_alpn_protocol() == protocol.ALPN_DATA
    return probe


BAD_FIRST_FRAMES = {
    "zero-length": b"\x00\x00\x00\x00",
    "huge-length": struct.pack("!I", protocol.MAX_FRAME_SIZE + 1) + b"x" * 64,
    "max-length-u32": b"\xff\xff\xff\xff",
    "invalid-json": frame(b"{not json"),
    "not-utf8": frame(b"\xff\xfe\xfd"),
    "json-array": frame(b"[1,2,3]"),
    "unknown-type": frame({"type": "bogus"}),
    "no-type": frame({"version": protocol.PROTOCOL_VERSION}),
    "ping-first": frame({"type": "ping", "seq": 1}),
    "open-first": frame({"type": "open", "id": 1, "local_port": 80, "tcp": False, "h2": False}),
    "bool-version": frame({"type": "hello", "version": True, "token": "x", "agent": "a"}),
    "string-token-missing": frame(
        {"type": "hello", "version": protocol.PROTOCOL_VERSION, "agent": "a"}
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FIRST_FRAMES))
def test_control_bad_first_frame(live: Live, name: str) -> None:
    with control_probe(live.relay) as probe:
        probe.send(BAD_FIRST_FRAMES[name])
        assert error_then_close(probe)["code"] == protocol.CODE_PROTOCOL


@pytest.mark.parametrize("probe_of", ["control", "data"])
def test_refused_peer_that_keeps_sending_still_reads_the_error(live: Live, probe_of: str) -> None:
    """The relay reads and drops what a refused peer still sends, then closes cleanly;
    closing on unread input would reset the connection and destroy the error frame."""
    opener = control_probe if probe_of == "control" else data_probe
    with opener(live.relay) as probe:
        probe.send(BAD_FIRST_FRAMES["unknown-type"] + b"\0" * (4 * 1024 * 1024))
        data, how = probe.read_until_closed()
    assert how != "reset"
    assert parse_frames(data)[0]["code"] == protocol.CODE_PROTOCOL


def test_control_attach_is_the_wrong_first_message(live: Live) -> None:
    with control_probe(live.relay) as probe:
        probe.send(frame({"type": "attach", "session": "s", "key": "k"}))
        assert error_then_close(probe)["code"] == protocol.CODE_PROTOCOL


def test_control_bad_token(live: Live) -> None:
    stranger = tokens.mint(tokens.generate_signing_key(), subject="x", ttl_seconds=60)
    for token in (stranger, "garbage", ""):
        with control_probe(live.relay) as probe:
            probe.send(hello(token))
            error = error_then_close(probe)
            assert error["code"] == protocol.CODE_AUTH, error
            assert "token" in error["message"]


def test_control_wrong_version(live: Live) -> None:
    with control_probe(live.relay) as probe:
        probe.send(hello(live.relay.token, version=protocol.PROTOCOL_VERSION + 1))
        error = error_then_close(probe)
        assert error["code"] == protocol.CODE_VERSION


def test_bad_token_through_the_client(live: Live) -> None:
    stranger = tokens.mint(tokens.generate_signing_key(), subject="x", ttl_seconds=60)
    before = len(live.relay.relay.registry.sessions)
    with pytest.raises(AuthError, match="which this relay does not hold"):  # noqa: SIM117
        with burrow.forward(8000, client=live.relay.client(token=stranger)):
            pass
    assert len(live.relay.relay.registry.sessions) == before


def test_control_protocol_error_after_welcome(live: Live) -> None:
    with control_probe(live.relay) as probe:
        probe.send(hello(live.relay.token))
        probe.send(
            frame(
                {
                    "type": "hello",
                    "version": protocol.PROTOCOL_VERSION,
                    "token": "x",
                    "agent": "again",
                }
            )
        )
        frames = parse_frames(probe.read_until_closed()[0])
    assert frames[0]["type"] == "welcome"
    assert frames[-1]["type"] == "error"
    assert frames[-1]["code"] == protocol.CODE_PROTOCOL


@pytest.mark.parametrize("how", ["close_notify", "tcp_fin"])
def test_control_truncated_frame_then_close(live: Live, how: str) -> None:
    with control_probe(live.relay) as probe:
        probe.send(hello(live.relay.token)[:10])
        if how == "close_notify":
            probe.close_notify()
        else:
            probe.shutdown_write()
        data, _ = probe.read_until_closed()
    assert data == b"" or parse_frames(data)[-1]["code"] == protocol.CODE_PROTOCOL


@pytest.mark.parametrize("how", ["close_notify", "tcp_fin"])
def test_control_closed_before_any_frame(live: Live, how: str) -> None:
    with control_probe(live.relay) as probe:
        if how == "close_notify":
            probe.close_notify()
        else:
            probe.shutdown_write()
        data, _ = probe.read_until_closed()
    assert data == b""


# -- agents: data connections -----------------------------------------------------------


def test_data_unknown_session(live: Live) -> None:
    with data_probe(live.relay) as probe:
        probe.send(frame({"type": "attach", "session": "no-such-session", "key": "k"}))
        error = error_then_close(probe)
    assert error["code"] == protocol.CODE_BAD_ATTACH


def test_data_wrong_key(live: Live) -> None:
    session_id, key = live.relay.call(_first_session(live.relay))
    with data_probe(live.relay) as probe:
        probe.send(frame({"type": "attach", "session": session_id, "key": key[:-1] + "!"}))
        error = error_then_close(probe)
    assert error["code"] == protocol.CODE_BAD_ATTACH


@pytest.mark.parametrize("name", sorted(BAD_FIRST_FRAMES))
def test_data_bad_first_frame(live: Live, name: str) -> None:
    with data_probe(live.relay) as probe:
        probe.send(BAD_FIRST_FRAMES[name])
        assert error_then_close(probe)["code"] == protocol.CODE_PROTOCOL


def test_data_hello_is_the_wrong_first_message(live: Live) -> None:
    with data_probe(live.relay) as probe:
        probe.send(hello(live.relay.token))
        assert error_then_close(probe)["code"] == protocol.CODE_PROTOCOL


@pytest.mark.parametrize("how", ["close_notify", "tcp_fin"])
def test_data_truncated_frame_then_close(live: Live, how: str) -> None:
    with data_probe(live.relay) as probe:
        probe.send(frame({"type": "attach", "session": "s", "key": "k"})[:7])
        if how == "close_notify":
            probe.close_notify()
        else:
            probe.shutdown_write()
        data, _ = probe.read_until_closed()
    assert data == b"" or parse_frames(data)[-1]["code"] == protocol.CODE_PROTOCOL


async def _pooled_peers(relay: RelayHarness) -> set[str]:
    return {
        channel.stream.peername
        for session in relay.relay.registry.sessions.values()
        for channel in session._pool
    }


def _wait_until_pooled(relay: RelayHarness, probe: TlsProbe) -> None:
    host, port = probe.sock.getsockname()[:2]
    deadline = time.monotonic() + CLOSE_WITHIN
    while f"{host}:{port}" not in relay.call(_pooled_peers(relay)):
        assert time.monotonic() < deadline, "the data connection never reached the pool"
        time.sleep(0.01)


def _welcome(probe: TlsProbe) -> dict[str, Any]:
    """The welcome the relay answers a hello with."""
    received = bytearray()
    while len(received) < 4 or len(received) < 4 + struct.unpack("!I", received[:4])[0]:
        try:
            received += probe.tls.read(65536)
        except ssl.SSLWantReadError:
            probe._fill()
    (welcome,) = parse_frames(bytes(received))
    assert welcome["type"] == "welcome", welcome
    return welcome


def test_pooled_data_connection_that_speaks_is_dropped(live: Live) -> None:
    # A session of its own, whose pool has room (a full pool closes what comes
    # beyond it): the connection joins the pool, where it may not speak.
    control = control_probe(live.relay)
    control.send(hello(live.relay.token))
    welcome = _welcome(control)
    session_id, key = welcome["session"], welcome["key"]
    with data_probe(live.relay) as probe:
        host, port = probe.sock.getsockname()[:2]
        probe.send(frame({"type": "attach", "session": session_id, "key": key}))
        _wait_until_pooled(live.relay, probe)
        probe.send(b"unexpected bytes before bind")
        data, _ = probe.read_until_closed()
    assert data == b""
    assert f"{host}:{port}" not in live.relay.call(_pooled_peers(live.relay))
    control.sock.close()


def test_data_connection_that_speaks_with_its_attach_is_dropped(own_relay: RelayHarness) -> None:
    # The same bytes, but in the attach's own record: they must not slip past the
    # check, and the broken connection must never be handed to a visitor.
    with (
        tcp_echo_server() as echo,
        burrow.forward(echo.port, unencrypted=True, client=own_relay.client()) as tunnel,
    ):
        session_id, key = own_relay.call(_first_session(own_relay))
        bad = frame({"type": "attach", "session": session_id, "key": key}) + b"unexpected bytes"

        # A broken agent that sends this and goes away: no later visitor may get its connection.
        with data_probe(own_relay) as gone:
            gone.send(bad)
        visitors = [b"visitor %d" % i for i in range(own_relay.relay.config.pool_size + 2)]
        assert [tcp_echo(tunnel.tcp_socket[1], v) for v in visitors] == visitors

        # One that stays: the relay closes it.
        with data_probe(own_relay) as probe:
            host, port = probe.sock.getsockname()[:2]
            probe.send(bad)
            data, _ = probe.read_until_closed()
        assert data == b""
        assert f"{host}:{port}" not in own_relay.call(_pooled_peers(own_relay))


# -- fuzz: a few hundred random and truncated inputs per listener ---------------------


def _client_hello() -> bytes:
    context = ssl.create_default_context()
    context.set_alpn_protocols([protocol.ALPN_CONTROL])
    out = ssl.MemoryBIO()
    obj = context.wrap_bio(ssl.MemoryBIO(), out, server_hostname=DOMAIN)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        if out:
            out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def _pre_handshake_input(rng: random.Random, hello_bytes: bytes) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 2048))
    if kind == 1:
        return b"\x16\x03\x01" + rng.randbytes(rng.randint(0, 600))
    if kind == 2:
        return hello_bytes[: rng.randint(1, len(hello_bytes) - 1)]
    if kind == 3:
        return _mutate(rng, hello_bytes)
    return hello_bytes + rng.randbytes(rng.randint(1, 300))


def _random_json(rng: random.Random) -> Any:
    choices: list[Any] = [
        None,
        True,
        0,
        -1,
        2**63,
        1.5,
        "",
        "x" * rng.randint(0, 50),
        "\ud800",
        [],
        {},
    ]
    return rng.choice(choices)


def _frame_input(rng: random.Random, known: list[bytes]) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randint(1, 512))
    if kind == 1:
        return frame(rng.randbytes(rng.randint(1, 256)))
    if kind == 2:
        msg_type = rng.choice(
            ["hello", "welcome", "open", "attach", "bind", "ping", "pong", "error", "x"]
        )
        body = {"type": msg_type}
        for name in ("version", "token", "agent", "session", "key", "id", "seq", "port"):
            if rng.random() < 0.5:
                body[name] = _random_json(rng)
        return frame(json.dumps(body).encode())
    if kind == 3:
        whole = rng.choice(known)
        return whole[: rng.randint(1, len(whole) - 1)]
    if kind == 4:
        return _mutate(rng, rng.choice(known))
    if kind == 5:
        return rng.choice(known) + rng.randbytes(rng.randint(1, 64))
    return struct.pack("!I", rng.randint(0, 2**32 - 1)) + rng.randbytes(rng.randint(0, 64))


# A server name that is not ASCII never reaches our SNI callback: CPython's ssl
# refuses it with an internal_error alert and reports the UnicodeDecodeError to
# sys.unraisablehook (stderr), which pytest shows as a warning. The peer is still
# refused and closed, which is what this test checks.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_fuzz_public_port_before_the_handshake(live: Live) -> None:
    rng = random.Random(FUZZ_SEED)
    hello_bytes = _client_hello()
    for case in range(FUZZ_CASES):
        data = _pre_handshake_input(rng, hello_bytes)
        with socket.create_connection(("127.0.0.1", live.relay.port), timeout=CLOSE_WITHIN) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except (BrokenPipeError, ConnectionResetError):
                continue  # the relay already refused it
            try:
                read_until_closed(s)
            except AssertionError as exc:
                raise AssertionError(f"case {case}: {data[:80]!r}: {exc}") from None


@pytest.mark.parametrize("alpn", [protocol.ALPN_CONTROL, protocol.ALPN_DATA])
def test_fuzz_agent_connections_after_the_handshake(live: Live, alpn: str) -> None:
    rng = random.Random(f"{FUZZ_SEED}-{alpn}")
    session_id, _ = live.relay.call(_first_session(live.relay))
    known = [
        hello(live.relay.token),
        hello("garbage"),
        frame({"type": "attach", "session": session_id, "key": "wrong"}),
        frame({"type": "ping", "seq": 1}),
        frame({"type": "open", "id": 1, "local_port": 80, "tcp": True, "h2": False}),
    ]
    for case in range(FUZZ_CASES):
        data = _frame_input(rng, known)
        with TlsProbe(live.relay, alpn=[alpn]) as probe:
            probe.handshake()
            try:
                probe.send(data)
                probe.shutdown_write()
                received, _ = probe.read_until_closed()
            except (BrokenPipeError, ConnectionResetError):
                continue
            except AssertionError as exc:
                raise AssertionError(f"case {case}: {data[:80]!r}: {exc}") from None
        frames = parse_frames(received)
        if frames and frames[0]["type"] == "welcome":
            frames = frames[1:]  # our fuzz may open a real session with the real token
        assert all(f["type"] in ("error", "dial", "ping", "opened") for f in frames), frames
        assert all(f["code"] != "" for f in frames if f["type"] == "error")


def test_fuzz_raw_tcp_tunnel(live: Live) -> None:
    rng = random.Random(f"{FUZZ_SEED}-tcp")
    port = live.tcp_tunnel.tcp_socket[1]
    for _ in range(FUZZ_CASES):
        data = rng.choice(
            [
                rng.randbytes(rng.randint(1, 4096)),
                frame({"type": "bind", "id": 1, "visitor": "x"}),
                b"\x16\x03\x01" + rng.randbytes(100),
                b"GET / HTTP/1.1\r\n\r\n",
            ]
        )
        assert tcp_echo(port, data) == data


# -- slow and idle peers ------------------------------------------------------------------


def test_silent_peer_is_closed_after_the_handshake_timeout(tmp_path: Path) -> None:
    """Closed (read_until_closed fails after CLOSE_WITHIN otherwise), and not before the
    timeout: the relay's clock starts after our connect, so at least 0.5 s from before it."""
    with run_relay(tmp_path / "relay", handshake_timeout=0.5) as relay:
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=CLOSE_WITHIN) as sock:
            assert read_until_closed(sock)[0] == b""
            elapsed = time.monotonic() - start
        assert elapsed >= 0.5, elapsed
        # Half a ClientHello, then nothing: the same.
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=CLOSE_WITHIN) as sock:
            sock.sendall(_client_hello()[:40])
            read_until_closed(sock)
            elapsed = time.monotonic() - start
        assert elapsed >= 0.5, elapsed
        with http_server() as server, burrow.forward(server.port, client=relay.client()) as t:
            assert_serves(relay, server, t)


def test_flood_of_idle_connections_does_not_stop_visitors(live: Live) -> None:
    idle: list[socket.socket] = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", live.relay.port), timeout=5))
        for sock in idle[::2]:
            sock.sendall(_client_hello()[:40])  # half of them stall mid-handshake
        assert_serves(live.relay, live.http, live.tunnel)
        assert tcp_echo(live.tcp_tunnel.tcp_socket[1], b"through the flood") == (
            b"through the flood"
        )
    finally:
        for sock in idle:
            sock.close()


# -- IPv6 ---------------------------------------------------------------------------------


def test_ipv6_visitor(tmp_path: Path) -> None:
    port = free_port_on_both()
    # ::1 first: the relay's public port is its first listener's. The agent
    # reaches r1.localhost at 127.0.0.1; the visitor comes over [::1].
    with run_relay(tmp_path / "relay", listen=(("::1", port), ("127.0.0.1", port))) as relay:
        assert relay.relay.public_port == port
        with (
            http_server() as server,
            tcp_echo_server() as echo,
            burrow.forward(server.port, client=relay.client()) as tunnel,
            burrow.forward(echo.port, unencrypted=True, client=relay.client()) as tcp,
        ):
            out = curl(relay, tunnel.url + "/", "--fail", "-w", "%{remote_ip}", ip="::1")
            assert out.returncode == 0, out.stderr
            assert server.marker in out.stdout
            assert out.stdout.endswith("::1")
            assert tcp_echo(tcp.tcp_socket[1], b"over v6", host="::1") == b"over v6"
            out = curl(relay, f"https://{UNKNOWN_HOST}:{port}/", "-i", ip="::1")
            assert out.stdout.endswith(NOT_FOUND_BODY), out
