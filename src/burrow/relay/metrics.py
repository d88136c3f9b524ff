"""What a relay counts, and the figures it reports: the metrics' names and plain counters.

Counting is a dictionary increment on the relay's hot paths (a visitor
joined, a session ended); nothing here formats or locks. The figures that
describe the present (sessions, tunnels, visitors, bytes in flight) are not
counted at all but read from the relay's tables when someone asks
(:mod:`burrow.relay.observe`), so a relay with metrics turned off pays for a
few increments per connection and nothing per byte.

A :class:`Samples` is every metric's value, one process's or several
workers' summed (:func:`merge`); it is plain JSON, so workers can send it to
the one that answers the scrape. Every label value comes from a fixed set
and every combination is there from the start: the number of series never
depends on what peers do, and no tunnel name is ever a label.
Sans-IO: no sockets, no clock of its own.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

from burrow.tokens import TokenErrorReason
from burrow.wire import protocol

PREFIX: Final = "burrow_relay_"

# Label values. Each is a closed set; anything else is counted as the last
# ("other") where a set has one, so a peer cannot add series.
TUNNEL_KINDS: Final = ("https", "tcp", "h2")
VISITOR_KINDS: Final = ("https", "h2", "tcp")
VISITOR_RESULTS: Final = (
    "joined",  # spliced to a data connection of the tunnel's agent
    "unknown-name",  # no tunnel at the name it asked for (404)
    "allowlist",  # the tunnel's allowlist leaves its address out (403 or a close)
    "no-data-connection",  # the agent sent none in time
    "over-limit",  # the tunnel had max_connections_per_tunnel visitors already
    "gone",  # left, or its tunnel closed, before it was joined
)
SESSION_END_REASONS: Final = (
    "agent-closed",  # the agent closed its control connection
    "connection-lost",  # reset, or closed without a word
    "heartbeat",  # three heartbeats missed
    "protocol",  # the agent broke the protocol
    "revoked",  # its token was revoked
    "expired",  # its token expired
    "ended-by-operator",  # an operator ended it (admin API)
    "draining",  # the relay is draining: the agent reconnects elsewhere or later
    "relay-closed",  # the relay stopped
)
HANDSHAKE_RESULTS: Final = ("ok", "failed", "timeout", "dropped")
AUTH_FAILURE_REASONS: Final = (
    # An agent's token refused at hello, by why ...
    *get_args(TokenErrorReason),
    # ... a data connection's attach with an unknown session or a wrong key, and a
    # connection on a burrow ALPN that never sent a valid first frame.
    "bad-attach",
    "no-first-frame",
    "other",
)
OPEN_ERROR_CODES: Final = (
    protocol.CODE_BAD_REQUEST,
    protocol.CODE_TCP_EXHAUSTED,
    protocol.CODE_LIMIT,
    protocol.CODE_CLAIM,
    protocol.CODE_PORT_FORWARDED,
    protocol.CODE_TOKEN_EXPIRED,
    protocol.CODE_SHUTTING_DOWN,
    "other",
)
RENEWAL_RESULTS: Final = ("ok", "failed")
DNS_TYPES: Final = ("A", "AAAA", "TXT", "CAA", "NS", "SOA", "other")
DNS_ANSWERS: Final = ("answered", "nxdomain", "refused", "rate-limited", "malformed")
DIRECTIONS: Final = ("to-agent", "to-visitor")

# Seconds a visitor waits for its data connection: from a pooled one at once
# (well under a millisecond) to a dial across the world, and the 30 s limit.
WAIT_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)
# Seconds from a TCP connection's accept to its TLS handshake's end: a round
# trip or two, more on a slow path or a busy relay, up to the handshake timeout.
HANDSHAKE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# The last refusals kept for the dashboard and /api/status.
REFUSALS_KEPT: Final = 50

Kind = Literal["counter", "gauge", "histogram"]
Merge = Literal["sum", "min", "first"]


@dataclass(frozen=True)
class Family:
    """One metric: its name (without :data:`PREFIX`), type, labels and meaning."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    merge: Merge = "sum"
    """How several workers' values combine: summed, the least, or the first worker's."""
    buckets: tuple[float, ...] = ()
    """A histogram's bucket bounds."""


