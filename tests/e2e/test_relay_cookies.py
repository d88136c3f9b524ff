"""Cookies between tenants' tunnels, with a real client's cookie jar (curl, which checks the
Public Suffix List).

Every tunnel is ``<label>.<domain>``: siblings under one domain. Unless that
domain is on the Public Suffix List, one tenant's app can set a cookie for the
whole domain, and browsers and curl then send it to every other tenant's app
(cookie tossing). ``__Host-`` cookies cannot be set that way. docs/security.md
says what operators and app authors should do; this shows the behaviour it
describes.
"""

from __future__ import annotations

import http.server
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from backends import http_server
from harness import DOMAIN, RelayHarness

import burrow


def _curl(relay: RelayHarness, url: str, jar: str) -> subprocess.CompletedProcess[str]:
    """A visitor with a cookie jar that it reads and writes, as a browser keeps one."""
    return subprocess.run(
        ["curl", "-sS", "--cacert", str(relay.ca), "-c", jar, "-b", jar, url],
        capture_output=True,
        text=True,
        timeout=30,
    )


@contextmanager
def _cookie_setter(cookies: list[str]) -> Iterator[int]:
    """A local app that answers every request with these ``Set-Cookie`` headers."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            for cookie in cookies:
                self.send_header("Set-Cookie", cookie)
            self.send_header("Content-Length", "3")
            self.end_headers()
            self.wfile.write(b"ok\n")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_one_tenant_can_toss_cookies_to_another_but_not_host_prefixed_ones(
    relay: RelayHarness, tmp_path: Path
) -> None:
    jar = str(tmp_path / "cookies.txt")
    tossed = [
        # A cookie for the whole relay domain: sent to every tenant's tunnel.
        f"tossed=from-b; Domain={DOMAIN}; Path=/; Secure",
        # __Host- cookies must be host-only: with a Domain, a client refuses them.
        f"__Host-sid=forged; Domain={DOMAIN}; Path=/; Secure",
        # Host-only: stays with B's own name.
        "__Host-own=b-only; Path=/; Secure",
    ]
    with (
        _cookie_setter(tossed) as b_port,
        http_server() as a_server,
        burrow.forward(b_port, client=relay.client(relay.mint("tenant-b"))) as b_tunnel,
        burrow.forward(a_server.port, client=relay.client(relay.mint("tenant-a"))) as a_tunnel,
    ):
        visited = _curl(relay, b_tunnel.url + "/", jar)
        assert visited.returncode == 0, visited.stderr
        seen = _curl(relay, a_tunnel.url + "/headers", jar)
        assert seen.returncode == 0, seen.stderr
    cookie_lines = [line for line in seen.stdout.splitlines() if line.lower().startswith("cookie")]
    cookies = " ".join(cookie_lines)
    assert "tossed=from-b" in cookies  # the finding: B's cookie reaches A's app
    assert "__Host-sid" not in cookies
    assert "__Host-own" not in cookies
