"""Tests for burrow.relay.admission: hello and open go in, an error or a go-ahead
comes out. No sockets, and time is passed in."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from burrow import tokens
from burrow.relay.admission import MAX_WORKLOAD_ID, Admission, Admitted
from burrow.relay.claims import Claim, ClaimSigner
from burrow.relay.config import RelayConfig
from burrow.relay.quota import TokenQuotas
from burrow.relay.registry import RelayTunnel
from burrow.wire import allowlist, protocol

NOW = 1_800_000_000
KEY = tokens.generate_signing_key()
CLAIMS = ClaimSigner(b"relay key")
CONFIG = RelayConfig(
    domain="r1.example.com",
    cert=Path("unused.pem"),
    key=Path("unused.key"),
    public_key=Path("unused.pub"),
    max_tunnels_per_session=3,
    max_tunnels_per_token=5,
    tunnel_creations_per_second=1.0,
    tunnel_creation_burst=2,
)


def admission(config: RelayConfig = CONFIG, **kw: object) -> Admission:
    quotas = TokenQuotas(
        config.max_tunnels_per_token,
        config.tunnel_creations_per_second,
        config.tunnel_creation_burst,
    )
    return Admission(config, KEY.public_key(), quotas, CLAIMS, **kw)  # type: ignore[arg-type]


def hello(token: str, **kw: object) -> protocol.Hello:
    fields: dict[str, object] = {
        "version": protocol.PROTOCOL_VERSION,
        "token": token,
        "agent": "test",
    }
    fields.update(kw)
    return protocol.Hello(**fields)  # type: ignore[arg-type]


def mint(**kw: object) -> str:
    return tokens.mint(KEY, subject="ci", ttl_seconds=3600, now=NOW, **kw)  # type: ignore[arg-type]


def grant(
    token_id: str = "tok1", max_tunnels: int | None = None, expires_at: int | None = None
) -> tokens.TokenGrant:
    return tokens.TokenGrant(
        subject="ci",
        token_id=token_id,
        issued_at=NOW,
        expires_at=expires_at,
        max_tunnels=max_tunnels,
    )


def open_(tunnel_id: int = 1, **kw: object) -> protocol.Open:
    fields: dict[str, object] = {"id": tunnel_id, "local_port": 8000, "tcp": False, "h2": False}
    fields.update(kw)
    return protocol.Open(**fields)  # type: ignore[arg-type]


def error(code: str, message: str, tunnel_id: int | None = None) -> protocol.Error:
    return protocol.Error(id=tunnel_id, code=code, message=message)


# -- hello --------------------------------------------------------------------------


def test_a_good_hello_gets_what_its_token_grants() -> None:
    token = mint(max_tunnels=7)
    got = admission().check_hello(hello(token), now=NOW + 1)
    assert isinstance(got, tokens.TokenGrant)
    assert (got.subject, got.token_id, got.max_tunnels) == ("ci", tokens.token_id_of(token), 7)


def test_another_protocol_version_is_refused_first() -> None:
    gate = admission()
    gate.shutting_down = True
    assert gate.check_hello(hello("junk", version=1), now=NOW) == error(
        protocol.CODE_VERSION,
        f"this relay speaks protocol version {protocol.PROTOCOL_VERSION}, not 1",
    )


@pytest.mark.parametrize(
    ("token", "now", "message"),
    [
        ("junk", NOW, "token is malformed: not three base64url segments"),
        (mint(), NOW + 7200, "token expired at 2027-01-15T09:00:00Z"),
    ],
)
def test_a_bad_token_is_refused_before_anything_else(token: str, now: int, message: str) -> None:
    gate = admission()
    gate.shutting_down = True
    assert gate.check_hello(hello(token, workload="w" * 999), now=now) == error(
        protocol.CODE_AUTH, message
    )


def test_a_revoked_token_is_refused() -> None:
    token = mint()
    token_id = tokens.token_id_of(token)
    got = admission(revoked={token_id}).check_hello(hello(token), now=NOW)
    assert got == error(protocol.CODE_AUTH, f"token {token_id} was revoked")


def test_a_relay_shutting_down_refuses_new_agents() -> None:
    gate = admission()
    gate.shutting_down = True
    assert gate.check_hello(hello(mint()), now=NOW) == error(
        protocol.CODE_SHUTTING_DOWN, "the relay is shutting down"
    )


def test_a_workload_id_has_a_cap() -> None:
    gate = admission()
    assert isinstance(
        gate.check_hello(hello(mint(), workload="w" * MAX_WORKLOAD_ID), now=NOW),
        tokens.TokenGrant,
    )
    assert gate.check_hello(hello(mint(), workload="w" * (MAX_WORKLOAD_ID + 1)), now=NOW) == (
        error(protocol.CODE_BAD_REQUEST, f"workload ids are at most {MAX_WORKLOAD_ID} long")
    )


# -- open ---------------------------------------------------------------------------


def test_a_token_holds_at_most_its_sessions_limit() -> None:
    checks = admission(dataclasses.replace(CONFIG, max_sessions_per_token=2))
    assert checks.check_sessions(0) is None
    assert checks.check_sessions(1) is None
    assert checks.check_sessions(2) == error(
        protocol.CODE_LIMIT, "this token may hold at most 2 sessions at once"
    )


def test_a_full_relay_says_so() -> None:
    checks = admission(dataclasses.replace(CONFIG, max_sessions=3))
    assert checks.check_capacity(2) is None
    full = error(protocol.CODE_FULL, "this relay holds its most sessions (3); try another relay")
    assert checks.check_capacity(3) == full
    # Each of several workers holds its share, rounded up.
    assert checks.check_capacity(1, workers=2) is None
    assert checks.check_capacity(2, workers=2) == full
    assert checks.check_capacity(0, workers=8) is None
    assert checks.check_capacity(1, workers=8) == full


def test_a_token_of_either_key_of_a_rotation_is_admitted() -> None:
    new = tokens.generate_signing_key()
    ring = tokens.KeyRing.of([KEY.public_key(), new.public_key()])
    quotas = TokenQuotas(5, 1.0, 2)
    checks = Admission(CONFIG, ring, quotas, CLAIMS)
    for key in (KEY, new):
        token = tokens.mint(key, subject="ci", ttl_seconds=3600, now=NOW)
        assert isinstance(checks.check_hello(hello(token), now=NOW), tokens.TokenGrant)
    stranger = tokens.mint(tokens.generate_signing_key(), subject="ci", ttl_seconds=60, now=NOW)
    refused = checks.check_hello(hello(stranger), now=NOW)
    assert isinstance(refused, protocol.Error) and refused.code == protocol.CODE_AUTH
    assert "which this relay does not hold" in refused.message
    assert checks.metrics.auth_failures["unknown-key"] == 1


def test_a_good_open_goes_ahead_with_its_allowlist_parsed() -> None:
    got = admission().check_open(open_(allow="10.0.0.0/8"), grant=grant(), tunnels={}, now=0.0)
    assert got == Admitted(allow=allowlist.from_wire("10.0.0.0/8"), claim=None)
    assert admission().check_open(open_(), grant=grant(), tunnels={}, now=0.0) == Admitted(
        allow=None, claim=None
    )


def test_a_tunnel_id_in_use_is_refused() -> None:
    got = admission().check_open(open_(2), grant=grant(), tunnels={1, 2}, now=0.0)
    assert got == error(protocol.CODE_BAD_REQUEST, "tunnel id 2 is already in use", 2)


def test_a_session_holds_at_most_its_limit() -> None:
    got = admission().check_open(open_(4), grant=grant(), tunnels={1, 2, 3}, now=0.0)
    assert got == error(protocol.CODE_LIMIT, "this session may hold at most 3 tunnels", 4)


def test_a_token_holds_at_most_the_relays_limit_or_its_own() -> None:
    gate = admission()
    for _ in range(5):
        gate.quotas.add("tok1")
    assert gate.check_open(open_(), grant=grant(), tunnels={}, now=0.0) == error(
        protocol.CODE_LIMIT, "this token may hold at most 5 tunnels", 1
    )
    gate = admission()
    gate.quotas.add("tok1")
    assert gate.check_open(open_(), grant=grant(max_tunnels=1), tunnels={}, now=0.0) == error(
        protocol.CODE_LIMIT, "this token may hold at most 1 tunnels", 1
    )
    # Another token has its own count.
    assert isinstance(
        gate.check_open(open_(), grant=grant("tok2", max_tunnels=1), tunnels={}, now=0.0),
        Admitted,
    )


def test_new_tunnels_are_rate_limited_but_names_taken_back_are_not() -> None:
    gate = admission()
    too_fast = error(
        protocol.CODE_LIMIT, "this token opens tunnels too fast: at most 1 a second", 1
    )
    assert isinstance(gate.check_open(open_(), grant=grant(), tunnels={}, now=0.0), Admitted)
    assert isinstance(gate.check_open(open_(), grant=grant(), tunnels={}, now=0.0), Admitted)
    assert gate.check_open(open_(), grant=grant(), tunnels={}, now=0.0) == too_fast
    claim = CLAIMS.sign("abcdefghijklmn", None, "tok1")
    assert isinstance(
        gate.check_open(open_(claim=claim), grant=grant(), tunnels={}, now=0.0), Admitted
    )
    assert isinstance(gate.check_open(open_(), grant=grant(), tunnels={}, now=1.0), Admitted)


def test_a_refused_open_does_not_spend_the_rate() -> None:
    gate = admission()
    for _ in range(3):
        gate.check_open(open_(2), grant=grant(), tunnels={2}, now=0.0)
    assert isinstance(gate.check_open(open_(), grant=grant(), tunnels={}, now=0.0), Admitted)
    assert isinstance(gate.check_open(open_(), grant=grant(), tunnels={}, now=0.0), Admitted)


def test_a_relay_shutting_down_opens_nothing() -> None:
    gate = admission()
    gate.shutting_down = True
    assert gate.check_open(open_(), grant=grant(), tunnels={}, now=0.0) == error(
        protocol.CODE_SHUTTING_DOWN, "the relay is shutting down", 1
    )


def test_a_bad_allowlist_is_refused_again_at_the_relay() -> None:
    got = admission().check_open(open_(allow="not-a-network"), grant=grant(), tunnels={}, now=0.0)
    assert isinstance(got, protocol.Error)
    assert (got.id, got.code) == (1, protocol.CODE_BAD_REQUEST)
    assert "not-a-network" in got.message


def test_a_valid_claim_gives_its_names_back() -> None:
    claim = CLAIMS.sign("abcdefghijklmn", 20001, "tok1")
    got = admission().check_open(open_(claim=claim), grant=grant(), tunnels={}, now=0.0)
    assert got == Admitted(allow=None, claim=Claim("abcdefghijklmn", 20001))


@pytest.mark.parametrize(
    "claim",
    [
        CLAIMS.sign("abcdefghijklmn", None, "tok2"),  # another token's
        ClaimSigner(b"other relay").sign("abcdefghijklmn", None, "tok1"),  # another relay's
        "junk",
    ],
)
def test_a_claim_that_proves_nothing_is_refused(claim: str) -> None:
    got = admission().check_open(open_(claim=claim), grant=grant(), tunnels={}, now=0.0)
    assert got == error(
        protocol.CODE_CLAIM, "the claim is not valid for this token on this relay", 1
    )


def test_a_claim_on_another_workers_label_is_refused() -> None:
    claim = CLAIMS.sign("abcdefghijklmn", None, "tok1")
    gate = admission(owns=lambda label: False)
    assert gate.check_open(open_(claim=claim), grant=grant(), tunnels={}, now=0.0) == error(
        protocol.CODE_CLAIM, "the claim is not valid for this token on this relay", 1
    )


def test_a_port_the_workload_forwards_already_is_refused() -> None:
    holder = RelayTunnel(
        session=None,  # type: ignore[arg-type]
        id=9,
        label="abcdefghijklmn",
        host="abcdefghijklmn.r1.example.com",
        h2=False,
        local_port=8000,
    )
    gate = admission()
    assert gate.check_port(open_(3), None) is None
    assert gate.check_port(open_(3), holder) == error(
        protocol.CODE_PORT_FORWARDED, "Port 8000 is already forwarded", 3
    )


def test_the_limits_come_from_the_config() -> None:
    config = replace(CONFIG, max_tunnels_per_session=1)
    got = admission(config).check_open(open_(2), grant=grant(), tunnels={1}, now=0.0)
    assert got == error(protocol.CODE_LIMIT, "this session may hold at most 1 tunnels", 2)


# -- a token's life: expiry, not-before, the relays it names --------------------------


def test_a_token_that_names_other_relays_is_refused() -> None:
    token = mint(relays=["r2.example.com"])
    assert admission().check_hello(hello(token), now=NOW) == error(
        protocol.CODE_AUTH, "token is for r2.example.com only, not r1.example.com"
    )
    # The relay's own domain is compared normalised, whatever its config says.
    gate = admission(replace(CONFIG, domain="R1.Example.COM."))
    got = gate.check_hello(hello(mint(relays=["r2.example.com", "r1.example.com"])), now=NOW)
    assert isinstance(got, tokens.TokenGrant)


def test_a_token_before_its_nbf_is_refused_at_hello() -> None:
    token = mint(not_before=NOW + 600)
    got = admission().check_hello(hello(token), now=NOW)
    assert got == error(
        protocol.CODE_AUTH, "token is not valid yet: not before 2027-01-15T08:10:00Z"
    )
    assert isinstance(admission().check_hello(hello(token), now=NOW + 600), tokens.TokenGrant)


def test_an_expired_token_opens_nothing() -> None:
    gate = admission()
    doomed = grant(expires_at=NOW + 60)
    # Within the leeway, it still opens.
    got = gate.check_open(open_(1), grant=doomed, tunnels={}, now=0.0, wall=NOW + 60 + 29)
    assert isinstance(got, Admitted)
    got = gate.check_open(open_(2), grant=doomed, tunnels={1}, now=0.0, wall=NOW + 60 + 30)
    assert got == error(protocol.CODE_TOKEN_EXPIRED, "token expired at 2027-01-15T08:01:00Z", 2)
    # Before anything else: even a claim is refused.
    claim = CLAIMS.sign("abcdefghijklmn", None, "tok1")
    got = gate.check_open(open_(3, claim=claim), grant=doomed, tunnels={}, now=0.0, wall=NOW + 999)
    assert isinstance(got, protocol.Error) and got.code == protocol.CODE_TOKEN_EXPIRED


def test_a_live_session_of_an_expired_token_is_ended() -> None:
    gate = admission()
    assert gate.check_session(grant(expires_at=NOW + 60), now=NOW + 89) is None
    assert gate.check_session(grant(), now=NOW + 10**9) is None
    assert gate.check_session(grant(expires_at=NOW + 60), now=NOW + 90) == error(
        protocol.CODE_TOKEN_EXPIRED, "token expired at 2027-01-15T08:01:00Z"
    )


# -- taking names back at the limit -----------------------------------------------


def held_by(token_id: str, label: str = "abcdefghijklmn") -> RelayTunnel:
    @dataclass
    class Holder:
        grant: tokens.TokenGrant
        closed: bool = False

    return RelayTunnel(
        session=Holder(grant(token_id)),  # type: ignore[arg-type]
        id=1,
        label=label,
        host=f"{label}.r1.example.com",
        h2=False,
        local_port=8000,
    )


def test_a_token_at_its_limit_may_take_back_its_own_names() -> None:
    routes = {"abcdefghijklmn": held_by("tok1")}
    gate = admission(routes=routes)
    gate.quotas.add("tok1")  # the tunnel its lost session still holds
    claim = CLAIMS.sign("abcdefghijklmn", None, "tok1")
    got = gate.check_open(open_(claim=claim), grant=grant(max_tunnels=1), tunnels={}, now=0.0)
    assert got == Admitted(allow=None, claim=Claim("abcdefghijklmn", None))
    # A new tunnel, or a claim on a name no one holds, still counts against the limit.
    full = error(protocol.CODE_LIMIT, "this token may hold at most 1 tunnels", 1)
    assert gate.check_open(open_(), grant=grant(max_tunnels=1), tunnels={}, now=0.0) == full
    other = CLAIMS.sign("zzzzzzzzzzzzzz", None, "tok1")
    got = gate.check_open(open_(claim=other), grant=grant(max_tunnels=1), tunnels={}, now=0.0)
    assert got == full
