"""The relay's DNS zone: what it answers for ``<domain>`` and how often, per source.

Sans-IO: :meth:`Zone.answer` turns one query's bytes into one response's
bytes (or nothing), and :class:`SourceLimits` says whether a source may be
answered at a time the caller passes in. Messages are read and written by
dnspython; ``relay/dnsserver.py`` does the sockets.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset

from burrow.relay.config import DNS_BURST_PER_SOURCE, DNS_RATE_PER_SOURCE
from burrow.relay.handshakes import source_of
from burrow.relay.metrics import DNS_ANSWERS, DNS_TYPES
from burrow.relay.quota import RateLimit

# The largest UDP response, whatever a query's EDNS0 buffer size asks for:
# 1232 bytes fits the IPv6 minimum MTU with its headers, so answers are never
# fragmented (DNS Flag Day 2020). It also caps what one spoofed query can
# reflect at a victim; a larger answer is truncated (TC) and the resolver asks
# again over TCP, where the source address is proven.
UDP_MAX_PAYLOAD: Final = 1232

# A query without EDNS0 may be answered with at most this many bytes (RFC 1035).
UDP_CLASSIC_PAYLOAD: Final = 512

# A TCP message is prefixed by a 16-bit length (RFC 1035 4.2.2).
TCP_MAX_MESSAGE: Final = 65535

# Records' lifetime in resolvers' caches. Five minutes spares the relay the
# same questions from a busy resolver, yet a relay that moves is followed soon.
TTL: Final = 300

# How long resolvers remember that a name or type does not exist (the SOA's
# minimum, RFC 2308). Tunnel names are answered by the wildcard, so negative
# answers are rare and kept short.
NEGATIVE_TTL: Final = 60

# The challenge's TXT records live briefly: each order brings new values, and
# a CA may ask again after a failed attempt.
CHALLENGE_TTL: Final = 60

# SOA timers for secondaries. The relay has none (it is the only server for
# its zone); these are the conventional values, in seconds.
SOA_REFRESH: Final = 3600
SOA_RETRY: Final = 600
SOA_EXPIRE: Final = 1_209_600

# Challenge values at once under ``_acme-challenge``: an order for the apex
# and the wildcard puts two there, and a retried order two more. More is a bug
# in the caller, and would let the TXT answer outgrow a UDP datagram.
MAX_CHALLENGE_VALUES: Final = 8

# One TXT character-string holds at most 255 bytes; an ACME value is 43.
MAX_CHALLENGE_LENGTH: Final = 255

# Addresses of each family the zone hands out; more would only grow answers.
MAX_ADDRESSES_PER_FAMILY: Final = 8

# Of the queries over the limit, every SLIP-th is answered with an empty,
# truncated (TC) response and the rest are dropped (BIND's RRL "slip"). The
# TC response is no larger than the query, so a flood bounced off the relay
# gets no amplification (at most half its own bytes back), and a real
# resolver whose address an attacker fakes still learns to ask over TCP,
# which cannot be spoofed and is not rate limited here. Dropping everything
# would let anyone cut a resolver off the zone by faking its address.
SLIP: Final = 2

# Sources whose rate is remembered. Past it the one silent longest is
# forgotten (its bucket has almost surely refilled). 16,384 sources cost
# about 4 MiB, and a flood from that many addresses is not a reflection.
MAX_TRACKED_SOURCES: Final = 16_384

_IN = dns.rdataclass.IN
# RFC 8659 4.2: an issuer is a domain name; a parameter value has no spaces or ';'.
_ISSUER: Final = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_ACCOUNT_URI: Final = re.compile(r"[\x21-\x3a\x3c-\x7e]+")
# What ACME puts in a DNS-01 TXT record is base64url; anything printable
# without quotes or backslashes is accepted, within one character-string.
_CHALLENGE_VALUE: Final = re.compile(rf"[\x20\x21\x23-\x5b\x5d-\x7e]{{1,{MAX_CHALLENGE_LENGTH}}}")
_CHALLENGE_LABEL: Final = "_acme-challenge"
_NS_LABEL: Final = "ns1"
# Questions about whole zones or mailboxes: a zone transfer is never offered.
# What an answer's RCODE counts as (metrics.DNS_ANSWERS); any other is "malformed".
_ANSWER_OF: Final = {
    dns.rcode.NOERROR: "answered",
    dns.rcode.NXDOMAIN: "nxdomain",
    dns.rcode.REFUSED: "refused",
}

_REFUSED_TYPES: Final = frozenset(
    {dns.rdatatype.AXFR, dns.rdatatype.IXFR, dns.rdatatype.MAILA, dns.rdatatype.MAILB}
)


class Verdict(enum.Enum):
    """What to do with one UDP query from a source."""

    ANSWER = "answer"
    SLIP = "slip"
    """Over the limit: send :meth:`Zone.truncated`'s minimal TC response."""
    DROP = "drop"
    """Over the limit: send nothing."""


