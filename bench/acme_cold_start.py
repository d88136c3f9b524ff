"""Time from a relay's cold start (empty state dir) to serving a certificate from pebble.

Hand-run: python bench/acme_cold_start.py [runs]. Each run starts pebble (asking
the relay's own DNS server for DNS-01) and a relay with --auto-cert and an empty
state dir, and times from the start of the ACME work to the first TLS handshake
that verifies against pebble's root: once with pebble's validation delays off
(PEBBLE_VA_NOSLEEP=1), once with them on (a random 0-15 s before each check,
as pebble does by default to mimic a real CA).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pebble import start_pebble

from burrow import tokens
from burrow.relay import dnsserver, process
from burrow.relay.config import RelayConfig
from burrow.relay.server import Relay

DOMAIN = "r1.localhost"


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        port: int = udp.getsockname()[1]
    return port


async def _cold_start(work: Path, dns_port: int, directory: str, ca_bundle: Path) -> Relay:
    key = tokens.generate_signing_key()
    tokens.write_public_key(key, work / "token-public.pem")
    config = RelayConfig(
        domain=DOMAIN,
        cert=work / "state" / "acme" / "cert.pem",
        key=work / "state" / "acme" / "key.pem",
        public_key=work / "token-public.pem",
        listen=(("127.0.0.1", 0),),
        state_dir=work / "state",
        auto_cert=True,
        acme_directory=directory,
        acme_ca_bundle=ca_bundle,
        dns_listen=(("127.0.0.1", dns_port),),
        public_ips=("127.0.0.1",),
    )
    zone = dnsserver.dns_zone(config)
    dns = await dnsserver.start_dns(config, zone=zone)
    try:
        await process.obtain_certificate(config, zone)
        return await Relay.start(config)
    finally:
        if dns is not None:
            await dns.close()


def one_run(nosleep: bool) -> float:
    with tempfile.TemporaryDirectory() as name:
        work = Path(name)
        dns_port = _udp_port()
        pebble = start_pebble(work / "pebble", f"127.0.0.1:{dns_port}", nosleep=nosleep)
        try:
            root = pebble.write_root(work / "root.pem")

            async def main() -> float:
                started = time.perf_counter()
                relay = await _cold_start(work, dns_port, pebble.directory, pebble.ca_bundle)
                try:
                    context = ssl.create_default_context(cafile=str(root))
                    _reader, writer = await asyncio.open_connection(
                        "127.0.0.1", relay.bound_port, ssl=context, server_hostname=DOMAIN
                    )
                    elapsed = time.perf_counter() - started
                    writer.close()
                    return elapsed
                finally:
                    await relay.close()

            return asyncio.run(main())
        finally:
            pebble.stop()


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for nosleep in (True, False):
        times = [one_run(nosleep) for _ in range(runs)]
        label = "PEBBLE_VA_NOSLEEP=1" if nosleep else "PEBBLE_VA_NOSLEEP unset"
        print(
            f"{label:24} runs={runs} median={statistics.median(times):.2f}s "
            f"min={min(times):.2f}s max={max(times):.2f}s " + " ".join(f"{t:.2f}" for t in times)
        )


if __name__ == "__main__":
    main()
