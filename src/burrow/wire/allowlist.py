"""Visitor CIDR allowlists: which addresses may reach a tunnel.

``forward(inbound_cidr_allowlist=[...])`` checks the list, sends it in the
``open`` message as comma-separated CIDRs (``allow``), and the relay parses
it again, since it trusts no agent, then checks every visitor's address
against it before a byte of the visitor reaches the agent. Sans-IO.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Final

from burrow.exception import InvalidError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# Each visitor is compared with every entry, and the whole list travels in
# one open frame: 256 entries keep both small (a linear scan of microseconds,
# about 11 KB of IPv6 CIDRs in a 64 KiB frame). A longer list belongs in a
# firewall.
MAX_ENTRIES: Final = 256

# IPv4 addresses as an IPv6 socket shows them (``::ffff:192.0.2.1``).
_V4_MAPPED: Final = ipaddress.IPv6Network("::ffff:0:0/96")


def _network(entry: object) -> Network:
    if not isinstance(entry, str):
        raise InvalidError(f"allowlist entry {entry!r} is not a string")
    try:
        network = ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        raise InvalidError(
            f"allowlist entry {entry!r} is not an IP network in CIDR notation "
            "(like 10.0.0.0/8, 192.0.2.7 or 2001:db8::/32)"
        ) from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_V4_MAPPED):
        # Visitors' addresses are compared as IPv4, so a mapped entry must be too.
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse(entries: Iterable[str]) -> tuple[Network, ...]:
    """The networks of ``entries`` (CIDRs or bare addresses); InvalidError names a bad one.

    Host bits are allowed and dropped (``10.1.2.3/8`` is ``10.0.0.0/8``).
    """
    if isinstance(entries, str | bytes):
        raise InvalidError(
            f"the allowlist must be a list of CIDR strings, not one string: write [{entries!r}]"
        )
    try:
        items = list(entries)
    except TypeError:
        raise InvalidError(f"the allowlist must be a list of CIDRs, not {entries!r}") from None
    networks = tuple(_network(entry) for entry in items)
    if len(networks) > MAX_ENTRIES:
        raise InvalidError(
            f"the allowlist has {len(networks)} entries; at most {MAX_ENTRIES} are allowed"
        )
    return networks


def to_wire(networks: Iterable[Network]) -> str:
    """The ``allow`` member of ``open``: CIDRs joined by commas (empty: nobody)."""
    return ",".join(str(network) for network in networks)


def from_wire(text: str | None) -> tuple[Network, ...] | None:
    """An ``open`` message's ``allow``: None lets everyone in, ``""`` nobody."""
    if text is None:
        return None
    if text == "":
        return ()
    return parse(text.split(","))


def allows(networks: tuple[Network, ...] | None, host: str) -> bool:
    """Whether a visitor from ``host`` (an IP address as a socket reports it) may connect."""
    if networks is None:
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])  # no IPv6 zone id
    except ValueError:
        return False  # not an IP address (a Unix socket?): not on any list
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)
