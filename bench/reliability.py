"""Fault figures for docs/reliability.md: relay restart, agent death, half-open session.

    python bench/reliability.py [--rounds 5] [--heartbeat 10]

Everything runs on loopback with real processes: `burrow dev` as the relay,
`burrow.forward()` in this process or `burrow forward` in another as the
agent, and a TCP proxy in this process between agent and relay that can
freeze (stop passing bytes without closing anything), which is what a
network loss looks like to both ends. Prints a Markdown report; takes about
a minute with the default heartbeat (10 s: a half-open session is declared
dead after three missed ones).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import burrow
from burrow.relay import dev

BURROW = [sys.executable, "-m", "burrow"]
POLL = 0.005  # seconds between probes: the figures are measured to about this


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Relay:
    def __init__(self, tmp: Path, *extra: str) -> None:
        self.state, self.port, self.extra = tmp / "state", _free_port(), extra
        self.log = tmp / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start; return the moment the port accepts connections."""
        with contextlib.suppress(FileNotFoundError):
            (self.state / dev.ENV_FILE).unlink()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
        argv = [*BURROW, "dev", "--port", str(self.port), "--state-dir", str(self.state)]
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen([*argv, *self.extra], env=env, stdout=err, stderr=err)
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                up = time.monotonic()
                break
            time.sleep(POLL)
        while not (self.state / dev.ENV_FILE).exists():
            time.sleep(POLL)
        return up

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def settings(self) -> dict[str, str]:
        return dev.parse_env((self.state / dev.ENV_FILE).read_text())


def _status(host: str, port: int, ca: str) -> int:
    """HTTP status of GET / at ``host`` through the relay on 127.0.0.1:port; 0 if no answer."""
    context = ssl.create_default_context(cafile=ca)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            conn = http.client.HTTPConnection(host)
            conn.sock = tls
            conn.request("GET", "/")
            return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return 0


def _until(condition: Callable[[], bool], limit: float = 60) -> float:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("the condition never held")
        time.sleep(POLL)
    return time.monotonic()


@contextlib.contextmanager
def _web_server() -> Iterator[int]:
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()


def relay_restart(tmp: Path, rounds: int) -> list[float]:
    """Seconds from a restarted relay accepting connections to the old URL serving again."""
    relay = Relay(tmp)
    relay.start()
    s = relay.settings
    client = burrow.Client(relay=s["BURROW_RELAY"], token=s["BURROW_TOKEN"], ca=s["BURROW_CA"])
    figures = []
    try:
        with _web_server() as port, burrow.forward(port, client=client) as tunnel:
            ca = s["BURROW_CA"]
            assert _status(tunnel.host, relay.port, ca) == 200
            for _ in range(rounds):
                relay.kill()
                up = relay.start()
                back = _until(lambda: _status(tunnel.host, relay.port, ca) == 200)
                figures.append(back - up)
    finally:
        relay.kill()
    return figures


def agent_death(tmp: Path, rounds: int) -> list[tuple[float, float]]:
    """Seconds from killing an agent process to its URL 404ing and its TCP port refusing."""
    relay = Relay(tmp)
    relay.start()
    ca = relay.settings["BURROW_CA"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
    env["BURROW_STATE_DIR"] = str(relay.state)
    figures = []
    try:
        with _web_server() as port:
            for _ in range(rounds):
                agent = subprocess.Popen(
                    [*BURROW, "forward", str(port), "--tcp"], env=env, stdout=subprocess.PIPE
                )
                assert agent.stdout is not None
                host = agent.stdout.readline().decode().split("//")[1].split(":")[0]
                tcp = int(agent.stdout.readline().decode().rsplit(":", 1)[1])
                assert _status(host, relay.port, ca) == 200
                killed = time.monotonic()
                agent.send_signal(signal.SIGKILL)
                agent.wait()
                freed = _until(lambda host=host: _status(host, relay.port, ca) == 404)
                closed = _until(lambda tcp=tcp: _refused(tcp))
                figures.append((freed - killed, closed - killed))
    finally:
        relay.kill()
    return figures


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


class FreezableProxy:
    """A TCP proxy (asyncio, own thread) whose live connections can be frozen."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def serve() -> None:
            server = await asyncio.start_server(self._pipe_pair, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await server.serve_forever()

        threading.Thread(target=self.loop.run_until_complete, args=(serve(),), daemon=True).start()
        ready.wait()
        self.generation = 0

    async def _pipe_pair(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection("127.0.0.1", self.target)
        generation = self.generation

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if generation != self.generation:
                    # Frozen: bytes are dropped and nothing is closed, as on a
                    # dead network; the connection stays dead.
                    await asyncio.Event().wait()
                dst.write(data)
                await dst.drain()

        await asyncio.gather(pipe(r, tw), pipe(tr, w), return_exceptions=True)

    def freeze(self) -> None:
        """Live connections go silent for good; new ones pass."""
        self.generation += 1


def half_open(tmp: Path, heartbeat: int) -> tuple[float, float, float]:
    """After the network between agent and relay goes silent: seconds until the agent
    reconnects, until the relay declares the old session dead, and until the URL serves."""
    relay = Relay(tmp, "--heartbeat", str(heartbeat))
    relay.start()
    s = relay.settings
    proxy = FreezableProxy(relay.port)
    name = s["BURROW_RELAY"].rsplit(":", 1)[0]
    client = burrow.Client(relay=f"{name}:{proxy.port}", token=s["BURROW_TOKEN"], ca=s["BURROW_CA"])
    try:
        with _web_server() as port, burrow.forward(port, client=client) as tunnel:
            assert _status(tunnel.host, relay.port, s["BURROW_CA"]) == 200
            log_size = relay.log.stat().st_size
            frozen = time.monotonic()
            proxy.freeze()
            try:
                dead = _until(
                    lambda: "heartbeat missed" in relay.log.read_text()[log_size:],
                    limit=4 * heartbeat,
                )
            except RuntimeError:
                print(relay.log.read_text()[log_size:][-3000:], file=sys.stderr)
                raise
            serving = _until(lambda: _status(tunnel.host, relay.port, s["BURROW_CA"]) == 200)
            taken = "takes" in relay.log.read_text()[log_size:]
            return (dead - frozen, serving - frozen, float(taken))
    finally:
        relay.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heartbeat", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="burrow-reliability-") as name:
        tmp = Path(name)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        (tmp / "c").mkdir()
        restart = relay_restart(tmp / "a", args.rounds)
        death = agent_death(tmp / "b", args.rounds)
        dead, serving, taken = half_open(tmp / "c", args.heartbeat)

    def ms(values: list[float]) -> str:
        return f"median {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"

    took = " and took its name over from the old session" if taken else ""
    print(f"- relay SIGKILLed and started again, {args.rounds} times: the same URL served")
    print(f"  again after the relay was back: {ms(restart)}")
    print(f"- agent process SIGKILLed, {args.rounds} times: its URL answered 404 after")
    print(f"  {ms([d[0] for d in death])}; its TCP port refused after {ms([d[1] for d in death])}")
    print(f"- network between agent and relay went silent (heartbeat {args.heartbeat} s):")
    print(f"  the relay declared the old session dead after {dead:.1f} s; the URL")
    print(f"  served again (the agent reconnected{took}) after {serving:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
