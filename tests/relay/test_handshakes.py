"""Unfinished handshakes: the oldest goes first, past the total and past a source's own cap."""

from __future__ import annotations

from burrow.relay.handshakes import Handshakes, source_of


def test_past_the_total_the_oldest_goes_first() -> None:
    pending: Handshakes[str] = Handshakes(total=3, per_source=10)
    assert [pending.add(c) for c in "abc"] == [[], [], []]
    assert pending.add("d") == ["a"]
    pending.discard("b")  # its handshake ended
    assert pending.add("e") == []
    assert pending.add("f") == ["c"]
    assert len(pending) == 3 and "d" in pending and "c" not in pending


def test_past_a_sources_cap_its_own_oldest_goes() -> None:
    pending: Handshakes[str] = Handshakes(total=100, per_source=2)
    pending.add("visitor")
    assert pending.place("visitor", "192.0.2.7") == []
    for conn in ("x1", "x2", "x3", "x4"):
        pending.add(conn)
        dropped = pending.place(conn, "198.51.100.1")
    assert dropped == ["x2"]
    assert "visitor" in pending and "x1" not in pending
    assert pending.from_source("198.51.100.1") == 2 and pending.from_source("192.0.2.7") == 1


def test_dropped_for_the_total_leave_their_source_count() -> None:
    pending: Handshakes[str] = Handshakes(total=2, per_source=5)
    for conn in ("a", "b"):
        pending.add(conn)
        pending.place(conn, "203.0.113.1")
    assert pending.add("c") == ["a"]
    assert pending.from_source("203.0.113.1") == 1
    pending.discard("b")
    assert pending.from_source("203.0.113.1") == 0
    assert pending.place("gone", "203.0.113.1") == []  # no longer pending: not counted


def test_sources_are_addresses_and_ipv6_slash_64s() -> None:
    assert source_of("192.0.2.1") == "192.0.2.1"
    assert source_of("::ffff:192.0.2.1") == "192.0.2.1"
    assert (
        source_of("2001:db8:1:2:aaaa::1")
        == source_of("2001:db8:1:2:bbbb::2")
        == ("2001:db8:1:2::/64")
    )
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    assert source_of("fe80::1%eth0") == "fe80::/64"
