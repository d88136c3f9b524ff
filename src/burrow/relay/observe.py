"""A relay process seen from outside: its figures, sessions and tunnels as plain data,
and what an operator may do to it (end a session, apply a revocation now).

Everything returned is JSON, so that one worker can ask the others for theirs
(:mod:`burrow.relay.admin` sums them). Reading walks the relay's tables once;
nothing here runs on a visitor's path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from burrow._version import __version__
from burrow.relay import metrics
from burrow.relay.metrics import Samples, histogram_sample, labelled
from burrow.wire import protocol
from burrow.wire.text import loggable

if TYPE_CHECKING:
    from burrow.relay.server import Relay

log = logging.getLogger("burrow.relay")

# How much of a tunnel's name the API shows: enough to tell tunnels apart in a
# list, far too little to visit one (a label has 72 random bits).
NAME_SHOWN: Final = 4

OPERATOR_MESSAGE: Final = "the relay's operator ended this session"


def samples(relay: Relay, *, worker_count: int = 1) -> Samples:
    """Every metric of this process (``worker_count``: of the relay, for ``workers``)."""
    counted = relay.metrics
    tunnels = dict.fromkeys(metrics.TUNNEL_KINDS, 0)
    visitors = 0
    to_agent, to_visitor = counted.bytes_to_agent, counted.bytes_to_visitor
    for tunnel in relay.registry.routes.values():
        tunnels[tunnel.kind] += 1
        visitors += len(tunnel.splices) + tunnel.waiting
        for splice in tunnel.splices:
            to_agent += splice.bytes_a_to_b
            to_visitor += splice.bytes_b_to_a
    sessions = relay.registry.sessions.values()
    pooled = sum(session.pooled for session in sessions)
    certificate = relay.certificate
    return {
        "sessions": len(sessions),
        "sessions_ended_total": _by_one(counted.sessions_ended),
        "tunnels": _by_one(tunnels),
        "tunnel_opens_total": _by_one(counted.tunnel_opens),
        "tunnel_open_errors_total": _by_one(counted.tunnel_open_errors),
        "visitors_total": labelled(counted.visitors.items()),
        "visitors_connected": visitors,
        "data_connection_wait_seconds": histogram_sample(counted.data_connection_wait),
        "bytes_total": labelled([(("to-agent",), to_agent), (("to-visitor",), to_visitor)]),
        "tls_handshakes_total": _by_one(counted.handshakes),
        "tls_handshake_seconds": histogram_sample(counted.handshake_time),
        "handshakes_pending": relay.handshakes_pending,
        "auth_failures_total": _by_one(counted.auth_failures),
        "pooled_data_connections": pooled,
        "revoked_tokens": len(relay.revoked.ids) if relay.revoked is not None else 0,
        "certificate_expiry_timestamp_seconds": certificate.not_after.timestamp(),
        "certificate_renewals_total": _by_one(counted.renewals),
        "dns_queries_total": labelled(counted.dns.items()),
        "admin_unauthorized_total": counted.admin_unauthorized,
        "workers": 1,
        "build_info": labelled([((__version__, relay.domain), 1)]),
    }


def _by_one(counts: Mapping[str, int]) -> list[list[object]]:
    return labelled(((value,), n) for value, n in counts.items())


def _bytes(splices: Any, carried: list[int]) -> tuple[int, int]:
    to_agent, to_visitor = carried
    for splice in splices:
        to_agent += splice.bytes_a_to_b
        to_visitor += splice.bytes_b_to_a
    return to_agent, to_visitor


def sessions(relay: Relay, worker: int = 0) -> list[dict[str, object]]:
    """The sessions of this process, for ``GET /api/sessions``."""
    registry = relay.registry
    listed: list[dict[str, object]] = []
    for session in registry.sessions.values():
        tunnels = registry.tunnels_of(session).values()
        to_agent, to_visitor = session.carried
        visitors = 0
        for tunnel in tunnels:
            visitors += len(tunnel.splices) + tunnel.waiting
            live_agent, live_visitor = _bytes(tunnel.splices, [0, 0])
            to_agent += live_agent
            to_visitor += live_visitor
        grant = session.grant
        listed.append(
            {
                "id": session.id,
                "subject": loggable(grant.subject),
                "token_id": loggable(grant.token_id),
                "peer": session.peer,
                "agent": loggable(session.agent),
                "workload": loggable(session.workload) if session.workload else None,
                "connected_since": session.connected_since,
                "tunnels": len(tunnels),
                "visitors": visitors,
                "bytes_to_agent": to_agent,
                "bytes_to_visitor": to_visitor,
                "worker": worker,
            }
        )
    return listed


def tunnels(relay: Relay, worker: int = 0) -> list[dict[str, object]]:
    """The tunnels of this process, for ``GET /api/tunnels``: never a whole name."""
    now = time.time()
    listed: list[dict[str, object]] = []
    for tunnel in relay.registry.routes.values():
        to_agent, to_visitor = _bytes(tunnel.splices, tunnel.carried)
        grant = tunnel.session.grant
        listed.append(
            {
                "name": tunnel.label[:NAME_SHOWN] + "…",
                "kind": tunnel.kind,
                "session": tunnel.session.id,
                "subject": loggable(grant.subject),
                "token_id": loggable(grant.token_id),
                "tcp_port": tunnel.tcp_port,
                "visitors": len(tunnel.splices) + tunnel.waiting,
                "bytes_to_agent": to_agent,
                "bytes_to_visitor": to_visitor,
                "age_seconds": round(max(0.0, now - tunnel.opened_at), 3),
                "worker": worker,
            }
        )
    return listed


def refusals(relay: Relay) -> list[dict[str, object]]:
    """The last refusals of this process, oldest first."""
    return [
        {"time": r.time, "reason": r.reason, "peer": r.peer, "message": r.message}
        for r in relay.metrics.refusals
    ]


def relay_status(relay: Relay, workers: int = 1) -> dict[str, object]:
    """What ``GET /api/status`` says of the relay itself: who, its certificate, its limits."""
    now = time.time()
    certificate = relay.certificate
    not_after = certificate.not_after.timestamp()
    config = relay.config
    return {
        "relay": {
            "domain": relay.domain,
            "version": __version__,
            "public_port": relay.public_port,
            "workers": workers,
            "started": relay.started,
            "uptime_seconds": round(now - relay.started, 3),
            "draining": relay.shutting_down,
            "ready": not_ready(relay) is None,
        },
        "certificate": {
            "serial": f"{certificate.serial:x}",
            "not_after": not_after,
            "expires_in_seconds": round(not_after - now, 3),
            "valid": certificate.fault(relay.domain, datetime.now(UTC)) is None,
        },
        "limits": {
            "max_sessions_per_token": config.max_sessions_per_token,
            "max_tunnels_per_session": config.max_tunnels_per_session,
            "max_tunnels_per_token": config.max_tunnels_per_token,
            "max_connections_per_tunnel": config.max_connections_per_tunnel,
            "max_pending_handshakes": config.max_pending_handshakes,
            "tunnel_creations_per_second": config.tunnel_creations_per_second,
            "pool_size": config.pool_size,
        },
    }


def not_ready(relay: Relay) -> str | None:
    """Why the relay should get no new traffic now (for ``/readyz``), or None."""
    if relay.shutting_down:
        return "draining"
    problem = relay.certificate.fault(relay.domain, datetime.now(UTC))
    if problem is not None:
        return f"no valid certificate: {problem}"
    return None


def end_session(relay: Relay, session_id: str) -> bool:
    """End one session for the operator: the agent is told, its tunnels close. False: none."""
    session = relay.registry.sessions.get(session_id)
    if session is None or session.closed:
        return False
    log.warning(
        "session %s for %s ended by the operator", session.id, loggable(session.grant.subject)
    )
    session.end(protocol.Error(code=protocol.CODE_ENDED_BY_OPERATOR, message=OPERATOR_MESSAGE))
    return True


def apply_revocations(relay: Relay, token_id: str) -> int:
    """Re-read the revocation list now; how many of ``token_id``'s sessions were ended."""
    held = [s for s in relay.registry.sessions.values() if s.grant.token_id == token_id]
    relay.check_revoked_tokens()
    return sum(1 for session in held if session.closed)
