"""A relay in several worker processes: real processes, real TLS, real curl.

Each worker owns the labels and sessions whose hash falls to it; a worker
that accepts a connection for another passes it over before any TLS. These
tests run ``burrow dev --workers 2`` and ``burrow relay --workers 2`` as
users do and check that every visitor reaches its own tunnel whichever
worker the kernel gave it to.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
from backends import http_server, tcp_echo_server
from devrelay import BURROW, children, dev_workers
from harness import wait_until

import burrow
from burrow import tokens
from burrow.relay.workers import Worker
from burrow.wire import names

DOMAIN = "r1.localhost"


def _curl(url: str, ca: str, count: int) -> list[str]:
    """GET ``url`` ``count`` times on fresh connections, in parallel; the bodies."""
    url += "/id"
    out = subprocess.run(
        [
            "curl", "--silent", "--show-error", "--fail", "--parallel", "--parallel-max", "16",
            "--cacert", ca, *(arg for _ in range(count) for arg in ("--no-keepalive", url)),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


def _curl_status(url: str, ca: str) -> int:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", ca, url + "/id"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return int(out.stdout or 0)


def _tcp_echo(host: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1" if host.endswith("localhost") else host, port)) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_every_visitor_reaches_its_tunnel_whichever_worker_accepts_it(tmp_path: Path) -> None:
    with dev_workers(tmp_path) as relay, ExitStack() as stack:
        ca = relay.settings["BURROW_CA"]
        tunnels: dict[str, tuple[burrow.Tunnel, str]] = {}
        owners: collections.Counter[int] = collections.Counter()
        # Sessions land on whichever worker accepts them: open until both hold some.
        for i in range(40):
            body = f"server {i}"
            server = stack.enter_context(http_server(files={"id": body.encode() + b"\n"}))
            client = relay.client(f"agent-{i}")
            tunnel = stack.enter_context(burrow.forward(server.port, client=client))
            label = tunnel.host.split(".", 1)[0]
            tunnels[label] = (tunnel, body)
            owners[names.worker_of(label, 2)] += 1
            if len(owners) == 2 and i >= 5:
                break
        assert len(owners) == 2, f"every session landed on one worker: {owners}"

        for tunnel, body in tunnels.values():
            assert _curl(tunnel.url, ca, 12) == [body] * 12

        # Visitors the kernel gave to the wrong worker were handed over.
        handed = relay.log_text().count("handed a connection to worker")
        assert handed > 0, relay.log_text()[-2000:]
        assert "Traceback" not in relay.log_text()


def test_raw_tcp_and_http2_tunnels_on_workers(tmp_path: Path) -> None:
    with dev_workers(tmp_path) as relay, tcp_echo_server() as echo:
        client = relay.client("tcp")
        with burrow.forward(echo.port, unencrypted=True, client=client) as tunnel:
            host, port = tunnel.tcp_socket
            payload = os.urandom(1 << 20)
            assert _tcp_echo(host, port, payload) == payload


def test_a_worker_that_dies_is_started_again_and_the_others_keep_serving(tmp_path: Path) -> None:
    with dev_workers(tmp_path) as relay, ExitStack() as stack:
        ca = relay.settings["BURROW_CA"]
        by_owner: dict[int, tuple[burrow.Tunnel, str]] = {}
        for i in range(40):
            body = f"server {i}"
            server = stack.enter_context(http_server(files={"id": body.encode() + b"\n"}))
            tunnel = stack.enter_context(
                burrow.forward(server.port, client=relay.client(f"agent-{i}"))
            )
            by_owner.setdefault(names.worker_of(tunnel.host.split(".", 1)[0], 2), (tunnel, body))
            if len(by_owner) == 2:
                break
        assert len(by_owner) == 2
        before = sorted(relay.workers())
        # Which pid is worker 1? The one whose log lines carry [1] and its pid.
        match = re.search(r"worker 1 started \(pid (\d+)\)", relay.log_text())
        assert match is not None
        victim = int(match.group(1))
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: victim not in relay.workers() and len(relay.workers()) == 2,
            "worker 1 to be started again",
        )
        assert sorted(relay.workers()) != before
        assert "worker 1 (pid" in relay.log_text()

        # Worker 0's tunnel never noticed.
        tunnel, body = by_owner[0]
        assert _curl(tunnel.url, ca, 8) == [body] * 8
        # Worker 1's agent reconnected, was routed to the new worker 1 by its old
        # session's name, and took its label back.
        tunnel, body = by_owner[1]
        wait_until(lambda: _curl_status(tunnel.url, ca) == 200, "worker 1's tunnel to come back")
        assert _curl(tunnel.url, ca, 8) == [body] * 8
        # A new session works, wherever it lands.
        with (
            http_server(files={"id": b"after\n"}) as server,
            burrow.forward(server.port, client=relay.client("after")) as fresh,
        ):
            assert _curl(fresh.url, ca, 8) == ["after"] * 8

    assert relay.proc.returncode == 0


def test_garbage_on_a_workers_relay_is_refused_and_it_keeps_serving(tmp_path: Path) -> None:
    with dev_workers(tmp_path) as relay, http_server(files={"id": b"still here\n"}) as server:
        port = int(relay.settings["BURROW_RELAY"].rsplit(":", 1)[1])
        junk = [
            b"\x16\x03\x01\x00",  # a record header, then silence
            b"\x16\x03\x01\xff\xff" + b"\x01" * 100,  # a record too long
            b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",  # a hello too short for its fields
            os.urandom(3000),
            b"GET / HTTP/1.1\r\n\r\n",
        ]
        for data in junk:
            with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                s.settimeout(15)
                try:
                    while s.recv(65536):
                        pass
                except ConnectionResetError:
                    pass
        with burrow.forward(server.port, client=relay.client("after-junk")) as tunnel:
            assert _curl(tunnel.url, relay.settings["BURROW_CA"], 4) == ["still here"] * 4
        assert len(relay.workers()) == 2
        assert "Traceback" not in relay.log_text()


def test_relay_command_with_workers_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    """`burrow relay --workers 2` with an operator's key files, as in the README."""
    from burrow.net import devca

    certs = devca.ensure_dev_certificates(tmp_path / "certs", DOMAIN)
    key = tokens.generate_signing_key()
    tokens.write_public_key(key, tmp_path / "token-public.pem")
    with socket.socket() as probe:  # a free port for --listen
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "relay.log"
    args = [*BURROW, "relay", "--domain", DOMAIN, "--cert", str(certs.cert), "--key"]
    args += [str(certs.key), "--token-key", str(tmp_path / "token-public.pem")]
    args += ["--listen", f"127.0.0.1:{port}", "--workers", "2", "--log-level", "info"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BURROW_")}
    with log.open("wb") as err:
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stderr=err)
    try:
        wait_until(lambda: len(children(proc.pid)) == 2, "two workers")
        client = burrow.Client(
            relay=f"{DOMAIN}:{port}",
            token=tokens.mint(key, subject="op", ttl_seconds=600),
            ca=str(certs.ca_cert),
        )
        with (
            http_server(files={"id": b"operator\n"}) as server,
            burrow.forward(server.port, client=client) as tunnel,
        ):
            assert _curl(tunnel.url, str(certs.ca_cert), 10) == ["operator"] * 10
        workers = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        for pid in workers:
            assert (
                not Path(f"/proc/{pid}").exists()
                or "zombie" in Path(f"/proc/{pid}/status").read_text()
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the parts, in one process --------------------------------------------------


def test_a_handed_off_socket_arrives_whole_with_its_bytes() -> None:
    send, inbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    inbox.setblocking(False)
    worker = Worker(index=0, count=2, inbox=inbox, peers={1: send})
    receiver = Worker(index=1, count=2, inbox=inbox)
    a, b = socket.socketpair()
    with a, b:
        assert worker.hand_off(1, a, b"\x16\x03\x01 the hello")
        assert a.fileno() == -1  # the sender's copy is closed
        [(adopted, prelude)] = receiver.receive()
        with adopted:
            assert prelude == b"\x16\x03\x01 the hello"
            adopted.setblocking(True)
            adopted.sendall(b"ping")
            assert b.recv(4) == b"ping"
            b.sendall(b"pong")
            assert adopted.recv(4) == b"pong"
        assert receiver.receive() == []
    send.close()
    inbox.close()


def test_hand_off_to_a_gone_worker_closes_the_connection() -> None:
    send, inbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    inbox.close()
    worker = Worker(index=0, count=2, inbox=send, peers={1: send})
    a, b = socket.socketpair()
    with b:
        assert not worker.hand_off(1, a, b"hello")
        assert b.recv(1) == b""  # the visitor sees its connection close
    send.close()


@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_each_worker_hands_out_only_names_it_owns(count: int) -> None:
    for index in range(count):
        for _ in range(50):
            label = names.new_label_for(index, count)
            assert names.is_label(label)
            assert names.worker_of(label, count) == index


def test_worker_of_is_the_same_in_every_process() -> None:
    code = "from burrow.wire import names; print([names.worker_of(f'l{i}', 7) for i in range(20)])"
    here = str([names.worker_of(f"l{i}", 7) for i in range(20)])
    for seed in ("0", "1", "random"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        assert out == here
    spread = collections.Counter(names.worker_of(names.new_label(), 4) for _ in range(4000))
    assert all(800 < n < 1200 for n in spread.values()), spread
