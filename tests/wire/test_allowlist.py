"""burrow.wire.allowlist: parsing visitor CIDR allowlists and checking addresses against them."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from burrow.exception import InvalidError
from burrow.wire import allowlist


def test_parse_normalises_entries() -> None:
    networks = allowlist.parse(["10.1.2.3/8", " 192.0.2.7 ", "2001:db8::1/32", "::1"])
    assert allowlist.to_wire(networks) == "10.0.0.0/8,192.0.2.7/32,2001:db8::/32,::1/128"


def test_ipv4_mapped_entries_become_ipv4() -> None:
    (network,) = allowlist.parse(["::ffff:10.0.0.0/104"])
    assert network == ipaddress.IPv4Network("10.0.0.0/8")


@pytest.mark.parametrize(
    "entry", ["banana", "10.0.0.0/33", "300.1.1.1", "10.0.0.0/8,", "", "2001:db8::/129", "1.2.3"]
)
def test_a_bad_entry_is_named(entry: str) -> None:
    with pytest.raises(InvalidError) as info:
        allowlist.parse(["127.0.0.1/32", entry])
    assert repr(entry) in str(info.value)


@pytest.mark.parametrize("value", ["10.0.0.0/8", b"10.0.0.0/8", 8, [8], [None]])
def test_not_a_list_of_strings(value: Any) -> None:
    with pytest.raises(InvalidError, match="allowlist"):
        allowlist.parse(value)


def test_too_many_entries() -> None:
    entries = [f"10.0.{i // 256}.{i % 256}" for i in range(allowlist.MAX_ENTRIES + 1)]
    assert len(allowlist.parse(entries[:-1])) == allowlist.MAX_ENTRIES
    with pytest.raises(InvalidError, match=f"at most {allowlist.MAX_ENTRIES}"):
        allowlist.parse(entries)


def test_wire_form() -> None:
    assert allowlist.from_wire(None) is None
    assert allowlist.from_wire("") == ()
    assert allowlist.from_wire("10.0.0.0/8,::1/128") == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    with pytest.raises(InvalidError, match="'nope'"):
        allowlist.from_wire("10.0.0.0/8,nope")
    with pytest.raises(InvalidError, match="''"):
        allowlist.from_wire("10.0.0.0/8,")  # a trailing comma is an empty entry


def test_allows() -> None:
    networks = allowlist.parse(["127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32"])
    assert allowlist.allows(networks, "127.0.0.1")
    assert allowlist.allows(networks, "10.200.3.4")
    assert allowlist.allows(networks, "2001:db8::42")
    assert not allowlist.allows(networks, "127.0.0.2")
    assert not allowlist.allows(networks, "::1")  # loopback, but not on a v4-only entry
    assert not allowlist.allows(networks, "2001:db9::1")
    assert not allowlist.allows(networks, "not an address")
    assert not allowlist.allows(networks, "")


def test_ipv4_mapped_visitors_are_compared_as_ipv4() -> None:
    # What a dual-stack socket reports for an IPv4 visitor.
    assert allowlist.allows(allowlist.parse(["127.0.0.0/8"]), "::ffff:127.0.0.1")
    assert not allowlist.allows(allowlist.parse(["::ffff:0:0/96"]), "::1")
    assert not allowlist.allows(allowlist.parse(["10.0.0.0/8"]), "::ffff:127.0.0.1")


def test_zone_ids_are_ignored() -> None:
    assert allowlist.allows(allowlist.parse(["fe80::/10"]), "fe80::1%eth0")


def test_none_lets_everyone_in_and_empty_no_one() -> None:
    assert allowlist.allows(None, "192.0.2.1")
    assert allowlist.allows(None, "garbage")
    assert not allowlist.allows((), "127.0.0.1")


@given(st.ip_addresses(), st.lists(st.ip_addresses(), max_size=8))
def test_an_address_is_allowed_by_its_own_network(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
    others: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return  # compared as its IPv4 address; covered above
    entries = [*map(str, others), str(address)]
    networks = allowlist.from_wire(allowlist.to_wire(allowlist.parse(entries)))
    assert allowlist.allows(networks, str(address))
    assert allowlist.allows(networks[:-1], str(address)) == any(
        str(address) == str(other)
        or (
            isinstance(other, ipaddress.IPv6Address)
            and other.ipv4_mapped is not None
            and str(other.ipv4_mapped) == str(address)
        )
        for other in others
    )
