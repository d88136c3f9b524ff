"""Tunnel labels, relay domains and host:port addresses.

Everything here is pure string work: it picks the random label a tunnel is
published under, and checks the names and addresses users and visitors hand us.
"""

from __future__ import annotations

import ipaddress
import re
import secrets

from burrow.exception import InvalidError

LABEL_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
# 36 ** 14 is about 2 ** 72: far too many to guess, short enough to read out.
LABEL_LENGTH = 14

# RFC 1035 section 2.3.4: 63 octets per label, 253 characters for the
# whole name once the root's trailing dot is left off.
MAX_DNS_LABEL_LENGTH = 63
MAX_DOMAIN_LENGTH = 253

MAX_PORT = 65535  # TCP ports are 16 bits.

# `localhost` and every name under it mean this machine (RFC 6761 section 6.3).
LOOPBACK_NAME = "localhost"
LOOPBACK_ADDRESS = "127.0.0.1"

_LABEL_RE = re.compile(f"[{LABEL_ALPHABET}]{{{LABEL_LENGTH}}}")
_DNS_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")


def new_label() -> str:
    """Return a fresh random tunnel label, e.g. ``wtqcahqwhd4tu0``."""
    return "".join(secrets.choice(LABEL_ALPHABET) for _ in range(LABEL_LENGTH))


def worker_of(name: str, workers: int) -> int:
    """Which of a relay's ``workers`` processes owns a label or session id.

    A stable hash, the same in every process, so any worker can tell where
    a server name belongs without asking anyone.
    """
    import hashlib  # here, not at the top: only a relay asks, and the client imports names

    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % workers


def new_label_for(worker: int, workers: int) -> str:
    """A fresh label owned by ``worker`` (``log2(workers)`` bits less random than 72)."""
    while True:
        label = new_label()
        if workers == 1 or worker_of(label, workers) == worker:
            return label


def is_label(text: str) -> bool:
    """Whether ``text`` has the shape of a label that :func:`new_label` returns."""
    return _LABEL_RE.fullmatch(text) is not None


def _fold(name: str) -> str | None:
    """Lowercase ``name`` and drop one trailing dot, or None if it is not ASCII.

    Non-ASCII is refused before lowercasing because ``str.lower`` maps some
    non-ASCII letters onto ASCII ones (the Kelvin sign becomes ``k``).
    """
    if not name.isascii():
        return None
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


def server_name(name: str | None) -> str | None:
    """The one normal form of a TLS server name: lowercase, without its one trailing dot.

    None when ``name`` is not a name at all: not ASCII, empty, or with an
    empty label (``a..b``, or two trailing dots). Every path of the relay that
    routes by name (the SNI callback, the hand-off between workers, the
    tunnel lookup) compares this form, so none can disagree with another.
    """
    if name is None:
        return None
    folded = _fold(name)
    if not folded or "" in folded.split("."):
        return None
    return folded


def _is_dns_label(text: str) -> bool:
    return _DNS_LABEL_RE.fullmatch(text) is not None


def normalize_domain(domain: str) -> str:
    """Return ``domain`` lowercased without its trailing dot, or raise InvalidError.

    A relay's domain must be a DNS name, since tunnels are published as
    ``<label>.<domain>``: ``r1.example.com``, ``localhost`` and
    ``r1.localhost`` are fine; IP addresses and internationalised names
    (unless already in their ``xn--`` form) are not.
    """
    folded = _fold(domain)
    if folded is None:
        raise InvalidError(
            f"invalid domain {domain!r}: only ASCII is allowed "
            "(write an internationalised name in its xn-- form)"
        )
    if not folded:
        raise InvalidError(f"invalid domain {domain!r}: it is empty")
    if len(folded) > MAX_DOMAIN_LENGTH:
        raise InvalidError(
            f"invalid domain {domain[:40]!r}...: longer than {MAX_DOMAIN_LENGTH} characters"
        )
    labels = folded.split(".")
    for label in labels:
        if not _is_dns_label(label):
            raise InvalidError(
                f"invalid domain {domain!r}: {label!r} is not a DNS label "
                f"(1 to {MAX_DNS_LABEL_LENGTH} of a-z, 0-9 and '-', "
                "not starting or ending with '-')"
            )
    # RFC 3696 section 2: a top-level domain is never all digits, so a name
    # that ends like one is an IP address, which cannot have names under it.
    if labels[-1].isdigit():
        raise InvalidError(
            f"invalid domain {domain!r}: it looks like an IP address; "
            "the relay needs a DNS name so that <label>.<domain> can exist"
        )
    return folded


def label_of(sni: str | None, domain: str) -> str | None:
    """The first label of the server name ``sni`` when it is exactly ``<one label>.<domain>``.

    Used to route a visitor by the TLS server name it sent, in its normal
    form (:func:`server_name`). Any single DNS label is returned, not only
    ones :func:`new_label` could make: an unknown label is for the routing
    table to miss, not for this to judge.
    """
    name = server_name(sni)
    folded_domain = _fold(domain)
    if name is None or folded_domain is None:
        return None
    label, dot, rest = name.partition(".")
    if not dot or rest != folded_domain or not _is_dns_label(label):
        return None
    return label


def is_loopback_name(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a name under it, which RFC 6761 keeps on loopback."""
    name = _fold(host)
    if name is None:
        return False
    return name == LOOPBACK_NAME or name.endswith("." + LOOPBACK_NAME)


def resolve_host(host: str) -> str:
    """Map loopback names to 127.0.0.1 and leave any other host for the resolver.

    System resolvers do not all follow RFC 6761 for ``*.localhost``, while
    browsers and curl do; doing it here makes ``burrow dev`` work everywhere.
    """
    return LOOPBACK_ADDRESS if is_loopback_name(host) else host


def _parse_port(port: str, text: str) -> int:
    if _PORT_RE.fullmatch(port) is None or int(port) > MAX_PORT:
        raise InvalidError(f"invalid address {text!r}: port must be a number from 0 to {MAX_PORT}")
    return int(port)


def _parse_host(host: str, text: str) -> str:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        return host
    try:
        return normalize_domain(host)
    except InvalidError as exc:
        raise InvalidError(f"invalid address {text!r}: {exc}") from None


def _parse_ipv6(host: str, text: str) -> str:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise InvalidError(f"invalid address {text!r}: {host!r} is not an IPv6 address") from None
    return host


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 literal.

    Host names come back lowercased without a trailing dot; IPv6 literals
    come back without brackets. Raises InvalidError on anything else.
    """
    if not 0 <= default_port <= MAX_PORT:
        raise InvalidError(f"default port {default_port} is not from 0 to {MAX_PORT}")
    if not text:
        raise InvalidError("invalid address '': it is empty")
    if text.startswith("["):
        host, bracket, after = text[1:].partition("]")
        if not bracket:
            raise InvalidError(f"invalid address {text!r}: '[' without a closing ']'")
        if not after:
            return _parse_ipv6(host, text), default_port
        if not after.startswith(":"):
            raise InvalidError(f"invalid address {text!r}: expected ':port' after ']'")
        return _parse_ipv6(host, text), _parse_port(after[1:], text)
    if text.count(":") > 1:
        # Two or more colons can only be an IPv6 literal, which takes no
        # port unless bracketed (otherwise "::1:80" would be ambiguous).
        return _parse_ipv6(text, text), default_port
    host, colon, port = text.partition(":")
    if not host:
        raise InvalidError(f"invalid address {text!r}: the host is missing")
    if not colon:
        return _parse_host(host, text), default_port
    return _parse_host(host, text), _parse_port(port, text)