@dataclass
class _Source:
    bucket: RateLimit
    limited: int = 0


class SourceLimits:
    """A token bucket per source (IPv4 address, IPv6 /64), in a table of bounded size."""

    def __init__(
        self,
        rate: float = DNS_RATE_PER_SOURCE,
        burst: float = DNS_BURST_PER_SOURCE,
        *,
        slip: int = SLIP,
        max_sources: int = MAX_TRACKED_SOURCES,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.slip = slip
        self.max_sources = max_sources
        # dicts keep insertion order, and a source is moved to the end when
        # seen: the first key is the one silent longest.
        self._sources: dict[str, _Source] = {}

    def __len__(self) -> int:
        return len(self._sources)

    def check(self, host: str, now: float) -> Verdict:
        """Count one query from ``host`` at ``now``, and say how to treat it."""
        key = source_of(host)
        source = self._sources.pop(key, None)
        if source is None:
            if len(self._sources) >= self.max_sources:
                del self._sources[next(iter(self._sources))]
            source = _Source(RateLimit(self.rate, self.burst))
        self._sources[key] = source
        if source.bucket.allow(now):
            source.limited = 0
            return Verdict.ANSWER
        source.limited += 1
        if self.slip and source.limited % self.slip == 0:
            return Verdict.SLIP
        return Verdict.DROP


class Zone:
    """The records of one relay's zone, and the answers to queries about them.

    The zone holds SOA and NS at its apex; A and AAAA (the relay's public
    addresses) at the apex, at ``ns1`` and at every other name below it (the
    wildcard, so every tunnel name resolves); CAA at the apex when set; TXT
    at ``_acme-challenge`` while a challenge is set. Names elsewhere are
    refused, and nothing is ever looked up elsewhere (no recursion).

    With ``only_acme`` the zone is ``_acme-challenge.<name>`` alone (for an
    operator who keeps ``<name>`` at another DNS server and delegates only
    that name to the relay): SOA, NS and the TXT there, everything else
    refused.

    :meth:`set_challenge`, :meth:`clear_challenge` and :meth:`set_caa` each
    replace the records in one assignment, so they may be called from any
    thread (an ACME client off the event loop); the next query sees them.
    """

    def __init__(
        self,
        name: str,
        addresses: Iterable[str] = (),
        *,
        serial: int = 1,
        caa_issuer: str | None = None,
        caa_account_uri: str | None = None,
        only_acme: bool = False,
    ) -> None:
        self.domain = dns.name.from_text(name)
        self.nameserver = dns.name.Name((_NS_LABEL.encode(), *self.domain.labels))
        self.challenge_name = dns.name.Name((_CHALLENGE_LABEL.encode(), *self.domain.labels))
        self.only_acme = only_acme
        self.origin = self.challenge_name if only_acme else self.domain
        self.serial = serial % 2**32
        self.queries: dict[tuple[str, str], int] = {
            (kind, answer): 0 for kind in DNS_TYPES for answer in DNS_ANSWERS
        }
        """Queries seen, by type and answer (metrics.DNS_TYPES, metrics.DNS_ANSWERS)."""
        v4: list[dns.rdata.Rdata] = []
        v6: list[dns.rdata.Rdata] = []
        for text in addresses:
            address = ipaddress.ip_address(text)
            if isinstance(address, ipaddress.IPv4Address):
                v4.append(dns.rdata.from_text(_IN, dns.rdatatype.A, str(address)))
            else:
                v6.append(dns.rdata.from_text(_IN, dns.rdatatype.AAAA, str(address)))
        if max(len(v4), len(v6)) > MAX_ADDRESSES_PER_FAMILY:
            raise ValueError(f"at most {MAX_ADDRESSES_PER_FAMILY} addresses of each family")
        self._addresses: dict[dns.rdatatype.RdataType, dns.rdataset.Rdataset] = {}
        for rdtype, rdatas in ((dns.rdatatype.A, v4), (dns.rdatatype.AAAA, v6)):
            if rdatas:
                self._addresses[rdtype] = dns.rdataset.from_rdata_list(TTL, rdatas)
        self._challenge: dns.rdataset.Rdataset | None = None
        self._caa: dns.rdataset.Rdataset | None = None
        if caa_issuer is not None:
            self.set_caa(caa_issuer, caa_account_uri)

    # -- what the relay changes at run time ----------------------------------

    def set_challenge(self, values: Sequence[str]) -> None:
        """Publish ``values`` as the TXT records of ``_acme-challenge.<name>``.

        Replaces any values published before; pass every value an order
        needs at once (the apex's and the wildcard's share the name).
        """
        if not values:
            self.clear_challenge()
            return
        if len(values) > MAX_CHALLENGE_VALUES:
            raise ValueError(f"at most {MAX_CHALLENGE_VALUES} challenge values at once")
        rdatas = []
        for value in dict.fromkeys(values):
            if not _CHALLENGE_VALUE.fullmatch(value):
                raise ValueError(f"not a challenge value: {value!r}")
            rdatas.append(dns.rdata.from_text(_IN, dns.rdatatype.TXT, f'"{value}"'))
        self._challenge = dns.rdataset.from_rdata_list(CHALLENGE_TTL, rdatas)
        self._bump()

    def clear_challenge(self) -> None:
        """Remove the TXT records of ``_acme-challenge.<name>``."""
        self._challenge = None
        self._bump()

    @property
    def challenge(self) -> tuple[str, ...]:
        """The challenge values published now."""
        rdataset = self._challenge
        if rdataset is None:
            return ()
        return tuple(rdata.to_text().strip('"') for rdata in rdataset)

    def set_caa(self, issuer: str | None, account_uri: str | None = None) -> None:
        """Publish CAA ``0 issue "<issuer>; accounturi=<uri>"`` at the apex (RFC 8657).

        ``issuer`` is the CA's domain (``letsencrypt.org``; an ACME directory
        lists it as ``meta.caaIdentities``); None removes the record.
        """
        if issuer is None:
            self._caa = None
            self._bump()
            return
        if not _ISSUER.fullmatch(issuer):
            raise ValueError(f"not a CA's domain name: {issuer!r}")
        if account_uri is not None and not _ACCOUNT_URI.fullmatch(account_uri):
            raise ValueError(f"not an ACME account URI: {account_uri!r}")
        value = issuer if account_uri is None else f"{issuer}; accounturi={account_uri}"
        rdata = dns.rdata.from_text(_IN, dns.rdatatype.CAA, f'0 issue "{value}"')
        self._caa = dns.rdataset.from_rdata_list(TTL, [rdata])
        self._bump()

    def _bump(self) -> None:
        self.serial = (self.serial + 1) % 2**32

    # -- answering -----------------------------------------------------------

    def answer(self, query_wire: bytes, *, max_size: int, tcp: bool = False) -> bytes | None:
        """The response to one query, or None when nothing should be sent.

        Over UDP (``tcp`` False) the response fits the query's EDNS0 buffer
        size (512 bytes without EDNS0) and ``max_size``; one that does not is
        sent empty with TC set. Over TCP only ``max_size`` bounds it. Bytes
        that are not a query get FORMERR when they hold a header to answer,
        else None; no input makes this raise.
        """
        try:
            query = dns.message.from_wire(query_wire)
        except Exception:
            # Whatever dnspython rejects (its exceptions are many and not all
            # DNSException) is the sender's fault: answer FORMERR if we can.
            self.queries["other", "malformed"] += 1
            return _header_error(query_wire, dns.rcode.FORMERR)
        if query.flags & dns.flags.QR:
            self.queries["other", "malformed"] += 1
            return None  # a response: answering it could start a loop between servers
        response = dns.message.make_response(query, our_payload=UDP_MAX_PAYLOAD)
        self._fill(query, response)
        self._count(query, response.rcode())
        if tcp:
            limit = max_size
        else:
            asked = query.payload if query.edns >= 0 else UDP_CLASSIC_PAYLOAD
            limit = min(max_size, max(asked, UDP_CLASSIC_PAYLOAD))
        return _render(response, min(limit, TCP_MAX_MESSAGE))

    def _count(self, query: dns.message.Message, rcode: dns.rcode.Rcode) -> None:
        kind = "other"
        if len(query.question) == 1:
            text = dns.rdatatype.to_text(query.question[0].rdtype)
            kind = text if text in DNS_TYPES else "other"
        answer = _ANSWER_OF.get(rcode, "malformed")
        self.queries[kind, answer] += 1

    def count_rate_limited(self) -> None:
        """A UDP query the per-source limit left unanswered or answered truncated."""
        self.queries["other", "rate-limited"] += 1

    def truncated(self, query_wire: bytes) -> bytes | None:
        """An empty response with TC set: tells a rate-limited resolver to ask over TCP.

        It carries the question and nothing else, so it is never larger than
        the query. None for bytes that are not a query.
        """
        try:
            query = dns.message.from_wire(query_wire)
        except Exception:
            return None
        if query.flags & dns.flags.QR or len(query.question) != 1:
            return None
        response = dns.message.make_response(query)
        response.use_edns(False)
        response.flags |= dns.flags.TC
        return _render(response, UDP_CLASSIC_PAYLOAD)

    def _fill(self, query: dns.message.Message, response: dns.message.Message) -> None:
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return
        if query.edns > 0:
            response.set_rcode(dns.rcode.BADVERS)  # we speak EDNS version 0 only
            return
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return
        question = query.question[0]
        qname, qtype = question.name, question.rdtype
        if question.rdclass != _IN or not qname.is_subdomain(self.origin):
            response.set_rcode(dns.rcode.REFUSED)
            return
        if qtype in _REFUSED_TYPES:
            response.set_rcode(dns.rcode.REFUSED)
            return
        response.flags |= dns.flags.AA
        node = self._node(qname)
        if node is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(self._soa_rrset())
            return
        if qtype == dns.rdatatype.ANY:
            # RFC 8482: a small made-up answer instead of every record we hold.
            hinfo = dns.rdata.from_text(_IN, dns.rdatatype.HINFO, '"RFC8482" ""')
            node = {dns.rdatatype.ANY: dns.rdataset.from_rdata_list(TTL, [hinfo])}
        rdataset = node.get(qtype)
        if rdataset is None:  # NODATA: the name exists, the type does not
            response.authority.append(self._soa_rrset())
            return
        response.answer.append(_rrset(qname, rdataset))
        if qtype == dns.rdatatype.NS:
            for glue in self._addresses.values():
                response.additional.append(_rrset(self.nameserver, glue))

    def _node(
        self, qname: dns.name.Name
    ) -> dict[dns.rdatatype.RdataType, dns.rdataset.Rdataset] | None:
        """The records at ``qname`` (inside the zone), or None if no such name exists."""
        relative = qname.relativize(self.origin).labels
        if not relative:
            node = {
                dns.rdatatype.SOA: self._soa(),
                dns.rdatatype.NS: self._ns(),
            }
            if self.only_acme:
                if self._challenge is not None:
                    node[dns.rdatatype.TXT] = self._challenge
                return node
            node.update(self._addresses)
            if self._caa is not None:
                node[dns.rdatatype.CAA] = self._caa
            return node
        if self.only_acme:
            return None
        top = relative[-1].lower()
        challenge = self._challenge
        if top == _CHALLENGE_LABEL.encode() and challenge is not None:
            # A name that exists hides the wildcard below it (RFC 4592).
            return {dns.rdatatype.TXT: challenge} if len(relative) == 1 else None
        if top == _NS_LABEL.encode():
            return dict(self._addresses) if len(relative) == 1 else None
        return dict(self._addresses)  # *.<zone>: every tunnel name

    def _soa(self) -> dns.rdataset.Rdataset:
        hostmaster = dns.name.Name((b"hostmaster", *self.domain.labels))
        rdata = dns.rdata.from_text(
            _IN,
            dns.rdatatype.SOA,
            f"{self.nameserver} {hostmaster} {self.serial} "
            f"{SOA_REFRESH} {SOA_RETRY} {SOA_EXPIRE} {NEGATIVE_TTL}",
        )
        return dns.rdataset.from_rdata_list(NEGATIVE_TTL, [rdata])

    def _soa_rrset(self) -> dns.rrset.RRset:
        return _rrset(self.origin, self._soa())

    def _ns(self) -> dns.rdataset.Rdataset:
        rdata = dns.rdata.from_text(_IN, dns.rdatatype.NS, str(self.nameserver))
        return dns.rdataset.from_rdata_list(TTL, [rdata])


def _rrset(name: dns.name.Name, rdataset: dns.rdataset.Rdataset) -> dns.rrset.RRset:
    return dns.rrset.from_rdata_list(name, rdataset.ttl, list(rdataset))


def _render(response: dns.message.Message, limit: int) -> bytes:
    try:
        return response.to_wire(max_size=limit)
    except dns.exception.TooBig:
        # Whole RRsets or none: a resolver seeing TC asks again over TCP.
        response.answer.clear()
        response.authority.clear()
        response.additional.clear()
        response.flags |= dns.flags.TC
        return response.to_wire(max_size=limit)


def _header_error(wire: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A bare error response echoing the id and opcode of bytes dnspython could not read."""
    if len(wire) < 12 or wire[2] & 0x80:  # no whole header, or a response: stay silent
        return None
    response = dns.message.Message(id=int.from_bytes(wire[:2], "big"))
    response.flags = dns.flags.QR
    response.set_opcode(dns.opcode.from_flags(int.from_bytes(wire[2:4], "big")))
    response.set_rcode(rcode)
    return response.to_wire()
