"""Tests for burrow.relay.registry: the route table, sessions' tunnels, workload
ports and quotas kept in step, with no sockets."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from burrow.net.channel import Channel
from burrow.relay.ports import TcpPorts
from burrow.relay.quota import TokenQuotas
from burrow.relay.registry import Registry, RelayTunnel
from burrow.tokens import TokenGrant
from burrow.wire import names, protocol

DOMAIN = "r1.example.com"


def grant(token_id: str = "tok1") -> TokenGrant:
    return TokenGrant(
        subject="ci", token_id=token_id, issued_at=0, expires_at=None, max_tunnels=None
    )


@dataclass(eq=False)
class FakeSession:
    """A session as the registry sees it (burrow.relay.registry.SessionHandle)."""

    id: str
    grant: TokenGrant = field(default_factory=grant)
    workload: str | None = None
    key: str = "key"
    closed: bool = False
    carried: list[int] = field(default_factory=lambda: [0, 0])
    peer: str = "127.0.0.1:1"
    agent: str = "test"
    connected_since: float = 0.0
    pooled: int = 0

    def add_data_connection(self, channel: Channel) -> None:
        raise AssertionError("not used by the registry")

    async def take_data_connection(self, wait_seconds: float) -> Channel | None:
        raise AssertionError("not used by the registry")

    def end(self, error: protocol.Error) -> None:
        self.closed = True

    def leave(self, reason: str) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True


class Closable:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def new_registry(**kw: int) -> Registry:
    return Registry(DOMAIN, TokenQuotas(100, 10.0, 10), **kw)


def open_(
    tunnel_id: int = 1, local_port: int = 8000, *, tcp: bool = False, h2: bool = False
) -> protocol.Open:
    return protocol.Open(id=tunnel_id, local_port=local_port, tcp=tcp, h2=h2)


def test_a_published_tunnel_is_routed_held_by_its_session_and_counted() -> None:
    registry = new_registry()
    session = FakeSession("s1")
    registry.add_session(session)
    tunnel = registry.publish(session, open_(h2=True))
    assert names.is_label(tunnel.label)
    assert tunnel.host == f"{tunnel.label}.{DOMAIN}"
    assert (tunnel.id, tunnel.local_port, tunnel.h2, tunnel.allow) == (1, 8000, True, None)
    assert registry.routes == {tunnel.label: tunnel}
    assert registry.tunnels_of(session) == {1: tunnel}
    assert registry.quotas.holds("tok1") == 1
    assert registry.sessions == {"s1": session}


def test_a_claimed_label_is_published_under_that_label() -> None:
    registry = new_registry()
    session = FakeSession("s1")
    tunnel = registry.publish(session, open_(), "abcdefghijklmn")
    assert registry.routes["abcdefghijklmn"] is tunnel


def test_the_tables_are_read_only_outside_the_registry() -> None:
    registry = new_registry()
    session = FakeSession("s1")
    registry.publish(session, open_())
    with pytest.raises(TypeError):
        registry.routes["x"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        registry.sessions["x"] = session  # type: ignore[index]
    with pytest.raises(TypeError):
        registry.tunnels_of(session)[2] = None  # type: ignore[index]


def test_unpublishing_clears_every_table_and_closes_what_the_tunnel_holds() -> None:
    registry = new_registry()
    session = FakeSession("s1", workload="w1")
    tunnel = registry.publish(session, open_())
    server, splice = Closable(), Closable()
    tunnel.tcp_servers.append(server)
    tunnel.splices.add(splice)  # type: ignore[arg-type]
    registry.unpublish(tunnel)
    assert tunnel.closed and server.closed and splice.closed
    assert not tunnel.splices
    assert registry.routes == {}
    assert registry.tunnels_of(session) == {}
    assert registry.quotas.holds("tok1") == 0
    assert registry.port_holder(session, 8000) is None
    registry.unpublish(tunnel)  # twice is once
    assert registry.quotas.holds("tok1") == 0


def test_a_draining_relay_unpublishes_but_keeps_visitors_in_flight() -> None:
    registry = new_registry()
    session = FakeSession("s1")
    tunnel = registry.publish(session, open_())
    splice = Closable()
    tunnel.splices.add(splice)  # type: ignore[arg-type]
    registry.unpublish(tunnel, keep_connections=True)
    assert tunnel.closed and not splice.closed
    assert registry.routes == {}


def test_removing_a_session_unpublishes_its_tunnels_only() -> None:
    registry = new_registry()
    a, b = FakeSession("sa"), FakeSession("sb", grant=grant("tok2"))
    for session in (a, b):
        registry.add_session(session)
    a1 = registry.publish(a, open_(1))
    a2 = registry.publish(a, open_(2, 8001))
    b1 = registry.publish(b, open_(1))
    registry.remove_session(a)
    assert a1.closed and a2.closed and not b1.closed
    assert registry.routes == {b1.label: b1}
    assert registry.sessions == {"sb": b}
    assert registry.tunnels_of(a) == {}
    assert (registry.quotas.holds("tok1"), registry.quotas.holds("tok2")) == (0, 1)


def test_a_workload_forwards_a_port_once_across_its_sessions() -> None:
    registry = new_registry()
    first = FakeSession("s1", workload="w1")
    second = FakeSession("s2", workload="w1")
    other_workload = FakeSession("s3", workload="w2")
    no_workload = FakeSession("s4")
    other_token = FakeSession("s5", grant=grant("tok2"), workload="w1")
    tunnel = registry.publish(first, open_())
    assert registry.port_holder(second, 8000) is tunnel
    assert registry.port_holder(second, 8001) is None
    assert registry.port_holder(other_workload, 8000) is None
    assert registry.port_holder(no_workload, 8000) is None
    assert registry.port_holder(other_token, 8000) is None
    registry.unpublish(tunnel)
    assert registry.port_holder(second, 8000) is None


def test_a_closed_holder_does_not_hold_the_port() -> None:
    registry = new_registry()
    session = FakeSession("s1", workload="w1")
    tunnel = registry.publish(session, open_())
    tunnel.closed = True
    assert registry.port_holder(session, 8000) is None


def test_unpublishing_a_label_taken_back_leaves_the_new_tunnel_routed() -> None:
    # A reconnected session took the label back: the old tunnel going away
    # must not remove the new one's route.
    registry = new_registry()
    old, new = FakeSession("old", workload="w"), FakeSession("new", workload="w")
    before = registry.publish(old, open_(), "abcdefghijklmn")
    registry.unpublish(before)
    after = registry.publish(new, open_(), "abcdefghijklmn")
    stale = RelayTunnel(
        session=old, id=1, label="abcdefghijklmn", host="", h2=False, local_port=8000
    )
    registry.unpublish(stale)
    assert registry.routes == {"abcdefghijklmn": after}
    assert registry.port_holder(new, 8000) is after


def test_new_names_are_fresh_and_owned_by_this_worker() -> None:
    registry = new_registry(worker_index=2, worker_count=3)
    made = {registry.new_name() for _ in range(200)}
    assert len(made) == 200
    assert all(names.worker_of(name, 3) == 2 and registry.owns(name) for name in made)
    foreign = next(n for n in iter(names.new_label, None) if names.worker_of(n, 3) != 2)
    assert not registry.owns(foreign)
    assert new_registry().owns("anything")


def test_a_new_name_skips_names_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = new_registry()
    session = FakeSession("aaaaaaaaaaaaaa")
    registry.add_session(session)
    registry.publish(session, open_(), "bbbbbbbbbbbbbb")
    made = iter(["aaaaaaaaaaaaaa", "bbbbbbbbbbbbbb", "cccccccccccccc"])
    monkeypatch.setattr(names, "new_label_for", lambda index, count: next(made))
    assert registry.new_name() == "cccccccccccccc"


async def test_an_unpublished_tcp_port_is_kept_for_its_token() -> None:
    async def bind(host: str, port: int) -> Closable:
        return Closable()

    ports = TcpPorts(["127.0.0.1"], (21000, 21000), clock=lambda: 0.0)
    registry = Registry(DOMAIN, TokenQuotas(100, 10.0, 10), ports=ports)
    alice = FakeSession("alice-session", grant("alice"))
    tunnel = registry.publish(alice, open_(tcp=True))
    tunnel.tcp_port, tunnel.tcp_servers = await ports.bind(bind, owner="alice")
    registry.remove_session(alice)
    assert tunnel.tcp_servers[0].closed
    assert ports.held_for(21000) == "alice"
    assert list(ports.candidates(owner="bob")) == []
    assert list(ports.candidates(21000, owner="alice")) == [21000]
