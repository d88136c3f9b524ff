"""Ctrl-C and SIGTERM end every burrow command promptly, whatever its relay is doing.

Each test runs the real command against a real ``burrow dev`` relay, puts
the relay in one state, sends the signal and checks that the process has
ended. The states: up; gone (killed); stopped (SIGSTOP: it holds its
connections and says nothing); mute (killed, and its port taken by a server
that accepts and never answers, which the agent reconnects into);
reconnecting (gone, and the agent has noticed); draining (SIGTERM with a
visitor's connection in flight: the relay tells agents to go and waits).

The commands end within a second in each state (measured: see
docs/reliability.md); the bound here is looser so that a loaded machine
does not fail the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from devrelay import BURROW, DevRelay, clean_env, dev_relay

from burrow.relay import dev

PROMPTLY = 5.0
"""Seconds a command may take to end after the signal (it needs under one)."""

SIGNALS = [signal.SIGTERM, signal.SIGINT]

# `burrow run`'s workload: a program that forwards a port, as users write one.
WORKLOAD = """\
import sys, time, burrow
with burrow.forward(int(sys.argv[1]), unencrypted=True) as tunnel:
    host, port = tunnel.tcp_socket
    print(tunnel.url, f"tcp://{host}:{port}", flush=True)
    while True:
        time.sleep(1)
"""


def _record(command: str, state: str, sig: signal.Signals, seconds: float) -> None:
    """Append the measurement to $BURROW_SHUTDOWN_TIMES, if set (for the docs' table)."""
    path = os.environ.get("BURROW_SHUTDOWN_TIMES")
    if path:
        with open(path, "a") as out:
            row = {"command": command, "state": state, "signal": sig.name, "seconds": seconds}
            out.write(json.dumps(row) + "\n")


def _wait_for(predicate: Callable[[], object], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _ends_promptly(proc: subprocess.Popen[bytes], sig: signal.Signals) -> float:
    """Send ``sig``; the seconds until the process ended (fails past ``PROMPTLY``)."""
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        proc.wait(timeout=PROMPTLY)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"still running {PROMPTLY:g}s after {sig.name}") from None
    return time.monotonic() - sent


@dataclass
class Running:
    """A command started by a test: its process and what it wrote."""

    proc: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def out(self) -> str:
        return self.stdout.read_text(errors="replace")

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_for_output(self, text: str, where: str = "stdout") -> None:
        def seen() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"ended before {text!r}:\n{self.out()}\n{self.err()}")
            return text in (self.out() if where == "stdout" else self.err())

        _wait_for(seen, f"{text!r} on {where}")

    def tcp_address(self) -> tuple[str, int]:
        """The raw TCP address of its tunnel, from the ``tcp://HOST:PORT`` it printed."""
        self.wait_for_output("tcp://")
        word = next(w for w in self.out().split() if w.startswith("tcp://"))
        host, _, port = word.removeprefix("tcp://").rpartition(":")
        return host, int(port)


@contextmanager
def _started(args: list[str], env: dict[str, str], tmp: Path) -> Iterator[Running]:
    tmp.mkdir(parents=True, exist_ok=True)
    stdout, stderr = tmp / "stdout", tmp / "stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    try:
        yield Running(proc, stdout, stderr)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def _listener() -> Iterator[socket.socket]:
    """A local port to publish; it takes connections (and keeps them) as a server would."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


@contextmanager
def _mute_server(port: int) -> Iterator[list[socket.socket]]:
    """A server on 127.0.0.1:``port`` that accepts connections and never says a word."""
    accepted: list[socket.socket] = []
    server = socket.create_server(("127.0.0.1", port))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield accepted
    finally:
        server.close()
        thread.join(timeout=5)
        for conn in accepted:
            conn.close()


# -- the relay's states ------------------------------------------------------------


def _visit(running: Running, local: socket.socket, stack: ExitStack) -> None:
    """A visitor's connection through the tunnel, joined end to end and left open."""
    _, port = running.tcp_address()  # the relay's name is this machine
    visitor = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
    visitor.sendall(b"in flight")
    local.settimeout(10)
    conn, _ = local.accept()
    stack.enter_context(conn)
    assert conn.recv(64) == b"in flight"


def _put_relay_in(
    state: str, relay: DevRelay, running: Running, local: socket.socket, stack: ExitStack
) -> None:
    if state == "up":
        return
    if state == "draining":
        _visit(running, local, stack)
        relay.process.send_signal(signal.SIGTERM)
        _wait_for(lambda: "draining 1 connections" in relay.log.read_text(), "the relay to drain")
        running.wait_for_output("reconnecting", "stderr")
        return
    if state == "stopped":
        relay.process.send_signal(signal.SIGSTOP)
        stack.callback(relay.process.send_signal, signal.SIGCONT)
        return
    relay.process.kill()
    relay.process.wait()
    if state == "reconnecting":
        running.wait_for_output("reconnecting", "stderr")
    elif state == "mute":
        running.wait_for_output("reconnecting", "stderr")
        accepted = stack.enter_context(_mute_server(relay.port))
        _wait_for(lambda: accepted, "the agent to reconnect into the mute server")


STATES = ["up", "gone", "stopped", "mute", "reconnecting", "draining"]


# -- the commands -------------------------------------------------------------------


def _forward(port: int) -> list[str]:
    return [*BURROW, "forward", str(port), "--tcp"]


def _run(port: int) -> list[str]:
    return [*BURROW, "run", sys.executable, "-c", WORKLOAD, str(port)]


