"""The shortest path through burrow: forward a port, fetch it with curl."""

from __future__ import annotations

import subprocess

from backends import http_server
from harness import RelayHarness

import burrow


def test_https_page_through_a_tunnel(relay: RelayHarness) -> None:
    with http_server() as server, burrow.forward(server.port, client=relay.client()) as tunnel:
        out = subprocess.run(
            ["curl", "-sS", "--fail", "--cacert", str(relay.ca), tunnel.url + "/"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert server.marker in out.stdout
