"""Let's Encrypt's test CA, pebble, as a process of its own for the ACME tests.

    with run_pebble(tmp_path) as pebble:
        pebble.directory            # https://localhost:PORT/dir, trusted through pebble.ca_bundle
        pebble.root()               # the root its certificates chain to (new at every start)
        pebble.dns.set_challenge(["value"])   # the TXT record pebble's DNS-01 check reads

pebble's own listener gets a certificate from burrow's dev CA (``ca_bundle``,
what ``--acme-ca-bundle`` is given). For DNS-01 pebble asks the DNS server it
is given; :func:`run_pebble` starts ``pebble-challtestsrv`` for that and sets
its TXT records through the test server's HTTP API (:class:`ChallTestSrv`).
``dns_server=`` points pebble at another server instead (the relay's own).

What pebble 2.4.0 (Debian's package) offers: ``certificateValidityPeriod`` in
its config (seconds; short-lived certificates), no ACME Renewal Information
(its directory has no ``renewalInfo``), no profiles. ``PEBBLE_VA_NOSLEEP=1``
drops the random 0-15 s pause before each validation; ``PEBBLE_WFE_NONCEREJECT=0``
stops it rejecting 5% of good nonces.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from backends import BackendUnavailable, free_port, wait_for_port

from burrow.net import devca

START_TIMEOUT: Final = 30.0


def _require(binary: str) -> str:
    found = shutil.which(binary)
    if not found:
        raise BackendUnavailable(
            f"{binary!r} not found: install the Debian package 'pebble' "
            "(apt-get install -y pebble; scripts/test does this)"
        )
    return found


@dataclass
class ChallTestSrv:
    """pebble-challtestsrv's mock DNS: TXT records of ``_acme-challenge.<domain>``
    set through its management API. The relay's DNS zone has the same two methods."""

    domain: str
    management: str
    """http://127.0.0.1:PORT of the test server's HTTP API."""

    @property
    def host(self) -> str:
        return f"_acme-challenge.{self.domain}."

    def _post(self, path: str, body: dict[str, str]) -> None:
        request = urllib.request.Request(
            self.management + path, data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def set_challenge(self, values: list[str]) -> None:
        self.clear_challenge()
        for value in values:
            self._post("/set-txt", {"host": self.host, "value": value})

    def clear_challenge(self) -> None:
        self._post("/clear-txt", {"host": self.host})


@dataclass
class Pebble:
    directory: str
    management: str
    ca_bundle: Path
    """The dev CA that signed pebble's listener certificate: trust for the ACME client."""
    process: subprocess.Popen[bytes]
    dns: ChallTestSrv | None = None
    log: Path = field(default_factory=Path)

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_bundle))

    def root(self) -> bytes:
        """PEM of the root pebble signs with (regenerated at every start of pebble)."""
        with urllib.request.urlopen(
            self.management + "/roots/0", context=self._context(), timeout=10
        ) as response:
            data: bytes = response.read()
            return data

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.root())
        return path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_for_directory(
    url: str, context: ssl.SSLContext, process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BackendUnavailable(f"pebble exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, context=context, timeout=2) as response:
                json.load(response)
                return
        except (OSError, urllib.error.URLError, ValueError) as exc:
            last = exc
        time.sleep(0.05)
    raise BackendUnavailable(f"pebble's directory {url} did not answer: {last}")


@contextmanager
def run_challtestsrv(domain: str, log: Path) -> Iterator[tuple[ChallTestSrv, int]]:
    """pebble-challtestsrv answering DNS on 127.0.0.1 (the port is yielded), nothing else."""
    dns_port, management_port = free_port(), free_port()
    process = subprocess.Popen(
        [
            _require("pebble-challtestsrv"),
            "-dns01",
            f"127.0.0.1:{dns_port}",
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            f"127.0.0.1:{management_port}",
            "-defaultIPv6",
            "",
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_port(management_port, alive=lambda: process.poll() is None)
        yield ChallTestSrv(domain, f"http://127.0.0.1:{management_port}"), dns_port
    finally:
        process.terminate()
        process.wait(10)


def start_pebble(
    work: Path,
    dns_server: str,
    *,
    validity_seconds: int | None = None,
    nosleep: bool = True,
    port: int | None = None,
    blocklist: list[str] | None = None,
) -> Pebble:
    """Start pebble asking ``dns_server`` (HOST:PORT) for DNS-01; wait for its directory.

    ``port`` fixes the ACME port (to start pebble again where a relay expects it);
    pebble refuses to certify names under ``blocklist``.
    """
    work.mkdir(parents=True, exist_ok=True)
    certs = devca.ensure_dev_certificates(work / "listener", "localhost")
    port = port or free_port()
    management_port = free_port()
    settings: dict[str, object] = {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{management_port}",
        "certificate": str(certs.cert),
        "privateKey": str(certs.key),
        # Only DNS-01 is used; these ports are for HTTP-01 and TLS-ALPN-01.
        "httpPort": free_port(),
        "tlsPort": free_port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    if validity_seconds is not None:
        settings["certificateValidityPeriod"] = validity_seconds
    if blocklist:
        settings["domainBlocklist"] = blocklist
    config = work / "pebble-config.json"
    config.write_text(json.dumps({"pebble": settings}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
    env["PEBBLE_WFE_NONCEREJECT"] = "0"
    if nosleep:
        env["PEBBLE_VA_NOSLEEP"] = "1"
    log = work / "pebble.log"
    process = subprocess.Popen(
        [_require("pebble"), "-config", str(config), "-dnsserver", dns_server],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    pebble = Pebble(
        directory=f"https://localhost:{port}/dir",
        management=f"https://localhost:{management_port}",
        ca_bundle=certs.ca_cert,
        process=process,
        log=log,
    )
    try:
        _wait_for_directory(pebble.directory, pebble._context(), process, log)
    except BaseException:
        pebble.stop()
        raise
    return pebble


@contextmanager
def run_pebble(
    work: Path,
    domain: str,
    *,
    validity_seconds: int | None = None,
    nosleep: bool = True,
    blocklist: list[str] | None = None,
) -> Iterator[Pebble]:
    """pebble and a pebble-challtestsrv as its DNS server for ``domain``'s challenges."""
    work.mkdir(parents=True, exist_ok=True)
    with run_challtestsrv(domain, work / "challtestsrv.log") as (dns, dns_port):
        pebble = start_pebble(
            work,
            f"127.0.0.1:{dns_port}",
            validity_seconds=validity_seconds,
            nosleep=nosleep,
            blocklist=blocklist,
        )
        pebble.dns = dns
        try:
            yield pebble
        finally:
            pebble.stop()