def _sandbox(port: int) -> list[str]:
    return [*BURROW, "sandbox", "--tcp-port", str(port), "--", "sleep", "600"]


COMMANDS: dict[str, Callable[[int], list[str]]] = {
    "forward": _forward,
    "run": _run,
    "sandbox": _sandbox,
}


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_signal_ends_the_command_whatever_the_relay_does(
    command: str, state: str, sig: signal.Signals, tmp_path: Path
) -> None:
    with ExitStack() as stack:
        relay = stack.enter_context(dev_relay(tmp_path / "relay"))
        local = stack.enter_context(_listener())
        running = stack.enter_context(
            _started(COMMANDS[command](local.getsockname()[1]), relay.env(), tmp_path / command)
        )
        running.tcp_address()  # published
        _put_relay_in(state, relay, running, local, stack)
        seconds = _ends_promptly(running.proc, sig)
    _record(command, state, sig, seconds)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_ends_forward_while_it_cannot_reach_the_relay(
    sig: signal.Signals, tmp_path: Path
) -> None:
    """The relay never answers, so the tunnel is never published: the signal still ends it."""
    with ExitStack() as stack:
        relay = stack.enter_context(dev_relay(tmp_path / "relay"))
        relay.process.kill()
        relay.process.wait()
        accepted = stack.enter_context(_mute_server(relay.port))
        local = stack.enter_context(_listener())
        running = stack.enter_context(
            _started(_forward(local.getsockname()[1]), relay.env(), tmp_path / "forward")
        )
        _wait_for(lambda: accepted, "forward to connect to the mute server")
        seconds = _ends_promptly(running.proc, sig)
    _record("forward", "mute from the start", sig, seconds)


# -- the relay commands themselves ------------------------------------------------------


@contextmanager
def _relay_command(kind: str, tmp: Path, *args: str) -> Iterator[tuple[Running, dict[str, str]]]:
    """``burrow dev``, or ``burrow relay`` on a dev relay's certificate and keys; and
    the settings an agent uses to reach it."""
    state = tmp / "dev-state"
    if kind == "relay":
        prepared = dev.prepare(state, 0, (20000, 29999))
        config = prepared.config
        argv = [
            *BURROW,
            "relay",
            "--domain",
            config.domain,
            "--cert",
            str(config.cert),
            "--key",
            str(config.key),
            "--token-key",
            str(config.public_key),
            "--listen",
            "127.0.0.1:0",
            *args,
        ]
    else:
        argv = [*BURROW, "dev", "--port", "0", "--state-dir", str(state), *args]
    env = clean_env(BURROW_STATE_DIR=str(state))
    with _started([*argv, "--log-level", "info"], env, tmp / kind) as running:
        if kind == "relay":
            running.wait_for_output("listening on", "stderr")
            found = re.search(r"listening on \('127\.0\.0\.1', (\d+)\)", running.err())
            assert found is not None, running.err()
            settings = prepared.env(int(found[1]))
        else:
            _wait_for(lambda: (state / dev.PID_FILE).exists(), "burrow dev to start")
            settings = dev.parse_env((state / dev.ENV_FILE).read_text())
        yield running, settings


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("kind", ["dev", "relay"])
def test_a_signal_ends_an_idle_relay(kind: str, sig: signal.Signals, tmp_path: Path) -> None:
    with _relay_command(kind, tmp_path) as (running, _):
        seconds = _ends_promptly(running.proc, sig)
    _record(kind, "idle", sig, seconds)


@pytest.mark.parametrize("kind", ["dev", "relay"])
def test_ctrl_c_ends_a_relay_with_connections_in_flight(kind: str, tmp_path: Path) -> None:
    with ExitStack() as stack:
        relay, settings = stack.enter_context(_relay_command(kind, tmp_path))
        local = stack.enter_context(_listener())
        agent = stack.enter_context(
            _started(
                _forward(local.getsockname()[1]),
                clean_env(**settings, BURROW_STATE_DIR=str(tmp_path / "none")),
                tmp_path / "forward",
            )
        )
        _visit(agent, local, stack)
        seconds = _ends_promptly(relay.proc, signal.SIGINT)
    _record(kind, "connections in flight", signal.SIGINT, seconds)


@pytest.mark.parametrize("second", SIGNALS, ids=lambda s: s.name)
def test_a_second_signal_cuts_the_drain_short(second: signal.Signals, tmp_path: Path) -> None:
    """SIGTERM drains for up to --drain-timeout (60 s here); another signal ends it at once."""
    with ExitStack() as stack:
        relay, settings = stack.enter_context(
            _relay_command("dev", tmp_path, "--drain-timeout", "60")
        )
        local = stack.enter_context(_listener())
        agent = stack.enter_context(
            _started(
                _forward(local.getsockname()[1]),
                clean_env(**settings, BURROW_STATE_DIR=str(tmp_path / "none")),
                tmp_path / "forward",
            )
        )
        _visit(agent, local, stack)
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_for_output("draining 1 connections", "stderr")
        assert relay.proc.poll() is None  # the connection in flight holds it
        seconds = _ends_promptly(relay.proc, second)
    _record("dev", "draining (second signal)", second, seconds)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_ends_the_demo_kept_running(sig: signal.Signals, tmp_path: Path) -> None:
    env = clean_env(BURROW_STATE_DIR=str(tmp_path / "none"))
    with _started([*BURROW, "demo", "--keep"], env, tmp_path / "demo") as running:
        running.wait_for_output("Ctrl-C to stop")
        seconds = _ends_promptly(running.proc, sig)
    _record("demo --keep", "its own relay up", sig, seconds)
