"""A real relay on loopback for end-to-end tests: dev CA, signing key, tokens.

The relay runs on its own uvloop event loop in a background thread
(:class:`burrow.relay.process.RelayThread`, as ``burrow demo`` runs it), so
tests talk to it only through sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import burrow
from burrow import tokens
from burrow.agent.client import runtime
from burrow.net import devca
from burrow.relay.config import RelayConfig
from burrow.relay.process import RelayThread
from burrow.relay.server import Relay

T = TypeVar("T")

DOMAIN = "r1.localhost"


@dataclass
class RelayHarness:
    relay: Relay
    thread: RelayThread
    loop: asyncio.AbstractEventLoop
    state_dir: Path
    ca: Path
    signing_key: Any
    token: str
    plain_data: bool = False

    @property
    def port(self) -> int:
        return self.relay.bound_port

    @property
    def address(self) -> str:
        return f"{DOMAIN}:{self.port}"

    def client(self, token: str | None = None) -> burrow.Client:
        return burrow.Client(
            relay=self.address,
            token=token or self.token,
            ca=str(self.ca),
            plain_data=self.plain_data,
        )

    def mint(self, subject: str = "test", ttl_seconds: int | None = 3600, **kw: Any) -> str:
        return tokens.mint(self.signing_key, subject=subject, ttl_seconds=ttl_seconds, **kw)

    def env(self, token: str | None = None) -> dict[str, str]:
        """Environment variables for a workload process using this relay."""
        env = {
            "BURROW_RELAY": self.address,
            "BURROW_TOKEN": token or self.token,
            "BURROW_CA": str(self.ca),
        }
        if self.plain_data:
            env["BURROW_PLAIN_DATA"] = "1"
        return env

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the relay's loop (to inspect or change relay state)."""
        return self.thread.call(coro)


@contextmanager
def run_relay(state_dir: Path, **overrides: Any) -> Iterator[RelayHarness]:
    """Start a relay for ``r1.localhost`` on 127.0.0.1 port 0 (and ::1 when asked)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    certs = devca.ensure_dev_certificates(state_dir, DOMAIN)
    key = tokens.generate_signing_key()
    public_key = state_dir / "token-public.pem"
    if public_key.exists():
        public_key.unlink()
    tokens.write_public_key(key, public_key)
    config = RelayConfig(
        domain=DOMAIN,
        cert=certs.cert,
        key=certs.key,
        public_key=public_key,
        listen=(("127.0.0.1", 0),),
        tcp_ports=(20000, 29999),
    )
    config = replace(config, **overrides)

    thread = RelayThread(config, name="test-relay")
    relay = thread.start()
    harness = RelayHarness(
        relay=relay,
        thread=thread,
        loop=thread.loop,
        state_dir=state_dir,
        ca=certs.ca_cert,
        signing_key=key,
        token=tokens.mint(key, subject="test", ttl_seconds=3600),
        plain_data=config.plain_data_listen is not None,
    )
    try:
        yield harness
    finally:
        # Sessions with this relay would otherwise keep trying to reconnect to it.
        runtime.run(runtime.close_all(harness.address))
        thread.stop()


def wait_until(predicate: Callable[[], object], what: str, seconds: float = 30) -> object:
    """Poll ``predicate`` until it is true (returning its value); fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
