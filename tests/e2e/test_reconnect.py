"""Sessions that survive faults: a relay restart, a relay drain, an agent that dies.

Real relay processes (`burrow dev`), real agents, real visitors. The code
inside a ``forward()`` block never notices a relay restart: the same URL and
TCP port serve again once the relay is back.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import big_sha256, free_port, http_server, tcp_echo_server
from harness import RelayHarness, run_relay, wait_until

import burrow
from burrow.agent.client import runtime
from burrow.agent.session import AgentConfig, AgentSession
from burrow.relay import dev
from burrow.wire import protocol

BURROW = [sys.executable, "-m", "burrow"]



class DevRelay:
    """`burrow dev` on a fixed port, which can be killed and started again."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.state = tmp / "state"
        self.port = free_port()
        self.extra = extra
        self.log = tmp / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env_file = self.state / dev.ENV_FILE
        with contextlib.suppress(FileNotFoundError):
            env_file.unlink()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
        args = [*BURROW, "dev", "--port", str(self.port), "--state-dir", str(self.state)]
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [*args, *self.extra], env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
        wait_until(env_file.exists, "the dev relay")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def settings(self) -> dict[str, str]:
        return dev.parse_env((self.state / dev.ENV_FILE).read_text())

    def client(self) -> burrow.Client:
        s = self.settings
        return burrow.Client(relay=s["BURROW_RELAY"], token=s["BURROW_TOKEN"], ca=s["BURROW_CA"])


@contextlib.contextmanager
def dev_relay(tmp: Path, *extra: str) -> Iterator[DevRelay]:
    relay = DevRelay(tmp, *extra)
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


def _get(url: str, ca: str, path: str = "/id") -> tuple[int, bytes]:
    """GET through the tunnel with curl (which resolves *.localhost to loopback)."""
    out = subprocess.run(
        ["curl", "-sS", "--cacert", ca, "-o", "-", "-w", "\n%{http_code}", url + path],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if out.returncode != 0:
        return 0, out.stderr
    body, _, code = out.stdout.rpartition(b"\n")
    return int(code), body


def _echo(port: int, payload: bytes) -> bytes | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)
    except OSError:
        return None


def test_relay_killed_and_started_again_gives_the_same_url_and_port_back(tmp_path: Path) -> None:
    with (
        dev_relay(tmp_path) as relay,
        http_server(files={"id": b"same page"}) as server,
        tcp_echo_server() as echo,
    ):
        ca = relay.settings["BURROW_CA"]
        client = relay.client()
        with (
            burrow.forward(server.port, client=client) as web,
            burrow.forward(echo.port, unencrypted=True, client=client) as raw,
        ):
            assert _get(web.url, ca) == (200, b"same page")
            assert _echo(raw.unencrypted_port or 0, b"hello") == b"hello"

            relay.signal(signal.SIGKILL)
            relay.wait()
            assert _get(web.url, ca)[0] == 0  # nobody listens now
            relay.start()

            # Inside the block nothing changed: the same names serve again.
            wait_until(lambda: _get(web.url, ca) == (200, b"same page"), "the same URL")
            wait_until(lambda: _echo(raw.unencrypted_port or 0, b"again") == b"again", "TCP port")
            assert "takes" not in relay.log.read_text()  # a fresh relay: nothing to take over
        # Leaving the block still unpublishes, through the new session.
        assert _get(web.url, ca)[0] == 404


