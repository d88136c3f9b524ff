"""Several relays on loopback, one agent: it picks one, holds no session on the others,
keeps its home, moves its tunnels when its relay dies, and pins a workload to one relay.

Distances (relays at 5, 20 and 50 ms) are tests/e2e/test_fleet_distance.py's, on a
network of namespaces; here every relay is as near as loopback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from backends import free_port, http_server
from devrelay import BURROW, stop
from harness import wait_until

import burrow
from burrow import fleet as burrow_fleet
from burrow import tokens
from burrow.agent.client import runtime
from burrow.net import devca
from burrow.relay.config import RelayConfig
from burrow.relay.process import RelayThread
from burrow.relay.session import RelaySession

DOMAIN = "r1.localhost"


@dataclass
class Fleet:
    ca: Path
    key: object
    threads: list[RelayThread] = field(default_factory=list)
    relays: list[str] = field(default_factory=list)
    """``host:port`` of each relay, as BURROW_RELAY lists them."""
    stopped: set[int] = field(default_factory=set)

    def kill(self, index: int) -> None:
        """Stop relay ``index`` (its sessions and connections close)."""
        self.stopped.add(index)
        self.threads[index].stop()

    def token(self, subject: str = "fleet") -> str:
        return tokens.mint(self.key, subject=subject, ttl_seconds=3600)

    def client(self, token: str | None = None) -> burrow.Client:
        return burrow.Client(relay=self.relays, token=token or self.token(), ca=self.ca)

    def env(self) -> dict[str, str]:
        return {
            "BURROW_RELAY": ",".join(self.relays),
            "BURROW_TOKEN": self.token(),
            "BURROW_CA": str(self.ca),
        }

    def sessions(self, index: int) -> int:
        if index in self.stopped:
            return 0
        thread = self.threads[index]

        async def count() -> int:
            return sum(isinstance(s, RelaySession) for s in thread.relay.registry.sessions.values())

        return thread.call(count())

    def holder(self) -> int:
        """The one relay holding a session (asserting that exactly one does)."""
        counts = [self.sessions(i) for i in range(len(self.threads))]
        assert sorted(counts) == [0] * (len(counts) - 1) + [1], counts
        return counts.index(1)


@contextmanager
def fleet(
    tmp_path: Path, count: int = 3, *, document: bool = False, **overrides: Any
) -> Iterator[Fleet]:
    """``count`` relays for r1.localhost on 127.0.0.1, with one CA and one token key;
    with ``document``, each reads a fleet document listing them all (its ports are
    picked before the relays start); ``overrides`` go to every RelayConfig."""
    certs = devca.ensure_dev_certificates(tmp_path / "ca", DOMAIN)
    key = tokens.generate_signing_key()
    public = tmp_path / "token-public.pem"
    tokens.write_public_key(key, public)
    made = Fleet(certs.ca_cert, key)
    ports = [free_port() for _ in range(count)]
    fleet_file = None
    if document:
        fleet_file = tmp_path / "fleet.jws"
        fleet_file.write_text(
            burrow_fleet.sign(
                key,  # type: ignore[arg-type]
                serial=1,
                expires=int(time.time()) + 3600,
                relays=[
                    burrow_fleet.FleetRelay(f"r{i}", f"{DOMAIN}:{port}")
                    for i, port in enumerate(ports)
                ],
            )
        )
    try:
        for i in range(count):
            config = RelayConfig(
                domain=DOMAIN,
                cert=certs.cert,
                key=certs.key,
                public_key=public,
                listen=(("127.0.0.1", ports[i]),),
                tcp_ports=(21000 + 1000 * i, 21999 + 1000 * i),
                state_dir=tmp_path / f"relay{i}",
                fleet=fleet_file,
                **overrides,
            )
            thread = RelayThread(config, name=f"fleet-relay-{i}")
            thread.start()
            made.threads.append(thread)
            made.relays.append(f"{DOMAIN}:{thread.relay.bound_port}")
        yield made
    finally:
        for relay in made.relays:
            runtime.run(runtime.close_all(",".join(made.relays)))
            runtime.run(runtime.close_all(relay))
        for i, thread in enumerate(made.threads):
            if i not in made.stopped:
                thread.stop()


@pytest.fixture(autouse=True)
def agent_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What the agent learns of relays goes to the test's own directory."""
    path = tmp_path / "agent-state"
    monkeypatch.setenv("BURROW_AGENT_STATE_DIR", str(path))
    return path


