"""Relays at real distances from the agent: which one it picks, keeps, and moves to.

Each test builds a network of its own (tests/netns.py): a namespace with
relays ``rN.localhost`` as ``burrow relay`` processes, each behind a path
with a chosen round-trip time from the agent and another from visitors
(tests/netpath.py). The agent is a Python process inside, with every relay
in BURROW_RELAY; visitors are curl, inside too. Ports are fixed: the
namespace is new, so they are free.

The bounds here (95 of 100, within 35 s) are the issue's behaviours; how
long the first forward() takes with three candidates against one is a
measurement, in bench/wan.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import netns
import pytest

from burrow import tokens
from burrow.agent.session import FAILOVER_SECONDS

pytestmark = pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable()))

RELAY_PORT = 8400  # + N: relay rN listens here
AGENT_PATH_PORT = 9400  # + N: the agent's path to rN
VISITOR_PATH_PORT = 9500  # + N: visitors' path to rN, the port in rN's URLs
VISITOR_RTT_MS = 10.0
# Seconds a relay may take to listen after it is started.
RELAY_START_SECONDS = 30.0

# The agent inside the namespace. "pick N DIR": N picks of a relay (the race
# burrow run and Sandbox use), each with no memory (its own state dir under
# DIR). "sessions N": N sessions one after another, one memory; the relay of
# each. "hold S K": S sessions (a token each, from FLEET_TOKENS) of K tunnels
# to local servers answering "S-K"; each line on stdin asks for the tunnels'
# names now, and how many moves on_move has seen.
AGENT = r"""
import asyncio, http.server, json, os, sys, threading
import burrow
from burrow.agent.client import runtime
from burrow.agent.session import pin_relay

def out(**kw):
    print(json.dumps(kw), flush=True)

def backend(body):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            data = body.encode()
            self.send_response(200)
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]

mode = sys.argv[1]
if mode == "pick":
    trials, base = int(sys.argv[2]), sys.argv[3]
    config = burrow.Client().config()
    async def main():
        winners = []
        for i in range(trials):
            os.environ["BURROW_AGENT_STATE_DIR"] = os.path.join(base, str(i))
            winners.append((await pin_relay(config)).relay)
            await asyncio.sleep(0.15)  # the others' handshakes end before the next race
        return winners
    out(winners=asyncio.run(main()))
elif mode == "sessions":
    port = backend("x")
    relays = []
    for _ in range(int(sys.argv[2])):
        with burrow.forward(port) as tunnel:
            relays.append(tunnel.host.split(".", 1)[1])
        runtime.run(runtime.close_all())
    out(relays=relays)
elif mode == "hold":
    sessions, per = int(sys.argv[2]), int(sys.argv[3])
    tokens = os.environ["FLEET_TOKENS"].split()
    forwards, moves = [], []
    for s in range(sessions):
        client = burrow.Client(token=tokens[s])
        for k in range(per):
            f = burrow.forward(backend(f"{s}-{k}"), client=client)
            f.__enter__()
            f.on_move(lambda old, new: moves.append(new.host))
            forwards.append((f, f"{s}-{k}"))
    for _ in sys.stdin:
        out(tunnels=[[f.tunnel.url, body] for f, body in forwards], moves=len(moves))
"""


@dataclass
class Relay:
    n: int
    domain: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[Any] | None = None
    agent_path: netns.NetPath | None = None

    @property
    def address(self) -> str:
        """As BURROW_RELAY lists it: the name, and the port of the agent's path."""
        return f"{self.domain}:{AGENT_PATH_PORT + self.n}"


