"""The local servers every setup reaches: iperf3, and nginx over plain HTTP and TLS.

nginx serves a 1 GiB file (sparse: zeros cost TLS as much as random bytes)
and a tiny ``/small`` reply; its TLS server block presents the dev CA's
certificate for ``*.r1.localhost``, the same kind of certificate the relay
presents, so a fresh TLS connection costs the same handshake in both.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from procs import HOST, BenchError, free_port, running, tail, wait_port

from burrow.net import devca

DEV_DOMAIN = "r1.localhost"
BIG_PATH = "/big"
SMALL_PATH = "/small"
# A name under the dev domain, so that the dev CA's wildcard certificate covers it.
TLS_NAME = f"local.{DEV_DOMAIN}"

NGINX = "/usr/sbin/nginx"


@dataclass(frozen=True)
class Backends:
    """Ports of the running local servers, and the CA that the TLS ones chain to."""

    iperf_port: int
    http_port: int
    tls_port: int
    ca: Path
    big_size: int


def _nginx_config(tmp: Path, http_port: int, tls_port: int, cert: Path, key: Path) -> str:
    www = tmp / "www"
    # nginx reads \n in a quoted string as a newline.
    locations = (
        f"root {www};\n"
        f'        location = {SMALL_PATH} {{ default_type text/plain; return 200 "ok\\n"; }}'
    )
    temp_paths = "\n".join(
        f"    {kind}_temp_path {tmp / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes 1;
daemon off;
pid {tmp / "nginx.pid"};
error_log {tmp / "nginx-error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    default_type application/octet-stream;
{temp_paths}
    server {{
        listen {HOST}:{http_port} backlog=4096;
        {locations}
    }}
    server {{
        listen {HOST}:{tls_port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        {locations}
    }}
}}
"""


@contextlib.contextmanager
def backends(tmp: Path, state_dir: Path, big_size: int) -> Iterator[Backends]:
    """Start iperf3 and nginx; ``state_dir`` gets the dev CA that burrow dev will reuse."""
    certs = devca.ensure_dev_certificates(state_dir, DEV_DOMAIN)
    www = tmp / "www"
    www.mkdir(parents=True, exist_ok=True)
    big = www / BIG_PATH.lstrip("/")
    with big.open("wb") as f:
        f.truncate(big_size)
    with contextlib.ExitStack() as stack:
        iperf_port = free_port()
        iperf_log = tmp / "iperf3-server.log"
        iperf = stack.enter_context(
            running(["iperf3", "-s", "-B", HOST, "-p", str(iperf_port)], iperf_log)
        )
        wait_port(iperf_port, iperf, iperf_log, "iperf3 server")

        http_port, tls_port = free_port(), free_port()
        conf = tmp / "nginx.conf"
        conf.write_text(_nginx_config(tmp, http_port, tls_port, certs.cert, certs.key))
        nginx_log = tmp / "nginx.log"
        nginx = stack.enter_context(running([NGINX, "-c", str(conf), "-p", str(tmp)], nginx_log))
        try:
            wait_port(http_port, nginx, nginx_log, "nginx")
            wait_port(tls_port, nginx, nginx_log, "nginx (TLS)")
        except BenchError as exc:
            raise BenchError(f"{exc}; error log: {tail(tmp / 'nginx-error.log')}") from None
        yield Backends(
            iperf_port=iperf_port,
            http_port=http_port,
            tls_port=tls_port,
            ca=certs.ca_cert,
            big_size=big_size,
        )