def fetch(url: str, ca: Path) -> bytes:
    """GET ``url``/id with curl, which resolves ``*.localhost`` to loopback as browsers do."""
    out = subprocess.run(
        ["curl", "-sS", "--fail", "--max-time", "10", "--cacert", str(ca), url + "/id"],
        capture_output=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_agent_holds_one_session_and_the_other_relays_none(tmp_path: Path) -> None:
    with fleet(tmp_path) as relays, http_server(files={"id": b"picked\n"}) as server:
        with burrow.forward(server.port, client=relays.client()) as tunnel:
            assert fetch(tunnel.url, relays.ca) == b"picked\n"
            home = relays.holder()
            assert tunnel.port == relays.threads[home].relay.bound_port

            # The losers' handshakes were measured, then closed without a word.
            def settled() -> bool:
                return all(t.relay.handshakes_pending == 0 for t in relays.threads)

            wait_until(settled, "the other handshakes to end")
            for thread in relays.threads:
                failures = thread.relay.metrics.auth_failures
                assert failures["no-first-frame"] == 0, failures
        memory = (tmp_path / "agent-state" / "relays.json").read_text()
        assert relays.relays[home] in memory


def test_the_home_relay_stays_across_sessions(tmp_path: Path) -> None:
    with fleet(tmp_path) as relays, http_server(files={"id": b"home\n"}) as server:
        homes = []
        client = relays.client()
        for _ in range(10):
            with burrow.forward(server.port, client=client):
                homes.append(relays.holder())
            runtime.run(runtime.close_all(",".join(relays.relays)))
            wait_until(lambda: sum(relays.sessions(i) for i in range(3)) == 0, "the session gone")
        # Loopback relays are all as near: none is ever clearly faster than the home.
        assert len(set(homes)) == 1, homes


def test_a_relay_that_dies_sends_its_tunnels_to_another_with_new_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BURROW_FAILOVER_SECONDS", "1")
    moves: list[tuple[burrow.Tunnel, burrow.Tunnel]] = []
    with fleet(tmp_path) as relays, http_server(files={"id": b"moved\n"}) as server:
        forwarding = burrow.forward(server.port, client=relays.client(), unencrypted=True)
        with forwarding as first:
            forwarding.on_move(lambda old, new: moves.append((old, new)))
            home = relays.holder()
            relays.kill(home)
            wait_until(lambda: moves, "the tunnel to move", 30)
            ((old, new),) = moves
            assert old == first
            assert new.host != first.host and new.port != first.port
            assert new.unencrypted_port is not None
            assert forwarding.tunnel == new
            assert first.host == old.host  # a Tunnel never changes
            assert fetch(new.url, relays.ca) == b"moved\n"
            survivors = [i for i in range(3) if i != home]
            assert sorted(relays.sessions(i) for i in survivors) == [0, 1]
        # The with block closed the tunnel where it is now.
        holder = next(i for i in survivors if relays.threads[i].relay.registry.sessions)
        assert not relays.threads[holder].relay.registry.routes


def test_burrow_forward_prints_the_new_address_when_it_moves(tmp_path: Path) -> None:
    with fleet(tmp_path) as relays, http_server(files={"id": b"cli\n"}) as server:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BURROW_")},
            **relays.env(),
            "BURROW_FAILOVER_SECONDS": "1",
            "BURROW_AGENT_STATE_DIR": str(tmp_path / "cli-state"),
        }
        out = tmp_path / "out.txt"
        with out.open("w") as stdout:
            proc = subprocess.Popen(
                [*BURROW, "forward", str(server.port)], env=env, stdout=stdout,
                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        try:
            wait_until(lambda: out.read_text().strip(), "the first address")
            first = out.read_text().split()[0]
            home = next(i for i in range(3) if relays.sessions(i))
            relays.kill(home)
            wait_until(lambda: len(out.read_text().split()) >= 2, "the new address", 30)
            lines = out.read_text().splitlines()
            moved = lines[-1].split()[-1]
            assert moved != first and moved.startswith("https://")
            assert "moved" in lines[-1]
            assert fetch(moved, relays.ca) == b"cli\n"
        finally:
            stop(proc)


def test_burrow_run_gives_every_process_of_a_workload_one_relay(tmp_path: Path) -> None:
    with fleet(tmp_path) as relays:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BURROW_")},
            **relays.env(),
            "BURROW_AGENT_STATE_DIR": str(tmp_path / "run-state"),
        }
        out = subprocess.run(
            [*BURROW, "run", sys.executable, "-c", "import os; print(os.environ['BURROW_RELAY'])"],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert out.stdout.strip() in relays.relays
        # No session was held for the pick.
        assert sum(relays.sessions(i) for i in range(3)) == 0


def test_several_relays_in_a_sandbox_share_one(tmp_path: Path) -> None:
    with fleet(tmp_path) as relays, ExitStack():
        sandbox = burrow.Sandbox.create(
            "sh", "-c", 'echo "$BURROW_RELAY"', client=relays.client(), isolation="none"
        )
        sandbox.wait()
        assert sandbox.stdout.read().strip() in relays.relays


def test_a_relay_learnt_from_the_fleet_document_takes_the_tunnels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BURROW_RELAY names two relays; the fleet document a relay hands out names a third,
    where the tunnel goes when both named ones are gone."""
    monkeypatch.setenv("BURROW_FAILOVER_SECONDS", "1")
    moves: list[burrow.Tunnel] = []
    with fleet(tmp_path, document=True) as relays, http_server(files={"id": b"far\n"}) as server:
        named = relays.relays[:2]
        client = burrow.Client(relay=named, token=relays.token(), ca=relays.ca)
        forwarding = burrow.forward(server.port, client=client)
        with forwarding:
            forwarding.on_move(lambda old, new: moves.append(new))
            assert relays.sessions(2) == 0
            relays.kill(0)
            relays.kill(1)
            wait_until(lambda: moves, "the tunnel to move to the third relay", 30)
            assert moves[-1].port == int(relays.relays[2].rsplit(":", 1)[1])
            assert relays.sessions(2) == 1
            assert fetch(moves[-1].url, relays.ca) == b"far\n"


def test_a_full_relay_sends_the_agent_to_another(tmp_path: Path) -> None:
    with (
        fleet(tmp_path, count=2, max_sessions=1) as relays,
        http_server(files={"id": b"room\n"}) as server,
        ExitStack() as stack,
    ):
        # Two agents (two tokens, two sessions); each relay takes one session only.
        # The second forwards a port where nothing listens: a tunnel needs no listener.
        for subject, port in (("a", server.port), ("b", 1101)):
            stack.enter_context(burrow.forward(port, client=relays.client(relays.token(subject))))
        assert sorted(relays.sessions(i) for i in range(2)) == [1, 1]
