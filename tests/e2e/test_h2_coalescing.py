"""HTTP/2 connection coalescing must not cross tenants.

All tunnels share one wildcard certificate and one address, so an HTTP/2
client may send a request for tenant A's name on a connection it opened to
tenant B's name (RFC 9113 §9.1.1); Chromium does. The relay reads each
request's ``:authority`` and answers ``421 Misdirected Request`` when it is
not the connection's name, and B's server never sees the request.

Real relay, two tenants (two tokens), real h2 agents and hypercorn (h2c)
backends; visitors are curl, h2load and headless Chromium.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from backends import _async_server_thread
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived, StreamEnded, StreamReset
from harness import RelayHarness

import burrow
from burrow import Tunnel
from burrow.wire import h2

TIMEOUT = 30.0
CURL = shutil.which("curl")
H2LOAD = shutil.which("h2load")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CERTUTIL = shutil.which("certutil")

# A 1x1 transparent GIF, so that <img> has something to decode.
PIXEL = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)
SESSION_COOKIE = "sid"


# -- a backend that remembers every request ----------------------------------------


@dataclass
class Seen:
    path: str
    authority: str
    cookie: str
    http_version: str


@dataclass
class App:
    """An h2c (hypercorn) server that logs each request and can set a cookie."""

    marker: str
    port: int = 0
    requests: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    page: str = ""  # the HTML of "/", if not the default

    def seen(self) -> list[Seen]:
        with self.lock:
            return list(self.requests)

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        path: str = scope["path"]
        with self.lock:
            self.requests.append(
                Seen(
                    path=path,
                    authority=headers.get("host", ""),
                    cookie=headers.get("cookie", ""),
                    http_version=scope["http_version"],
                )
            )
        extra: list[tuple[bytes, bytes]] = []
        content_type = b"text/html; charset=utf-8"
        if path == "/pixel.gif":
            body, content_type = PIXEL, b"image/gif"
        elif path == "/login":
            body = f"<p id=marker>{self.marker} logged in</p>".encode()
            extra.append(
                (
                    b"set-cookie",
                    f"{SESSION_COOKIE}=secret-of-{self.marker}; Max-Age=3600; Path=/; "
                    "HttpOnly; Secure; SameSite=Lax".encode(),
                )
            )
        else:
            body = (self.page or f"<p id=marker>{self.marker}</p>").encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                    *extra,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def h2c_app(marker: str) -> Iterator[App]:
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    app = App(marker=marker)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port: int = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.detach()}"]
    config.accesslog = None
    config.loglevel = "WARNING"
    config.graceful_timeout = 1.0

    async def run(stop: asyncio.Event, started: Callable[[int], None]) -> None:
        server = asyncio.ensure_future(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
        started(port)
        await server

    with _async_server_thread(f"h2c-{marker}", run):
        app.port = port
        yield app


@dataclass
class Tenant:
    app: App
    tunnel: Tunnel


@pytest.fixture
def tenants(relay: RelayHarness) -> Iterator[tuple[Tenant, Tenant]]:
    """Tenant A and tenant B: two tokens, each with an h2 tunnel to its own app."""
    with (
        h2c_app("alpha") as app_a,
        h2c_app("bravo") as app_b,
        burrow.forward(
            app_a.port, h2_enabled=True, client=relay.client(relay.mint(subject="tenant-a"))
        ) as tunnel_a,
        burrow.forward(
            app_b.port, h2_enabled=True, client=relay.client(relay.mint(subject="tenant-b"))
        ) as tunnel_b,
    ):
        yield Tenant(app_a, tunnel_a), Tenant(app_b, tunnel_b)


def curl_on(relay: RelayHarness, via: Tunnel, *args: str) -> subprocess.CompletedProcess[str]:
    """curl over HTTP/2 on a connection whose SNI is ``via``'s name."""
    assert CURL
    return subprocess.run(
        [
            CURL, "-sS", "--http2", "--cacert", str(relay.ca),
            "--resolve", f"{via.host}:{via.port}:127.0.0.1",
            "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
            *args,
        ],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip


# -- curl and h2load ---------------------------------------------------------------


def test_curl_with_another_tenants_authority_gets_421(
    relay: RelayHarness, tenants: tuple[Tenant, Tenant]
) -> None:
    a, b = tenants
    # The right name on B's connection reaches B.
    ok = curl_on(relay, b.tunnel, b.tunnel.url + "/")
    assert ok.stdout == "200 2", ok
    assert [s.authority for s in b.app.seen()] == [f"{b.tunnel.host}:{b.tunnel.port}"]
    # A's name on a connection whose SNI is B's: 421, and B's server sees nothing.
    wrong = curl_on(relay, b.tunnel, b.tunnel.url + "/", "-H", f"Host: {a.tunnel.host}")
    assert wrong.stdout == "421 2", wrong
    with_port = curl_on(
        relay, b.tunnel, b.tunnel.url + "/", "-H", f"Host: {a.tunnel.host}:{a.tunnel.port}"
    )
    assert with_port.stdout == "421 2", with_port
    assert len(b.app.seen()) == 1
    assert a.app.seen() == []
    # Case and a trailing dot do not make a name another one.
    same = curl_on(
        relay, b.tunnel, b.tunnel.url + "/", "-H", f"Host: {b.tunnel.host.upper()}.:{b.tunnel.port}"
    )
    assert same.stdout == "200 2", same
    assert len(b.app.seen()) == 2


def test_h2load_with_a_wrong_authority_gets_only_421s(
    relay: RelayHarness, tenants: tuple[Tenant, Tenant]
) -> None:
    assert H2LOAD, "needs h2load (Debian package nghttp2-client; scripts/test installs it)"
    a, b = tenants
    out = subprocess.run(
        [
            H2LOAD, "-n", "200", "-c", "2", "-m", "10",
            f"--connect-to=127.0.0.1:{b.tunnel.port}",
            "-H", f":authority: {a.tunnel.host}:{a.tunnel.port}",
            b.tunnel.url + "/",
        ],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    # The SNI is B's (from the URL), every :authority A's: all refused.
    status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out.stdout)
    assert status, out.stdout + out.stderr
    assert status.groups() == ("0", "0", "200", "0"), out.stdout
    # (h2load counts a 4xx as failed: what matters is that every request got its answer.)
    assert "200 done" in out.stdout and "0 errored, 0 timeout" in out.stdout, out.stdout
    assert b.app.seen() == [] and a.app.seen() == []
    # The same connections with B's own authority are served by B.
    fine = subprocess.run(
        [
            H2LOAD, "-n", "50", "-c", "2", "-m", "10",
            f"--connect-to=127.0.0.1:{b.tunnel.port}", b.tunnel.url + "/",
        ],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert "status codes: 50 2xx" in fine.stdout, fine.stdout
    assert len(b.app.seen()) == 50 and a.app.seen() == []


# -- the browser -------------------------------------------------------------------


def chromium(home: Path, profile: Path, relay: RelayHarness) -> Any:
    """Headless Chromium that trusts the relay's dev CA (NSS database under ``home``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    nssdb = home / ".pki" / "nssdb"
    if not nssdb.exists():
        nssdb.mkdir(parents=True)
        assert CERTUTIL
        subprocess.run(
            [CERTUTIL, "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True, timeout=30
        )
        subprocess.run(
            [CERTUTIL, "-A", "-d", f"sql:{nssdb}", "-n", "burrow dev CA", "-t", "C,,",
             "-i", str(relay.ca)],
            check=True, timeout=30,
        )  # fmt: skip
    options = webdriver.ChromeOptions()
    assert CHROMIUM
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    service = Service(
        executable_path=CHROMEDRIVER,
        env={**os.environ, "HOME": str(home)},
        log_output=str(home / "chromedriver.log"),
    )
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(TIMEOUT)
    return driver


def test_chromium_never_sends_one_tenants_cookie_to_another(
    relay: RelayHarness,
    tenants: tuple[Tenant, Tenant],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert CHROMIUM and CHROMEDRIVER and CERTUTIL, (
        "needs the Debian packages chromium, chromium-driver and libnss3-tools"
    )
    from selenium.webdriver.support.ui import WebDriverWait

    # The relay runs in this process: count its refusals, to know that Chromium
    # really coalesced (else this test would prove nothing).
    refused: list[str] = []
    refuse = h2.Inspector._refuse

    def counted(self: h2.Inspector, stream_id: int, *, sending: bool) -> None:
        refused.append(self.server_name)
        refuse(self, stream_id, sending=sending)

    monkeypatch.setattr(h2.Inspector, "_refuse", counted)
    a, b = tenants
    pixel_of_a = f"{a.tunnel.url}/pixel.gif"
    b.app.page = f'<p id=marker>bravo</p><img id=pic src="{pixel_of_a}">'
    home, profile = tmp_path / "home", tmp_path / "profile"

    # The victim logs in to A: A's app sets a host-only, HttpOnly, Secure cookie.
    driver = chromium(home, profile, relay)
    try:
        driver.get(f"{a.tunnel.url}/login")
        assert "alpha logged in" in driver.page_source
    finally:
        driver.quit()  # the persistent cookie stays in the profile; the connection goes
    assert "/login" in [s.path for s in a.app.seen()]

    # Later the victim visits B's page, which shows an image from A's origin. With
    # B's HTTP/2 connection open, Chromium sends the image request for A's name on
    # it (same certificate, same address).
    driver = chromium(home, profile, relay)
    try:
        driver.get(b.tunnel.url + "/")
        assert "bravo" in driver.page_source
        WebDriverWait(driver, TIMEOUT, poll_frequency=0.05).until(
            lambda d: d.execute_script(
                "const i = document.getElementById('pic'); return i.complete && i.naturalWidth > 0"
            )
        )
    finally:
        driver.quit()

    # B's server got no cookie of A's, and saw only B's page, on B's name.
    seen_b = b.app.seen()
    assert all("secret-of-alpha" not in s.cookie for s in seen_b), seen_b
    assert all(s.authority.split(":")[0] == b.tunnel.host for s in seen_b), seen_b
    assert [s.path for s in seen_b if s.path != "/favicon.ico"] == ["/"], seen_b
    # The browser then got A's image from A, with A's cookie, over HTTP/2.
    pixel = [s for s in a.app.seen() if s.path == "/pixel.gif"]
    assert pixel and all(s.http_version == "2" for s in pixel), a.app.seen()
    assert f"{SESSION_COOKIE}=secret-of-alpha" in pixel[-1].cookie
    # ... after Chromium had tried B's connection for it and got 421.
    assert b.tunnel.host in refused, "Chromium did not coalesce: the scenario did not happen"


# -- one connection, several requests -------------------------------------------------

Request = tuple[int, list[tuple[bytes, bytes]], bytes]


def h2_exchange(relay: RelayHarness, via: Tunnel, requests: list[Request]) -> dict[int, bytes]:
    """Send ``requests`` (stream, headers, body) on one HTTP/2 connection to ``via``.

    Bodies go as flow control allows, in order; returns each stream's status.
    """
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    bodies = {stream: body for stream, _, body in requests if body}
    for stream, headers, body in requests:
        conn.send_headers(stream, headers, end_stream=not body)
    statuses: dict[int, bytes] = {}
    ended: set[int] = set()

    def send_bodies() -> None:
        for stream, body in list(bodies.items()):
            if stream in ended:
                del bodies[stream]
                continue
            while body and (n := min(conn.local_flow_control_window(stream), 16384)):
                conn.send_data(stream, body[:n])
                body = body[n:]
            bodies[stream] = body
            if not body:
                conn.end_stream(stream)
                del bodies[stream]

    context = ssl.create_default_context(cafile=str(relay.ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", via.port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=via.host) as sock,
    ):
        assert sock.selected_alpn_protocol() == "h2"
        while len(ended) < len(requests):
            send_bodies()
            sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            assert data, f"closed early; answers so far: {statuses}"
            for event in conn.receive_data(data):
                if isinstance(event, ResponseReceived):
                    statuses[event.stream_id] = dict(event.headers)[b":status"]
                if isinstance(event, StreamEnded | StreamReset):
                    ended.add(event.stream_id)
    return statuses


def request(tunnel: Tunnel, cookie: str, method: str = "GET") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", f"{tunnel.host}:{tunnel.port}".encode()),
        (b":path", f"/{method.lower()}".encode()),
        (b"cookie", cookie.encode()),
    ]


def test_requests_after_a_refusal_reach_the_server_as_sent(
    relay: RelayHarness, tenants: tuple[Tenant, Tenant]
) -> None:
    """A refused request changed the client's HPACK table; later ones still decode right.

    The h2 library's encoder indexes the refused request's authority and
    cookie (it indexes cookies of 20 bytes or more); the next requests refer
    to those entries, which B's server never got. The relay re-encodes them,
    so B's server reads what the client sent (without that, hypercorn fails
    to decode them and closes the connection).
    """
    a, b = tenants
    shared = "theme=dark-with-a-long-value"
    statuses = h2_exchange(
        relay,
        b.tunnel,
        [
            (1, request(a.tunnel, shared), b""),
            (3, request(b.tunnel, shared), b""),
            (5, request(b.tunnel, "b=1"), b""),
        ],
    )
    assert statuses == {1: b"421", 3: b"200", 5: b"200"}
    assert [(s.authority, s.cookie) for s in b.app.seen()] == [
        (f"{b.tunnel.host}:{b.tunnel.port}", shared),
        (f"{b.tunnel.host}:{b.tunnel.port}", "b=1"),
    ]
    assert a.app.seen() == []


def test_a_refused_upload_reaches_no_one_and_its_window_comes_back(
    relay: RelayHarness, tenants: tuple[Tenant, Tenant]
) -> None:
    """A misdirected POST takes the whole connection window; the next upload still goes.

    Stream 1 (for A, on B's connection) sends until the connection's 64 KiB
    window is spent; the relay answers 421, drops the body, and gives the
    window back, without which stream 3 could never send a byte.
    """
    a, b = tenants
    statuses = h2_exchange(
        relay,
        b.tunnel,
        [
            (1, request(a.tunnel, "sid=secret-of-alpha", "POST"), b"a" * 1024 * 1024),
            (3, request(b.tunnel, "b=1", "POST"), b"b" * 256 * 1024),
        ],
    )
    assert statuses == {1: b"421", 3: b"200"}
    assert [(s.path, s.cookie) for s in b.app.seen()] == [("/post", "b=1")]
    assert a.app.seen() == []


def test_broken_http2_is_closed_and_the_relay_serves_on(
    relay: RelayHarness, tenants: tuple[Tenant, Tenant]
) -> None:
    a, b = tenants
    context = ssl.create_default_context(cafile=str(relay.ca))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", b.tunnel.port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=b.tunnel.host) as sock,
    ):
        assert sock.selected_alpn_protocol() == "h2"
        sock.sendall(b"GET / HTTP/1.1\r\nHost: " + a.tunnel.host.encode() + b"\r\n\r\n")
        assert sock.recv(65536) == b""  # closed, nothing said
    assert b.app.seen() == [] and a.app.seen() == []
    assert curl_on(relay, b.tunnel, b.tunnel.url + "/").stdout == "200 2"
