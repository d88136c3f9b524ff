"""What an operator sets when running a relay."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

# A TLS handshake that has not finished by then is someone holding a socket
# open for nothing; real clients finish in a few round trips.
HANDSHAKE_TIMEOUT: Final = 10.0

# Seconds between heartbeats on a control connection; three missed in a row
# end the session (see protocol.Heartbeat).
HEARTBEAT_INTERVAL: Final = 10

# On SIGTERM the relay lets connections in flight finish for this long
# before closing them: long enough for a page or an API call, short enough
# for a deploy or a process manager's stop timeout (often 30-90 s).
DRAIN_TIMEOUT: Final = 20.0

# Idle data connections an agent keeps ready per session. Four covers a
# browser opening its usual burst of connections without a dial round trip.
POOL_SIZE: Final = 4

# How long a visitor waits for a data connection when the pool is empty.
POOL_WAIT_SECONDS: Final = 30.0

# A pooled data connection idle this long is closed (and not replaced until a
# visitor comes): each is a socket here and one at the agent, and a quiet
# session need not hold them; the next visitor waits one dial round trip.
POOL_IDLE_TIMEOUT: Final = 300.0

# Sessions one token may hold at once. A session costs the relay about
# 27 KiB and a control connection; a fleet of processes sharing a token (CI
# runners, each forward() a session of its own) stays far below this, and a
# leaked or looping token cannot hold more than some 7 MiB of the relay.
MAX_SESSIONS_PER_TOKEN: Final = 256

# Sessions the relay holds at once, all tokens together. At about 27 KiB each
# (and a control connection and its pool of data connections) 100,000 is some
# 2.7 GiB and 500,000 sockets: past it the relay answers hello with `full`,
# and agents go to another relay of the fleet rather than wear this one down.
MAX_SESSIONS: Final = 100_000

# Tunnels one session may hold; a guard against a runaway agent, far above
# what one process forwards.
MAX_TUNNELS_PER_SESSION: Final = 1024

# Tunnels one token may hold at once across all its sessions (a token's own
# max_tunnels scope can lower it): a leaked or looping CI token cannot fill
# the relay's route table or TCP range.
MAX_TUNNELS_PER_TOKEN: Final = 4096

# New tunnels a token may open per second, with bursts: a test suite opening
# dozens at once is fine; a loop opening thousands a second is not. Names
# taken back with a claim after a reconnect do not count.
TUNNEL_CREATIONS_PER_SECOND: Final = 20.0
TUNNEL_CREATION_BURST: Final = 200

# Visitors one tunnel may have at once: each costs two sockets here and two at
# the agent; beyond this a visitor is turned away rather than the relay run
# out of file descriptors for everyone else.
MAX_CONNECTIONS_PER_TUNNEL: Final = 10_000

# TLS handshakes not yet finished, across the relay. Each holds a socket
# until HANDSHAKE_TIMEOUT, and memory: about 4 KiB while the peer has sent
# nothing (TLS state is made only when a ClientHello arrives), about 50 KiB
# once it has (OpenSSL's state mid-handshake; measured, see docs/security.md).
# Past this many the oldest is dropped to make room, so idle sockets opened
# by an attacker cannot keep visitors and agents out (they are evicted
# first), and a full cap of the dearer kind stays within
# HANDSHAKE_MEMORY_BUDGET: 8,192 x 50 KiB = 400 MiB.
HANDSHAKE_MEMORY_BUDGET: Final = 512 * 1024 * 1024
MAX_PENDING_HANDSHAKES: Final = 8192

# Unfinished handshakes from one source address (an IPv6 /64); past it that
# source's own oldest is dropped, so one address cannot fill the relay's cap.
# A NAT's many users finish their handshakes in a few round trips; 256 at
# once from one address is far beyond what they have in flight.
MAX_PENDING_HANDSHAKES_PER_SOURCE: Final = 256

# Where --auto-cert gets its certificate unless told otherwise.
ACME_DIRECTORY: Final = "https://acme-v02.api.letsencrypt.org/directory"

# How long `burrow relay --auto-cert` waits for its first certificate before it
# exits: DNS-01 at Let's Encrypt takes seconds to a minute; five minutes covers a
# slow CA and a few retries, and an operator watching the start-up is not left
# guessing for longer.
ACME_TIMEOUT: Final = 300.0

# UDP queries answered per second from one source (an IPv4 address or an IPv6
# /64) by the relay's DNS zone, and the burst allowed above that rate. A
# resolver caches answers (relay/dns.py's TTL), so even a large one asks a few
# questions a second (one per new tunnel name and type); a source far above
# this is a spoofed flood bouncing answers off the relay at the address it fakes.
DNS_RATE_PER_SOURCE: Final = 50.0
DNS_BURST_PER_SOURCE: Final = 100


@dataclass(frozen=True)
class RelayConfig:
    """Settings of one relay process."""

    domain: str
    """The relay's own name; tunnels are ``<label>.<domain>``."""

    cert: Path
    """PEM certificate chain covering ``domain`` and ``*.domain``."""

    key: Path
    """PEM private key of ``cert``."""

    public_key: Path | tuple[Path, ...]
    """Ed25519 public keys that agent tokens (and the fleet document) may be signed
    with: key files, or directories of ``*.pem`` key files. Several at once let the
    signing key be rotated; a token's ``kid`` names its key."""

    listen: tuple[tuple[str, int], ...] = (("0.0.0.0", 443), ("::", 443))
    """(host, port) pairs for the public TLS port; visitors and agents share it."""

    public_port: int | None = None
    """The TLS port visitors use, for URLs; defaults to the first listen port."""

    tcp_ports: tuple[int, int] = (20000, 29999)
    """Inclusive range that raw TCP tunnels get their random port from."""

    tcp_host: str | None = None
    """The name visitors use for raw TCP tunnels; defaults to ``domain``."""

    plain_data_listen: tuple[str, int] | None = None
    """(host, port) accepting data connections without TLS; trusted networks only."""

    handshake_timeout: float = HANDSHAKE_TIMEOUT
    """Seconds a TLS handshake may take before the socket is closed."""

    heartbeat: int = HEARTBEAT_INTERVAL
    """Seconds between heartbeats on control connections; three missed end a session."""

    drain_timeout: float = DRAIN_TIMEOUT
    """Seconds that connections in flight may go on after SIGTERM."""

    pool_size: int = POOL_SIZE
    """Idle data connections each agent keeps open."""

    pool_idle_timeout: float = POOL_IDLE_TIMEOUT
    """Seconds a pooled data connection may stay idle before the relay closes it."""

    max_sessions: int = MAX_SESSIONS
    """Sessions the relay holds at once; past it, ``hello`` gets a ``full`` error (with
    several workers, each holds its share)."""

    max_sessions_per_token: int = MAX_SESSIONS_PER_TOKEN
    """Sessions one token may hold at once; past it, ``hello`` gets a ``limit`` error."""

    max_tunnels_per_session: int = MAX_TUNNELS_PER_SESSION
    """Tunnels one agent session may hold at once."""

    max_tunnels_per_token: int = MAX_TUNNELS_PER_TOKEN
    """Tunnels one token may hold at once across its sessions."""

    tunnel_creations_per_second: float = TUNNEL_CREATIONS_PER_SECOND
    """Average rate at which one token may open new tunnels."""

    tunnel_creation_burst: int = TUNNEL_CREATION_BURST
    """New tunnels one token may open at once before the rate applies."""

    max_connections_per_tunnel: int = MAX_CONNECTIONS_PER_TUNNEL
    """Visitors one tunnel may have at once."""

    max_pending_handshakes: int = MAX_PENDING_HANDSHAKES
    """Unfinished TLS handshakes kept; past it the oldest is dropped."""

    max_pending_handshakes_per_source: int = MAX_PENDING_HANDSHAKES_PER_SOURCE
    """Unfinished TLS handshakes kept per source address (IPv6: per /64); past it
    that source's oldest is dropped."""

    revoked_tokens: Path | None = None
    """Text file of revoked token ids (the JWT ``jti``), one a line, ``#`` comments;
    re-read when it changes, and the sessions of a newly revoked token end."""

    fleet: Path | None = None
    """The operator's signed fleet document (burrow.fleet); re-read when it changes. Its
    revoked token ids are refused, and agents with an older copy are given it."""

    state_dir: Path | None = None
    """Where the relay keeps what must outlive it: the claim secret (``claim-secret``,
    mode 0600) and, with ``--auto-cert``, the ACME account and certificate. Without
    one, claims are signed with a secret derived from ``key`` and held in memory only,
    so a restart with a new TLS key loses them."""

    auto_cert: bool = False
    """Get and renew ``cert`` and ``key`` through ACME DNS-01 (burrow.relay.acme); they
    then live in ``state_dir/acme/`` and the relay serves only once it has them."""

    acme_email: str | None = None
    """Contact address of the relay's ACME account."""

    acme_directory: str = ACME_DIRECTORY
    """The ACME CA's directory URL."""

    acme_ca_bundle: Path | None = None
    """PEM certificates trusted for the ACME server besides the usual ones (pebble, a
    private CA)."""

    acme_timeout: float = ACME_TIMEOUT
    """Seconds to wait for the first certificate before giving up."""

    public_ips: tuple[str, ...] = ()
    """The relay's public addresses (IPv4 and IPv6): what its DNS zone answers for
    ``domain``, ``ns1.<domain>`` and every ``*.<domain>``."""

    dns_listen: tuple[tuple[str, int], ...] = ()
    """(host, port) pairs where the relay answers DNS for ``domain``, over UDP and TCP
    on each; empty: no DNS."""

    dns_only_acme: bool = False
    """Answer only ``_acme-challenge.<domain>`` (for an operator whose zone lives at
    another DNS server and who delegates just that name); refuse the rest."""

    dns_caa: str | None = None
    """The CA's domain (``letsencrypt.org``) for a CAA record at ``domain`` that lets
    only that CA issue; the ACME client adds its account (RFC 8657) when it knows it."""

    dns_rate: float = DNS_RATE_PER_SOURCE
    """UDP queries answered per second from one source (IPv6: /64); past it and its
    burst, every other query gets an empty truncated answer and the rest none."""

    dns_burst: int = DNS_BURST_PER_SOURCE
    """UDP queries one source may send at once before ``dns_rate`` applies."""

    metrics_listen: tuple[str, int] | None = None
    """(host, port) of the operator's listener: ``/metrics``, ``/healthz``, ``/readyz``,
    the admin API and the dashboard (burrow.relay.admin); None: none."""

    admin_token: str | None = None
    """The bearer token the admin API asks for; without one the API only reads, and the
    listener must be on loopback."""

    extra: dict[str, str] = field(default_factory=dict)
    """Free-form labels shown in logs."""
