"""The relay's DNS server on loopback, asked by real clients: dig, and dnspython's resolver.

A relay (RelayThread, as the other end-to-end tests run it) serves its zone
``r1.localhost`` on 127.0.0.1 at a free port, UDP and TCP. Sources other
than 127.0.0.1 are other loopback addresses (127.0.0.2, ...), all this machine's.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.resolver
import pytest
from devrelay import BURROW, clean_env
from harness import DOMAIN, RelayHarness, run_relay, wait_until
from prometheus_client.parser import text_string_to_metric_families

from burrow.relay.dnsserver import DnsServer


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


PUBLIC_V4, PUBLIC_V6 = "203.0.113.7", "2001:db8::7"
LABEL = "wtqcahqwhd4tu0"

# scripts/test installs dig (Debian package bind9-dnsutils); without it these fail, not skip.
DIG = shutil.which("dig") or "dig"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayHarness]:
    with run_relay(
        tmp_path,
        dns_listen=(("127.0.0.1", 0),),
        public_ips=(PUBLIC_V4, PUBLIC_V6),
        dns_caa="letsencrypt.org",
        metrics_listen=("127.0.0.1", 0),
    ) as harness:
        yield harness


def server(harness: RelayHarness) -> DnsServer:
    dns_server = harness.thread.dns
    assert dns_server is not None
    return dns_server


def port(harness: RelayHarness) -> int:
    ports = {p for _, _, p in server(harness).listening}
    assert len(ports) == 1 and [k for k, _, _ in server(harness).listening] == ["udp", "tcp"]
    return ports.pop()


def dig(harness: RelayHarness, *args: str) -> str:
    result = subprocess.run(
        [DIG, "@127.0.0.1", "-p", str(port(harness)), "+tries=1", "+time=5", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


@pytest.mark.parametrize("transport", ["+notcp", "+tcp"])
def test_dig_gets_the_zones_records(relay: RelayHarness, transport: str) -> None:
    out = dig(relay, transport, f"{LABEL}.{DOMAIN}", "A")
    assert "status: NOERROR" in out and " aa" in out.split("flags:")[1].split(";")[0]
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert f"{LABEL}.{DOMAIN}. 300 IN A {PUBLIC_V4}" in lines
    out = dig(relay, transport, "+short", f"{LABEL}.{DOMAIN}", "AAAA")
    assert out.strip() == PUBLIC_V6
    assert dig(relay, transport, "+short", DOMAIN, "NS").strip() == f"ns1.{DOMAIN}."
    soa = dig(relay, transport, "+short", DOMAIN, "SOA").split()
    assert soa[:2] == [f"ns1.{DOMAIN}.", f"hostmaster.{DOMAIN}."]
    assert dig(relay, transport, "+short", DOMAIN, "CAA").strip() == '0 issue "letsencrypt.org"'
    server(relay).zone.set_challenge(["value-for-apex", "value-for-wildcard"])
    txt = dig(relay, transport, "+short", f"_acme-challenge.{DOMAIN}", "TXT").split()
    assert sorted(txt) == ['"value-for-apex"', '"value-for-wildcard"']
    refused = dig(relay, transport, "example.com", "A")
    assert "status: REFUSED" in refused
    assert "WARNING: recursion requested but not available" in refused
    nodata = dig(relay, transport, f"{LABEL}.{DOMAIN}", "MX")
    assert "status: NOERROR" in nodata and "ANSWER: 0" in nodata and "SOA" in nodata
    nx = dig(relay, transport, f"x.ns1.{DOMAIN}", "A")
    assert "status: NXDOMAIN" in nx and "SOA" in nx
    # Each query counted once, by type and answer, in burrow_relay_dns_queries_total.
    assert relay.thread.admin is not None
    with urllib.request.urlopen(relay.thread.admin.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    counted = {
        (s.labels["type"], s.labels["answer"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "burrow_relay_dns_queries"
        for s in family.samples
    }
    assert {key: n for key, n in counted.items() if n} == {
        ("A", "answered"): 1,
        ("AAAA", "answered"): 1,
        ("NS", "answered"): 1,
        ("SOA", "answered"): 1,
        ("CAA", "answered"): 1,
        ("TXT", "answered"): 1,
        ("A", "refused"): 1,
        ("other", "answered"): 1,  # MX: the name exists, the type does not
        ("A", "nxdomain"): 1,
    }


def test_dig_falls_back_to_tcp_for_an_answer_too_big_for_udp(relay: RelayHarness) -> None:
    server(relay).zone.set_challenge([f"{i}" + "v" * 199 for i in range(8)])
    out = dig(relay, "+bufsize=1232", f"_acme-challenge.{DOMAIN}", "TXT")
    assert "Truncated, retrying in TCP mode" in out
    assert "ANSWER: 8" in out
    no_retry = dig(relay, "+ignore", "+bufsize=1232", f"_acme-challenge.{DOMAIN}", "TXT")
    assert " tc" in no_retry.split("flags:")[1].split(";")[0] and "ANSWER: 0" in no_retry


def test_dnspython_resolves_over_udp_and_tcp(relay: RelayHarness) -> None:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port(relay)
    answer = resolver.resolve(f"{LABEL.upper()}.{DOMAIN}", "A")
    assert [r.to_text() for r in answer] == [PUBLIC_V4]
    answer = resolver.resolve(f"{LABEL}.{DOMAIN}", "AAAA", tcp=True)
    assert [r.to_text() for r in answer] == [PUBLIC_V6]
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolver.resolve(f"a.ns1.{DOMAIN}", "A")
    with pytest.raises(dns.resolver.NoAnswer):
        resolver.resolve(f"{LABEL}.{DOMAIN}", "MX")
    # Several queries on one TCP connection, as resolvers reuse them.
    with socket.create_connection(("127.0.0.1", port(relay)), timeout=5) as sock:
        for name in (DOMAIN, f"ns1.{DOMAIN}", f"x.{DOMAIN}"):
            query = dns.message.make_query(name, "A")
            dns.query.send_tcp(sock, query)
            response, _ = dns.query.receive_tcp(sock)
            assert response.id == query.id and response.answer


def _random_packets(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    valid = [
        dns.message.make_query(name, rdtype, use_edns=edns).to_wire()
        for name in (DOMAIN, f"{LABEL}.{DOMAIN}", f"_acme-challenge.{DOMAIN}", "example.org")
        for rdtype in ("A", "AAAA", "TXT", "SOA", "NS", "CAA", "ANY", "AXFR")
        for edns in (None, 0)
    ]
    packets = []
    for _ in range(count):
        base = bytearray(rng.choice(valid))
        how = rng.randrange(4)
        if how == 0:  # noise
            packets.append(rng.randbytes(rng.randrange(1, 600)))
        elif how == 1:  # cut short
            packets.append(bytes(base[: rng.randrange(1, len(base))]))
        elif how == 2:  # bytes flipped
            for _ in range(rng.randrange(1, 6)):
                base[rng.randrange(len(base))] = rng.getrandbits(8)
            packets.append(bytes(base))
        else:  # a valid header, random rest
            packets.append(bytes(base[:12]) + rng.randbytes(rng.randrange(0, 300)))
    return packets


def test_ten_thousand_random_and_cut_packets_leave_it_answering(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    packets = _random_packets(10_000, seed=11)
    with run_relay(
        tmp_path,
        dns_listen=(("127.0.0.1", 0),),
        public_ips=(PUBLIC_V4,),
        dns_rate=1e9,  # this test is about the parser, not the rate limit
        dns_burst=10**9,
    ) as harness:
        where = ("127.0.0.1", port(harness))
        answered = 0
        started = time.monotonic()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for i in range(0, len(packets), 50):  # in batches, to stay within socket buffers
                for packet in packets[i : i + 50]:
                    sock.sendto(packet, where)
                sock.settimeout(0.02 if i + 50 < len(packets) else 1.0)
                while True:
                    try:
                        data = sock.recv(65535)
                    except TimeoutError:
                        break
                    dns.message.from_wire(data)  # every answer is a well-formed message
                    answered += 1
        # The same garbage over TCP, one connection per packet.
        for packet in packets[:300]:
            with socket.create_connection(where, timeout=5) as conn:
                conn.sendall(len(packet).to_bytes(2, "big") + packet)
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(5)
                while conn.recv(65535):
                    pass
        elapsed = time.monotonic() - started
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = where[1]
        assert [r.to_text() for r in resolver.resolve(f"{LABEL}.{DOMAIN}", "A")] == [PUBLIC_V4]
        assert [r.to_text() for r in resolver.resolve(DOMAIN, "SOA", tcp=True)]
    print(f"fuzz: {answered} of {len(packets)} UDP packets answered in {elapsed:.1f}s")
    assert elapsed < 90
    assert answered > 1000  # FORMERR and refusals for most; silence for headless bytes
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert tracebacks == []


def _flood(where: tuple[str, int], source: str, count: int) -> dict[str, int]:
    """``count`` queries from ``source`` as fast as they go; what came back."""
    seen = {"answered": 0, "truncated": 0}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(0.3)
        for i in range(count):
            sock.sendto(dns.message.make_query(f"q{i}.{DOMAIN}", "A").to_wire(), where)
        while True:
            try:
                response = dns.message.from_wire(sock.recv(65535))
            except TimeoutError:
                return seen
            if response.flags & dns.flags.TC:
                assert not response.answer
                seen["truncated"] += 1
            else:
                assert response.answer
                seen["answered"] += 1


def test_the_rate_limit_stops_a_flood_from_one_source_and_not_the_others(
    tmp_path: Path,
) -> None:
    with run_relay(
        tmp_path,
        dns_listen=(("127.0.0.1", 0),),
        public_ips=(PUBLIC_V4,),
        dns_rate=5.0,
        dns_burst=20,
    ) as harness:
        where = ("127.0.0.1", port(harness))
        started = time.monotonic()
        flood = _flood(where, "127.0.0.1", 1000)
        elapsed = time.monotonic() - started
        counts = {verdict.value: n for verdict, n in server(harness).counts.items()}
        print(f"rate limit: 1000 queries from one source in {elapsed:.2f}s: {counts}, {flood}")
        # The burst and the rate over the flood's time were answered, and no more.
        assert 20 <= counts["answer"] <= 20 + 5 * elapsed + 1
        assert flood["answered"] <= counts["answer"]
        # Of the rest (those the kernel did not drop first), every second got an
        # empty TC answer, no bigger than its query.
        assert counts["slip"] == pytest.approx(counts["drop"], abs=1)
        assert flood["truncated"] <= counts["slip"]
        # Another source is answered in full meanwhile, and over TCP the first one is too.
        other = _flood(where, "127.0.0.2", 10)
        assert other == {"answered": 10, "truncated": 0}
        query = dns.message.make_query(DOMAIN, "A")
        response = dns.query.tcp(query, where[0], port=where[1], timeout=5)
        assert response.rcode() == dns.rcode.NOERROR and response.answer


# -- burrow relay, as operators run it --------------------------------------------


def _relay_args(tmp_path: Path) -> list[str]:
    from burrow import tokens
    from burrow.net import devca

    certs = devca.ensure_dev_certificates(tmp_path / "certs", DOMAIN)
    tokens.write_public_key(tokens.generate_signing_key(), tmp_path / "token-public.pem")
    with socket.socket() as probe:  # a free port for --listen
        probe.bind(("127.0.0.1", 0))
        tls_port = probe.getsockname()[1]
    return [
        *BURROW, "relay", "--domain", DOMAIN, "--cert", str(certs.cert), "--key",
        str(certs.key), "--token-key", str(tmp_path / "token-public.pem"),
        "--listen", f"127.0.0.1:{tls_port}", "--log-level", "info",
    ]  # fmt: skip


def test_with_workers_dns_runs_once_in_worker_0_and_comes_back_with_it(tmp_path: Path) -> None:
    args = _relay_args(tmp_path)
    args += ["--workers", "2", "--dns-listen", "127.0.0.1:0", "--public-ip", PUBLIC_V4]
    log = tmp_path / "relay.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(args, env=clean_env(), stdin=subprocess.DEVNULL, stderr=err)
    try:
        lines = wait_until(
            lambda: [line for line in log.read_text().splitlines() if " DNS for " in line],
            "the DNS listeners",
        )
        assert isinstance(lines, list)
        wait_until(lambda: len(_children(proc.pid)) == 2, "two workers")
        time.sleep(0.5)  # long enough for a second worker to log DNS, if it wrongly did
        lines = [line for line in log.read_text().splitlines() if " DNS for " in line]
        assert len(lines) == 2 and all("burrow.relay.dns[0]:" in line for line in lines)
        dns_port = int(lines[0].rsplit(":", 1)[1])
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = dns_port
        assert [r.to_text() for r in resolver.resolve(f"{LABEL}.{DOMAIN}", "A")] == [PUBLIC_V4]
        # Worker 0 dies: the supervisor starts it again on the same DNS sockets.
        [worker0] = re.findall(r"worker 0 started \(pid (\d+)\)", log.read_text())
        os.kill(int(worker0), signal.SIGKILL)
        wait_until(
            lambda: len(re.findall("worker 0 started", log.read_text())) == 2,
            "worker 0 again",
        )
        resolver.lifetime = 15
        answer = resolver.resolve(DOMAIN, "A", tcp=True)
        assert [r.to_text() for r in answer] == [PUBLIC_V4]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("option", "value"),
    [("--public-ip", "relay.example.com"), ("--dns-listen", "[::1"), ("--dns-caa", "a ca")],
)
def test_the_relay_command_refuses_bad_dns_settings(
    tmp_path: Path, option: str, value: str
) -> None:
    result = subprocess.run(
        [*_relay_args(tmp_path), option, value],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert value in result.stderr and "Traceback" not in result.stderr


def test_tcp_connections_are_capped_per_source(relay: RelayHarness) -> None:
    from burrow.relay.dnsserver import MAX_TCP_CONNECTIONS_PER_SOURCE

    where = ("127.0.0.1", port(relay))
    cap = MAX_TCP_CONNECTIONS_PER_SOURCE
    held = [socket.create_connection(where, timeout=5) for _ in range(cap)]
    try:
        query = dns.message.make_query(DOMAIN, "A")
        # One connection past the cap is closed without an answer...
        with socket.create_connection(where, timeout=5) as extra:
            try:
                dns.query.send_tcp(extra, query)
                assert extra.recv(100) == b""
            except ConnectionResetError:
                pass  # closed with the query unread: a reset
        # ...while another source, and the connections already held, are answered.
        with socket.create_connection(where, timeout=5, source_address=("127.0.0.2", 0)) as other:
            dns.query.send_tcp(other, query)
            assert dns.query.receive_tcp(other)[0].answer
        dns.query.send_tcp(held[0], query)
        assert dns.query.receive_tcp(held[0])[0].answer
    finally:
        for sock in held:
            sock.close()