FAMILIES: Final = (
    Family("sessions", "gauge", "Agent sessions connected now."),
    Family("sessions_ended_total", "counter", "Agent sessions ended, by reason.", ("reason",)),
    Family("tunnels", "gauge", "Tunnels published now, by kind.", ("kind",)),
    Family("tunnel_opens_total", "counter", "Tunnels opened, by kind.", ("kind",)),
    Family(
        "tunnel_open_errors_total", "counter", "Tunnel opens refused, by error code.", ("code",)
    ),
    Family(
        "visitors_total",
        "counter",
        "Visitors, by kind and by what became of them.",
        ("kind", "result"),
    ),
    Family(
        "visitors_connected", "gauge", "Visitors now: joined to their tunnel, or waiting for it."
    ),
    Family(
        "data_connection_wait_seconds",
        "histogram",
        "Time a joined visitor waited for a data connection from the agent.",
        buckets=WAIT_BUCKETS,
    ),
    Family(
        "bytes_total",
        "counter",
        "Bytes carried between visitors and agents, by direction.",
        ("direction",),
    ),
    Family(
        "tls_handshakes_total",
        "counter",
        "TLS handshakes on the public port, by result.",
        ("result",),
    ),
    Family(
        "tls_handshake_seconds",
        "histogram",
        "Time from a connection's accept to the end of its TLS handshake.",
        buckets=HANDSHAKE_BUCKETS,
    ),
    Family(
        "handshakes_pending",
        "gauge",
        "Connections whose TLS handshake (or an agent's first frame) has not finished.",
    ),
    Family(
        "auth_failures_total",
        "counter",
        "Agent connections that failed to authenticate "
        "(a token refused at hello, a bad attach, no first frame), by reason.",
        ("reason",),
    ),
    Family("pooled_data_connections", "gauge", "Idle data connections agents keep ready."),
    Family("revoked_tokens", "gauge", "Token ids in the revocation list.", merge="first"),
    Family(
        "certificate_expiry_timestamp_seconds",
        "gauge",
        "When the certificate new handshakes get expires (Unix time).",
        merge="min",
    ),
    Family(
        "certificate_renewals_total",
        "counter",
        "ACME certificate renewals, by result.",
        ("result",),
    ),
    Family(
        "dns_queries_total",
        "counter",
        "DNS queries answered by the relay's zone, by type and answer.",
        ("type", "answer"),
    ),
    Family(
        "admin_unauthorized_total",
        "counter",
        "Admin API calls refused for a missing or wrong token.",
    ),
    Family("workers", "gauge", "Relay processes whose figures are counted here."),
    Family(
        "build_info",
        "gauge",
        "Always 1: the relay's version and domain.",
        ("version", "domain"),
        merge="first",
    ),
)
FAMILY: Final = {family.name: family for family in FAMILIES}

Key = tuple[str, ...]