@dataclass
class Fleet:
    net: netns.Network
    tmp: Path
    ca: Path
    key: Any
    relays: dict[int, Relay] = field(default_factory=dict)

    def start(self, relay: Relay) -> None:
        with relay.log.open("ab") as log:
            relay.proc = self.net.popen(relay.argv, stdout=log, stderr=log)
        deadline = time.monotonic() + RELAY_START_SECONDS
        while not self._listening(RELAY_PORT + relay.n):
            if relay.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"relay {relay.domain}: {relay.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def _listening(self, port: int) -> bool:
        with self.net.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    def stop(self, n: int, sig: int = signal.SIGKILL) -> None:
        proc = self.relays[n].proc
        assert proc is not None
        self.net.stop(proc, sig)

    def candidates(self, *numbers: int) -> str:
        return ",".join(self.relays[n].address for n in numbers)

    def agent(self, relays: str, *args: str, **env: str) -> subprocess.Popen[str]:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
        clean.update(
            BURROW_RELAY=relays,
            BURROW_TOKEN=self.token(),
            BURROW_CA=str(self.ca),
            BURROW_STATE_DIR=str(self.tmp / "no-dev-relay"),
            BURROW_AGENT_STATE_DIR=str(self.tmp / "agent-state"),
            **env,
        )
        log = (self.tmp / f"agent-{args[0]}.log").open("ab")
        return self.net.popen(
            [sys.executable, "-c", AGENT, *args],
            env=clean,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )

    def token(self) -> str:
        return tokens.mint(self.key, subject="distance", ttl_seconds=3600)

    def visit(self, url: str) -> str | None:
        """The body a visitor gets at ``url`` (inside the namespace), or None."""
        out = self.net.run(
            ["curl", "-sS", "--fail", "--max-time", "3", "--cacert", str(self.ca), url],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout if out.returncode == 0 else None


@contextmanager
def fleet(tmp: Path, agent_rtts: dict[int, float]) -> Iterator[Fleet]:
    """Relays ``rN.localhost`` at ``agent_rtts[N]`` ms from the agent, all 10 ms from visitors."""
    domains = {n: f"r{n}.localhost" for n in agent_rtts}
    ca, certs = netns.relay_certificates(tmp / "certs", list(domains.values()))
    key = tokens.generate_signing_key()
    public = tmp / "token-public.pem"
    tokens.write_public_key(key, public)
    with netns.network() as net:
        made = Fleet(net, tmp, ca, key)
        for (n, rtt), cert in zip(agent_rtts.items(), certs, strict=True):
            argv = [sys.executable, "-m", "burrow", "relay", "--domain", domains[n]]
            argv += ["--cert", str(cert.cert), "--key", str(cert.key), "--token-key", str(public)]
            argv += ["--listen", f"127.0.0.1:{RELAY_PORT + n}"]
            argv += ["--public-port", str(VISITOR_PATH_PORT + n)]
            argv += ["--state-dir", str(tmp / f"relay{n}"), "--drain-timeout", "1"]
            argv += ["--tcp-ports", f"{20000 + 1000 * n}-{20999 + 1000 * n}"]
            relay = Relay(n, domains[n], argv, tmp / f"relay{n}.log")
            made.relays[n] = relay
            made.start(relay)
            relay.agent_path = net.path(AGENT_PATH_PORT + n, to=RELAY_PORT + n, rtt_ms=rtt)
            net.path(VISITOR_PATH_PORT + n, to=RELAY_PORT + n, rtt_ms=VISITOR_RTT_MS)
        yield made


def reply(agent: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    assert agent.stdout is not None
    line = agent.stdout.readline()
    assert line, f"the agent ended (exit {agent.wait(timeout)})"
    result: dict[str, Any] = json.loads(line)
    return result


def ask(agent: subprocess.Popen[str]) -> dict[str, Any]:
    assert agent.stdin is not None
    agent.stdin.write("?\n")
    agent.stdin.flush()
    return reply(agent)


# -- picking -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def picks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """r1 at 5 ms, r2 at 20, r3 at 50, r4 at 8 and r5 at 9 ms from the agent."""
    with fleet(tmp_path_factory.mktemp("picks"), {1: 5, 2: 20, 3: 50, 4: 8, 5: 9}) as made:
        yield made


@pytest.mark.parametrize(("candidates", "at_least"), [((1, 2, 3), 95), ((1, 4, 3), 90)])
def test_the_agent_picks_the_nearest_relay(
    picks: Fleet, candidates: tuple[int, ...], at_least: int
) -> None:
    # The nearest is listed last, so that order alone cannot win.
    listed = picks.candidates(*reversed(candidates))
    base = picks.tmp / f"pick-{'-'.join(map(str, candidates))}"
    agent = picks.agent(listed, "pick", "100", str(base))
    winners = reply(agent)["winners"]
    nearest = picks.relays[candidates[0]].address
    print({relay: winners.count(relay) for relay in set(winners)})
    assert sum(w == nearest for w in winners) >= at_least, sorted(winners)


def test_two_near_relays_do_not_take_turns_as_home(picks: Fleet) -> None:
    """5 and 9 ms: never clearly faster (10 ms and a third), so the home stays."""
    agent = picks.agent(picks.candidates(5, 1), "sessions", "20")
    relays = reply(agent)["relays"]
    assert len(relays) == 20
    assert len(set(relays)) == 1, relays


def test_the_first_forward_with_three_candidates_gets_the_nearest(picks: Fleet) -> None:
    agent = picks.agent(picks.candidates(3, 2, 1), "sessions", "1")
    assert reply(agent)["relays"] == ["r1.localhost"]


# -- a relay that restarts or dies ---------------------------------------------------


def serving(made: Fleet, tunnels: list[list[str]]) -> bool:
    return all(made.visit(url) == body for url, body in tunnels)


@pytest.mark.timeout(300)
def test_a_relay_restarted_within_10_s_gives_every_tunnel_its_name_back(tmp_path: Path) -> None:
    with fleet(tmp_path, {1: 5, 2: 20}) as made:
        tokens_ = " ".join(made.token() for _ in range(2))
        agent = made.agent(made.candidates(1, 2), "hold", "2", "2", FLEET_TOKENS=tokens_)
        before = ask(agent)["tunnels"]
        assert all(".r1.localhost:" in url for url, _ in before), before
        assert serving(made, before)
        # Restarts: a crash (SIGKILL) or a drain (SIGTERM), down for up to 9.5 s.
        pauses = [0.0, 1.0, 3.0, 0.5] * 4 + [9.5, 0.0, 6.0, 9.5]
        for trial, pause in enumerate(pauses):
            made.stop(1, signal.SIGKILL if trial % 2 else signal.SIGTERM)
            time.sleep(pause)
            made.start(made.relays[1])
            deadline = time.monotonic() + 20
            while not serving(made, before):
                assert time.monotonic() < deadline, f"trial {trial}: not served again in 20 s"
                time.sleep(0.2)
            now = ask(agent)
            assert now["tunnels"] == before, f"trial {trial} ({pause} s down)"
            assert now["moves"] == 0


def failover(tmp_path: Path, cut: str) -> list[float]:
    """Seconds until each tunnel serves again on r2 after r1 (its home) is ``cut``."""
    with fleet(tmp_path, {1: 5, 2: 20}) as made:
        sessions, per = 10, 2
        tokens_ = " ".join(made.token() for _ in range(sessions))
        agent = made.agent(
            made.candidates(1, 2), "hold", str(sessions), str(per), FLEET_TOKENS=tokens_
        )
        before = ask(agent)["tunnels"]
        assert all(".r1.localhost:" in url for url, _ in before), before
        assert serving(made, before)
        started = time.monotonic()
        if cut == "reset":
            made.stop(1, signal.SIGKILL)  # its connections close; new ones are refused
        else:
            path = made.relays[1].agent_path
            assert path is not None
            path.silent()  # nothing crosses, nothing closes
        back: dict[str, float] = {}
        deadline = started + 2 * FAILOVER_SECONDS + 40
        while len(back) < len(before) and time.monotonic() < deadline:
            for url, body in ask(agent)["tunnels"]:
                if body not in back and ".r2.localhost:" in url and made.visit(url) == body:
                    back[body] = time.monotonic() - started
            time.sleep(0.2)
        assert len(back) == len(before), f"served again on r2: {sorted(back)}"
        assert ask(agent)["moves"] == len(before)
        print(f"{cut}: served again on r2 after", [round(t, 1) for t in sorted(back.values())])
        return sorted(back.values())


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


@pytest.mark.timeout(240)
def test_a_relay_that_dies_with_a_reset_sends_its_tunnels_elsewhere_within_35_s(
    tmp_path: Path,
) -> None:
    times = failover(tmp_path, "reset")
    assert p95(times) <= 35, times


@pytest.mark.timeout(300)
def test_a_relay_that_goes_silent_sends_its_tunnels_elsewhere_within_65_s(
    tmp_path: Path,
) -> None:
    times = failover(tmp_path, "silent")
    assert max(times) <= 65, times
