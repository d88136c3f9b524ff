"""``burrow demo``: a dev relay, a web page, a tunnel to it, and a fetch through its public URL.

Everything runs in this process on loopback, with a throwaway dev CA, so
the demo needs nothing but burrow itself.
"""

from __future__ import annotations

import dataclasses
import http.server
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlsplit

import click

import burrow
from burrow.agent.client import runtime
from burrow.net import tls
from burrow.relay import dev
from burrow.relay.process import RelayThread
from burrow.relay.server import Relay
from burrow.wire import names

PAGE = b"<!doctype html><title>burrow</title><h1>Hello from behind a burrow tunnel</h1>\n"


class _PageHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _page_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def _dev_relay(state_dir: Path) -> Iterator[tuple[Relay, dev.DevRelay]]:
    prepared = dev.prepare(state_dir, 0, (20000, 29999))
    config = dataclasses.replace(prepared.config, listen=(("127.0.0.1", 0),))
    relay_thread = RelayThread(config, name="burrow-demo-relay")
    relay = relay_thread.start()
    try:
        yield relay, prepared
    finally:
        # The agent's session first: it would take the relay going away for a
        # lost session and set about reconnecting.
        runtime.run(runtime.close_all())
        relay_thread.stop()


def fetch(url: str, ca: Path) -> tuple[int, bytes]:
    """GET ``url`` over TLS trusting ``ca``; ``*.localhost`` goes to loopback."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or 443
    context = tls.client_context(ca, ["http/1.1"])
    with (
        socket.create_connection((names.resolve_host(host), port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        sock.sendall(f"GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def run_demo(*, keep: bool = False) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="burrow-demo-") as tmp,
        _dev_relay(Path(tmp)) as (
            relay,
            prepared,
        ),
        _page_server() as port,
    ):
        env = prepared.env(relay.public_port)
        client = burrow.Client(
            relay=env["BURROW_RELAY"], token=env["BURROW_TOKEN"], ca=env["BURROW_CA"]
        )
        click.echo(f"dev relay for {dev.DEV_DOMAIN} on 127.0.0.1:{relay.public_port}")
        click.echo(f"local web page on http://127.0.0.1:{port}/")
        started = time.perf_counter()
        with burrow.forward(port, client=client) as tunnel:
            opened = time.perf_counter()
            click.echo(
                f"forwarded: {tunnel.url}  ({(opened - started) * 1000:.1f} ms, "
                "including the agent's first session)"
            )
            status, body = fetch(tunnel.url, prepared.ca)
            click.echo(
                f"GET {tunnel.url} -> {status} in {(time.perf_counter() - opened) * 1000:.1f} ms"
            )
            click.echo(body.decode(errors="replace").strip())
            if status != 200 or body != PAGE:
                raise click.ClickException("the page did not come back through the tunnel")
            if keep:
                click.echo(f"\nTry: curl --cacert {prepared.ca} {tunnel.url}\nCtrl-C to stop.")
                with suppress(KeyboardInterrupt):
                    threading.Event().wait()
        status, _ = fetch(tunnel.url, prepared.ca)
        click.echo(f"after the with block: GET -> {status} (the port is no longer published)")