class Histogram:
    """Observations in fixed buckets (upper bounds, seconds), with their sum."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value


@dataclass(frozen=True)
class Refusal:
    """One refusal for the dashboard: when, why, from whom, in words without a tunnel name."""

    time: float
    reason: str
    peer: str
    message: str


class RelayMetrics:
    """The counters of one relay process. The relay calls the ``count_*`` methods;
    :mod:`burrow.relay.observe` reads the rest."""

    def __init__(self) -> None:
        self.sessions_ended: dict[str, int] = dict.fromkeys(SESSION_END_REASONS, 0)
        self.tunnel_opens: dict[str, int] = dict.fromkeys(TUNNEL_KINDS, 0)
        self.tunnel_open_errors: dict[str, int] = dict.fromkeys(OPEN_ERROR_CODES, 0)
        self.visitors: dict[tuple[str, str], int] = {
            (kind, result): 0 for kind in VISITOR_KINDS for result in VISITOR_RESULTS
        }
        self.data_connection_wait = Histogram(WAIT_BUCKETS)
        # Bytes of visitors' connections that have ended; those still open are
        # read from their splices when asked.
        self.bytes_to_agent = 0
        self.bytes_to_visitor = 0
        self.handshakes: dict[str, int] = dict.fromkeys(HANDSHAKE_RESULTS, 0)
        self.handshake_time = Histogram(HANDSHAKE_BUCKETS)
        self.auth_failures: dict[str, int] = dict.fromkeys(AUTH_FAILURE_REASONS, 0)
        self.renewals: dict[str, int] = dict.fromkeys(RENEWAL_RESULTS, 0)
        self.dns: dict[tuple[str, str], int] = {
            (kind, answer): 0 for kind in DNS_TYPES for answer in DNS_ANSWERS
        }
        self.admin_unauthorized = 0
        self.refusals: collections.deque[Refusal] = collections.deque(maxlen=REFUSALS_KEPT)

    def count_visitor(self, kind: str, result: str) -> None:
        self.visitors[kind, result] += 1

    def count_session_end(self, reason: str) -> None:
        self.sessions_ended[reason] += 1

    def count_open_error(self, code: str) -> None:
        self.tunnel_open_errors[code if code in self.tunnel_open_errors else "other"] += 1

    def count_auth_failure(self, reason: str) -> None:
        self.auth_failures[reason if reason in self.auth_failures else "other"] += 1

    def count_dns(self, qtype: str, answer: str) -> None:
        self.dns[qtype if qtype in DNS_TYPES else "other", answer] += 1

    def refused(self, now: float, reason: str, peer: str, message: str) -> None:
        self.refusals.append(Refusal(now, reason, peer, message))


# -- samples: every family's values, as JSON --------------------------------------


Samples = dict[str, object]
"""Family name -> value. A family without labels has a number (a histogram: its
``{"counts": [...], "sum": x}``); one with labels has a list of ``[*label_values, value]``."""


def labelled(values: Iterable[tuple[Key, float]]) -> list[list[object]]:
    return [[*key, value] for key, value in values]


def merge(samples: Sequence[Samples]) -> Samples:
    """Several processes' samples as one: each family combined by its ``merge``."""
    if len(samples) == 1:
        return samples[0]
    merged: Samples = {}
    for family in FAMILIES:
        values = [one[family.name] for one in samples if family.name in one]
        if not values:
            continue
        if family.merge == "first":
            merged[family.name] = values[0]
        elif family.kind == "histogram":
            merged[family.name] = _merge_histograms(values)
        elif family.labels:
            merged[family.name] = _merge_labelled(values, family.merge)
        else:
            numbers = [float(value) for value in values if isinstance(value, (int, float))]
            merged[family.name] = min(numbers) if family.merge == "min" else sum(numbers)
    return merged


def _merge_labelled(values: list[object], how: Merge) -> list[list[object]]:
    totals: dict[Key, float] = {}
    for value in values:
        assert isinstance(value, list)
        for row in value:
            key, number = tuple(str(part) for part in row[:-1]), float(row[-1])
            if key in totals:
                totals[key] = min(totals[key], number) if how == "min" else totals[key] + number
            else:
                totals[key] = number
    return labelled(totals.items())


def _merge_histograms(values: list[object]) -> dict[str, object]:
    counts: list[float] = []
    total = 0.0
    for value in values:
        assert isinstance(value, dict)
        these = value["counts"]
        assert isinstance(these, list)
        if not counts:
            counts = [0.0] * len(these)
        counts = [a + b for a, b in zip(counts, these, strict=True)]
        total += float(value["sum"])
    return {"counts": counts, "sum": total}


def histogram_sample(histogram: Histogram) -> dict[str, object]:
    return {"counts": list(histogram.counts), "sum": histogram.sum}
