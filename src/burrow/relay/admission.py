"""Admission: whether the relay lets an agent in (``hello``) and opens a tunnel (``open``).

Pure checks. Each returns the :class:`~burrow.wire.protocol.Error` to send
back, or what was admitted; the session and the server only send. Time is
passed in, and nothing here touches a socket.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Container, Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from burrow import tokens
from burrow.exception import InvalidError
from burrow.relay.claims import Claim, ClaimSigner
from burrow.relay.config import RelayConfig
from burrow.relay.metrics import RelayMetrics
from burrow.relay.quota import TokenQuotas
from burrow.relay.registry import RelayTunnel
from burrow.wire import allowlist, names, protocol

# A workload id is an opaque name `burrow run` makes up (22 characters);
# the cap only keeps a hostile agent from making the relay hold a large one.
MAX_WORKLOAD_ID: Final = 128


@dataclass(frozen=True)
class Admitted:
    """An ``open`` the relay may go ahead with."""

    allow: tuple[allowlist.Network, ...] | None
    """Its allowlist, parsed (None lets everyone in)."""

    claim: Claim | None
    """The names a valid claim gives back, when the agent showed one."""


class Admission:
    """The relay's admission policy; ``shutting_down`` is set when the relay stops."""

    def __init__(
        self,
        config: RelayConfig,
        public_key: Ed25519PublicKey | tokens.KeyRing,
        quotas: TokenQuotas,
        claims: ClaimSigner,
        *,
        revoked: Container[str] = frozenset(),
        owns: Callable[[str], bool] = lambda label: True,
        routes: Mapping[str, RelayTunnel] | None = None,
        metrics: RelayMetrics | None = None,
    ) -> None:
        """``revoked`` holds refused token ids; ``owns`` says whether a label is this
        process's (a claim for another worker's label is no good here); ``routes``
        is the registry's route table, read to see whose a claimed label is now;
        ``metrics`` counts the tokens refused, by reason."""
        self.config = config
        self.domain = names.normalize_domain(config.domain)
        self.routes: Mapping[str, RelayTunnel] = routes if routes is not None else {}
        self.public_key = public_key
        self.quotas = quotas
        self.claims = claims
        self.revoked = revoked
        self.owns = owns
        self.metrics = metrics if metrics is not None else RelayMetrics()
        self.shutting_down = False
        # Wall-clock time for tokens; a test sets it to move a token's life on.
        self.clock: Callable[[], float] = time.time

    def check_hello(
        self, hello: protocol.Hello, *, now: float | None = None
    ) -> tokens.TokenGrant | protocol.Error:
        """What the agent's token grants, or why the agent is refused.

        ``now`` is the wall-clock time tokens are checked at (None: ``clock()``).
        """
        if hello.version != protocol.PROTOCOL_VERSION:
            return protocol.Error(
                code=protocol.CODE_VERSION,
                message=f"this relay speaks protocol version "
                f"{protocol.PROTOCOL_VERSION}, not {hello.version}",
            )
        try:
            grant = tokens.verify(
                hello.token,
                self.public_key,
                revoked=self.revoked,
                now=self.clock() if now is None else now,
                relay=self.domain,
            )
        except tokens.TokenError as exc:
            self.metrics.count_auth_failure(exc.reason)
            return protocol.Error(code=protocol.CODE_AUTH, message=str(exc))
        if self.shutting_down:
            return protocol.Error(
                code=protocol.CODE_SHUTTING_DOWN, message="the relay is shutting down"
            )
        if hello.workload is not None and len(hello.workload) > MAX_WORKLOAD_ID:
            return protocol.Error(
                code=protocol.CODE_BAD_REQUEST,
                message=f"workload ids are at most {MAX_WORKLOAD_ID} long",
            )
        return grant

    def check_capacity(self, held: int, *, workers: int = 1) -> protocol.Error | None:
        """Why the relay, holding ``held`` sessions in this process (one of
        ``workers``, each with its share of the limit), takes no more, or None."""
        limit = -(-self.config.max_sessions // workers)
        if held < limit:
            return None
        return protocol.Error(
            code=protocol.CODE_FULL,
            message=f"this relay holds its most sessions ({self.config.max_sessions}); "
            "try another relay",
        )

    def check_sessions(self, held: int) -> protocol.Error | None:
        """Why a token that holds ``held`` live sessions may not open another, or None."""
        limit = self.config.max_sessions_per_token
        if held < limit:
            return None
        return protocol.Error(
            code=protocol.CODE_LIMIT,
            message=f"this token may hold at most {limit} sessions at once",
        )

    def check_session(
        self, grant: tokens.TokenGrant, *, now: float | None = None
    ) -> protocol.Error | None:
        """Why a live session of ``grant`` must end at ``now`` (wall-clock time; None:
        ``clock()``), or None while its token is still good.

        Asked on every ``open`` and by the relay's periodic sweep, so that a
        token's expiry holds for the whole life of a session, not only at ``hello``.
        """
        refusal = tokens.check_time(grant, now=self.clock() if now is None else now)
        # Only expiry: "not valid yet" was settled at hello, and time moves on.
        if refusal is None or refusal.reason != "expired":
            return None
        return protocol.Error(code=protocol.CODE_TOKEN_EXPIRED, message=str(refusal))

    def check_open(
        self,
        message: protocol.Open,
        *,
        grant: tokens.TokenGrant,
        tunnels: Collection[int],
        now: float,
        wall: float | None = None,
    ) -> Admitted | protocol.Error:
        """Whether a session holding ``tunnels`` (their ids) may open ``message``.

        ``now`` is monotonic time, for the token's creation rate; a new tunnel
        (one without a claim) that passes every check counts against it.
        ``wall`` is the wall-clock time the token is checked at (None:
        ``clock()``); an expired token gets ``token-expired``, and the
        session should end.
        """

        def refuse(code: str, text: str) -> protocol.Error:
            return protocol.Error(id=message.id, code=code, message=text)

        ended = self.check_session(grant, now=wall)
        if ended is not None:
            return refuse(ended.code, ended.message)
        config = self.config
        if message.id in tunnels:
            return refuse(protocol.CODE_BAD_REQUEST, f"tunnel id {message.id} is already in use")
        if len(tunnels) >= config.max_tunnels_per_session:
            return refuse(
                protocol.CODE_LIMIT,
                f"this session may hold at most {config.max_tunnels_per_session} tunnels",
            )
        token = grant.token_id
        limit = config.max_tunnels_per_token
        if grant.max_tunnels is not None:
            limit = min(limit, grant.max_tunnels)
        claim = None if message.claim is None else self.claims.check(message.claim, token)
        # A name taken back from the token's own lost session frees that
        # session's tunnel as it is published again: it is not one more.
        held = self.routes.get(claim.label) if claim is not None else None
        reclaimed = held is not None and not held.closed and held.session.grant.token_id == token
        if self.quotas.holds(token) - reclaimed >= limit:
            return refuse(protocol.CODE_LIMIT, f"this token may hold at most {limit} tunnels")
        if message.claim is None and not self.quotas.may_create(token, now):
            return refuse(
                protocol.CODE_LIMIT,
                f"this token opens tunnels too fast: at most "
                f"{config.tunnel_creations_per_second:g} a second",
            )
        # Taking names back is free up to a reconnect or two, not in a loop: each
        # is an unpublish, a publish, a TCP port bound again and lines in the log.
        if claim is not None and not self.quotas.may_reclaim(token, now, limit):
            return refuse(
                protocol.CODE_LIMIT,
                f"this token takes names back too fast: at most "
                f"{config.tunnel_creations_per_second:g} a second, after a burst",
            )
        if self.shutting_down:
            return refuse(protocol.CODE_SHUTTING_DOWN, "the relay is shutting down")
        try:
            allow = allowlist.from_wire(message.allow)  # checked again: agents are not trusted
        except InvalidError as exc:
            return refuse(protocol.CODE_BAD_REQUEST, str(exc))
        # A label of another worker: the relay now runs another number of workers.
        if message.claim is not None and (claim is None or not self.owns(claim.label)):
            return refuse(
                protocol.CODE_CLAIM, "the claim is not valid for this token on this relay"
            )
        return Admitted(allow=allow, claim=claim)

    def check_port(
        self, message: protocol.Open, holder: RelayTunnel | None
    ) -> protocol.Error | None:
        """Refuse a port that the workload already forwards (``holder`` is its tunnel)."""
        if holder is None:
            return None
        return protocol.Error(
            id=message.id,
            code=protocol.CODE_PORT_FORWARDED,
            message=f"Port {message.local_port} is already forwarded",
        )