def test_sigterm_drains_connections_in_flight_and_agents_come_back(tmp_path: Path) -> None:
    size = 96 * 1024 * 1024
    with (
        dev_relay(tmp_path, "--drain-timeout", "60") as relay,
        http_server(files={"id": b"after the drain"}) as server,
        burrow.forward(server.port, client=relay.client()) as tunnel,
    ):
        ca = relay.settings["BURROW_CA"]
        host = tunnel.host
        relay_port = int(relay.settings["BURROW_RELAY"].rsplit(":", 1)[1])
        # A slow download is in flight when SIGTERM arrives.
        curl = subprocess.Popen(
            [
                "curl", "-sS", "--cacert", ca, "--limit-rate", "16M", "-o", "-",
                "--resolve", f"{host}:{relay_port}:127.0.0.1", f"{tunnel.url}/big?size={size}",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert curl.stdout is not None
        first = curl.stdout.read(1024 * 1024)
        relay.signal(signal.SIGTERM)
        # No new visitors: the public port stops listening at once.
        wait_until(lambda: _get(tunnel.url, ca)[0] == 0, "the relay to stop taking visitors")
        rest = curl.stdout.read()
        assert curl.wait(60) == 0, curl.stderr.read() if curl.stderr else ""
        assert hashlib.sha256(first + rest).hexdigest() == big_sha256(size)
        assert relay.wait(60) == 0
        log = relay.log.read_text()
        assert "draining 1 connections" in log
        assert "still open after the drain" not in log

        # The agent was told, kept its tunnel, and takes its name back on the new relay.
        relay.start()
        wait_until(lambda: _get(tunnel.url, ca) == (200, b"after the drain"), "the same URL")


def test_an_agent_that_dies_frees_its_names_and_ports(tmp_path: Path) -> None:
    with dev_relay(tmp_path) as relay, http_server(files={"id": b"x"}) as server:
        ca = relay.settings["BURROW_CA"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
        env["BURROW_STATE_DIR"] = str(relay.state)
        agent = subprocess.Popen(
            [*BURROW, "forward", str(server.port), "--tcp"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert agent.stdout is not None
            url = agent.stdout.readline().decode().strip()
            tcp_port = int(agent.stdout.readline().decode().strip().rsplit(":", 1)[1])
            assert _get(url, ca) == (200, b"x")
            agent.kill()
            agent.wait()
            wait_until(lambda: _get(url, ca)[0] == 404, "the relay to free the name")
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", tcp_port), timeout=5).close()
        finally:
            agent.kill()
            agent.wait()


# -- claims, in one relay -----------------------------------------------------------


def _session(config: AgentConfig) -> AgentSession:
    return runtime.run(AgentSession.connect(config))


def _reclaim(session: AgentSession, claim: str) -> protocol.Message:
    message = protocol.Open(id=99, local_port=8, tcp=True, h2=False, claim=claim)
    return runtime.run(session._request(99, message))


def test_a_claim_moves_a_name_to_a_new_session_of_the_same_token_only(tmp_path: Path) -> None:
    with run_relay(tmp_path / "relay") as relay:
        first = _session(AgentConfig(relay=relay.address, token=relay.token, ca=relay.ca))
        # Another AgentConfig value (plain_data differs) is another session, same token.
        second = _session(AgentConfig(relay.address, relay.token, relay.ca, plain_data=True))
        thief = _session(AgentConfig(relay.address, relay.mint("someone-else"), relay.ca))
        try:
            tunnel = runtime.run(first.open_tunnel(8, tcp=True, h2=False))
            claim = next(iter(first.tunnels.values())).claim
            assert claim is not None and claim.startswith(tunnel.host.split(".")[0])

            # Another token cannot use the claim, nor anyone a claim changed by one letter.
            forged = claim[:-1] + ("0" if claim[-1] != "0" else "1")
            for session, bad in ((thief, claim), (second, forged), (thief, "garbage")):
                reply = _reclaim(session, bad)
                assert isinstance(reply, protocol.Error) and reply.code == "claim", reply
            assert relay.call(_session_of(relay, tunnel.host)) == first.session_id

            # A new session of the same token (the old one lost and not yet timed
            # out) takes the names over; the old session's route is gone.
            again = _reclaim(second, claim)
            assert isinstance(again, protocol.Opened)
            assert (again.host, again.tcp_port) == (tunnel.host, tunnel.unencrypted_port)
            assert relay.call(_session_of(relay, tunnel.host)) == second.session_id
        finally:
            for session in (first, second, thief):
                runtime.run(session.close())


async def _session_of(relay: RelayHarness, host: str) -> str:
    return relay.relay.registry.routes[host.split(".")[0]].session.id


def test_forward_while_the_session_reconnects_waits_for_it(tmp_path: Path) -> None:
    with (
        dev_relay(tmp_path) as relay,
        http_server(files={"id": b"first"}) as first,
        http_server(files={"id": b"second"}) as second,
    ):
        ca = relay.settings["BURROW_CA"]
        client = relay.client()
        with burrow.forward(first.port, client=client) as tunnel:
            assert _get(tunnel.url, ca) == (200, b"first")
            relay.signal(signal.SIGKILL)
            relay.wait()
            wait_until(lambda: _get(tunnel.url, ca)[0] == 0, "the relay to be gone")

            opened: list[burrow.Tunnel] = []
            errors: list[BaseException] = []
            done = threading.Event()

            def forward_meanwhile() -> None:
                try:
                    with burrow.forward(second.port, client=client) as later:
                        opened.append(later)
                        done.wait(60)
                except BaseException as exc:
                    errors.append(exc)

            worker = threading.Thread(target=forward_meanwhile)
            worker.start()
            relay.start()  # forward() above waits for the session to come back
            wait_until(lambda: opened or errors, "forward() to return")
            try:
                assert not errors, errors
                assert _get(opened[0].url, ca) == (200, b"second")
                assert _get(tunnel.url, ca) == (200, b"first")
            finally:
                done.set()
                worker.join(30)
