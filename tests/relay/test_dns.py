"""The relay's zone: exact queries built with dnspython in, responses read back by dnspython.

No socket: ``Zone.answer`` takes a query's bytes and gives a response's bytes.
"""

from __future__ import annotations

import random

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest

from burrow.relay.dns import (
    MAX_CHALLENGE_VALUES,
    UDP_CLASSIC_PAYLOAD,
    UDP_MAX_PAYLOAD,
    SourceLimits,
    Verdict,
    Zone,
)

ZONE = "r1.example.com"
V4, V6 = "192.0.2.10", "2001:db8::10"
ACME_VALUE = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"
ACCOUNT = "https://acme.example/acct/12345"


def zone(**kwargs: object) -> Zone:
    return Zone(ZONE, [V4, V6], serial=2026120101, **kwargs)  # type: ignore[arg-type]


def ask(
    z: Zone,
    name: str,
    rdtype: str | int = "A",
    *,
    max_size: int = UDP_MAX_PAYLOAD,
    tcp: bool = False,
    **query_kwargs: object,
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **query_kwargs)  # type: ignore[arg-type]
    wire = z.answer(query.to_wire(), max_size=max_size, tcp=tcp)
    assert wire is not None
    response = dns.message.from_wire(wire)
    assert response.id == query.id
    assert response.flags & dns.flags.QR
    assert not response.flags & dns.flags.RA, "never offers recursion"
    return response


def records(response: dns.message.Message, section: str = "answer") -> set[str]:
    return {
        f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} {rdata}"
        for rrset in getattr(response, section)
        for rdata in rrset
    }


def test_the_apex_has_soa_ns_and_the_public_addresses() -> None:
    z = zone()
    soa = ask(z, ZONE, "SOA")
    assert soa.rcode() == dns.rcode.NOERROR and soa.flags & dns.flags.AA
    assert records(soa) == {
        f"{ZONE}. SOA ns1.{ZONE}. hostmaster.{ZONE}. 2026120101 3600 600 1209600 60"
    }
    ns = ask(z, ZONE, "NS")
    assert records(ns) == {f"{ZONE}. NS ns1.{ZONE}."}
    assert records(ns, "additional") == {f"ns1.{ZONE}. A {V4}", f"ns1.{ZONE}. AAAA {V6}"}
    assert records(ask(z, ZONE, "A")) == {f"{ZONE}. A {V4}"}
    assert records(ask(z, ZONE, "AAAA")) == {f"{ZONE}. AAAA {V6}"}
    assert records(ask(z, f"ns1.{ZONE}", "A")) == {f"ns1.{ZONE}. A {V4}"}


def test_every_name_below_the_zone_has_the_addresses() -> None:
    z = zone()
    label = "wtqcahqwhd4tu0"
    response = ask(z, f"{label}.{ZONE}", "A")
    assert response.rcode() == dns.rcode.NOERROR and response.flags & dns.flags.AA
    assert records(response) == {f"{label}.{ZONE}. A {V4}"}
    assert records(ask(z, f"{label}.{ZONE}", "AAAA")) == {f"{label}.{ZONE}. AAAA {V6}"}
    assert records(ask(z, f"a.b.{ZONE}", "A")) == {f"a.b.{ZONE}. A {V4}"}


def test_names_outside_the_zone_are_refused_and_nothing_recurses() -> None:
    z = zone()
    for name in ("example.com", "r2.example.com", "www.example.org", "."):
        response = ask(z, name, "A")
        assert response.rcode() == dns.rcode.REFUSED
        assert not response.flags & dns.flags.AA
        assert not response.answer and not response.authority
    for name in ("version.bind", ZONE):  # CHAOS, or any class but IN, even for our names
        chaos = ask(z, name, "TXT", rdclass=dns.rdataclass.CH)
        assert chaos.rcode() == dns.rcode.REFUSED


def test_a_type_the_name_lacks_is_nodata_with_the_soa() -> None:
    z = zone()
    for name, rdtype in ((f"x.{ZONE}", "MX"), (ZONE, "TXT"), (f"ns1.{ZONE}", "NS")):
        response = ask(z, name, rdtype)
        assert response.rcode() == dns.rcode.NOERROR and response.flags & dns.flags.AA
        assert not response.answer
        assert [(r.name, r.rdtype) for r in response.authority] == [
            (dns.name.from_text(ZONE), dns.rdatatype.SOA)
        ]


def test_names_under_an_existing_name_do_not_exist() -> None:
    # ns1 (and _acme-challenge while set) hide the wildcard below them (RFC 4592).
    z = zone()
    z.set_challenge([ACME_VALUE])
    for name in (f"x.ns1.{ZONE}", f"x._acme-challenge.{ZONE}"):
        response = ask(z, name, "A")
        assert response.rcode() == dns.rcode.NXDOMAIN and response.flags & dns.flags.AA
        assert records(response, "authority") == {
            f"{ZONE}. SOA ns1.{ZONE}. hostmaster.{ZONE}. {z.serial} 3600 600 1209600 60"
        }


def test_names_are_matched_without_regard_to_case_and_echoed_as_asked() -> None:
    z = zone()
    z.set_challenge([ACME_VALUE])
    for name in (
        "R1.ExAmPlE.cOm",
        "WTQcahQWhd4tu0.r1.EXAMPLE.com",
        "_ACME-Challenge.r1.example.COM",
    ):
        rdtype = "TXT" if "challenge" in name.lower() else "A"
        query = dns.message.make_query(name, rdtype)
        wire = z.answer(query.to_wire(), max_size=UDP_MAX_PAYLOAD)
        assert wire is not None
        response = dns.message.from_wire(wire)
        assert response.rcode() == dns.rcode.NOERROR and response.answer
        # 0x20: the question comes back with the very bytes that were sent.
        assert response.question[0].name.to_text() == name + "."
        assert response.answer[0].name.to_text() == name + "."


def test_challenge_values_are_set_replaced_and_cleared() -> None:
    z = zone()
    name = f"_acme-challenge.{ZONE}"
    before = ask(z, name, "TXT")
    assert before.rcode() == dns.rcode.NOERROR and not before.answer  # the wildcard: NODATA
    serial = z.serial
    z.set_challenge([ACME_VALUE, "second-value-for-the-wildcard"])
    assert z.serial == serial + 1
    assert records(ask(z, name, "TXT")) == {
        f'{name}. TXT "{ACME_VALUE}"',
        f'{name}. TXT "second-value-for-the-wildcard"',
    }
    assert z.challenge == (ACME_VALUE, "second-value-for-the-wildcard")
    assert ask(z, name, "A").answer == []  # the name now exists with TXT only
    z.set_challenge(["third"])
    assert records(ask(z, name, "TXT")) == {f'{name}. TXT "third"'}
    z.clear_challenge()
    assert ask(z, name, "TXT").answer == [] and z.challenge == ()
    with pytest.raises(ValueError):
        z.set_challenge([f"v{i}" for i in range(MAX_CHALLENGE_VALUES + 1)])
    with pytest.raises(ValueError):
        z.set_challenge(['with "quotes"'])
    with pytest.raises(ValueError):
        z.set_challenge(["x" * 256])


def test_caa_names_the_ca_and_the_account() -> None:
    z = zone(caa_issuer="letsencrypt.org", caa_account_uri=ACCOUNT)
    assert records(ask(z, ZONE, "CAA")) == {
        f'{ZONE}. CAA 0 issue "letsencrypt.org; accounturi={ACCOUNT}"'
    }
    z.set_caa("pebble.letsencrypt.org")
    assert records(ask(z, ZONE, "CAA")) == {f'{ZONE}. CAA 0 issue "pebble.letsencrypt.org"'}
    z.set_caa(None)
    assert ask(z, ZONE, "CAA").answer == []
    for bad in ("lets encrypt.org", 'x"y', ""):
        with pytest.raises(ValueError):
            z.set_caa(bad)
    with pytest.raises(ValueError):
        z.set_caa("letsencrypt.org", "https://x; y")


def test_udp_answers_fit_the_buffer_the_query_offers() -> None:
    z = zone()
    # Eight values of 200 bytes: about 1.7 KB of TXT, too big for any UDP answer here.
    z.set_challenge([f"{i}" + "v" * 199 for i in range(8)])
    name = f"_acme-challenge.{ZONE}"
    classic = ask(z, name, "TXT")  # no EDNS0: 512 bytes
    assert classic.flags & dns.flags.TC and not classic.answer
    small = ask(z, name, "TXT", use_edns=0, payload=600)
    assert small.flags & dns.flags.TC and not small.answer
    huge = ask(z, name, "TXT", use_edns=0, payload=65000)  # asks more than the cap allows
    assert huge.flags & dns.flags.TC and not huge.answer
    assert huge.payload == UDP_MAX_PAYLOAD  # and is told the cap
    tcp = ask(z, name, "TXT", tcp=True, max_size=65535)
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 8
    # Four values: about 850 bytes, more than a query without EDNS0 may get.
    z.set_challenge([f"{i}" + "v" * 199 for i in range(4)])
    assert ask(z, name, "TXT").flags & dns.flags.TC
    assert ask(z, name, "TXT", use_edns=0, payload=600).flags & dns.flags.TC
    fits = ask(z, name, "TXT", use_edns=0, payload=1232)
    assert not fits.flags & dns.flags.TC and len(fits.answer[0]) == 4


def test_response_sizes_are_bounded_by_max_size() -> None:
    z = zone()
    z.set_challenge([f"{i}" + "v" * 199 for i in range(8)])
    query = dns.message.make_query(f"_acme-challenge.{ZONE}", "TXT", use_edns=0, payload=4096)
    for max_size in (UDP_CLASSIC_PAYLOAD, 800, UDP_MAX_PAYLOAD):
        wire = z.answer(query.to_wire(), max_size=max_size)
        assert wire is not None and len(wire) <= max_size


def test_any_gets_a_small_made_up_answer() -> None:
    response = ask(zone(), ZONE, "ANY")
    assert records(response) == {f'{ZONE}. HINFO "RFC8482" ""'}


def test_zone_transfers_other_opcodes_and_edns_versions() -> None:
    z = zone()
    assert ask(z, ZONE, "AXFR", tcp=True, max_size=65535).rcode() == dns.rcode.REFUSED
    assert ask(z, ZONE, "IXFR").rcode() == dns.rcode.REFUSED
    notify = dns.message.make_query(ZONE, "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    wire = z.answer(notify.to_wire(), max_size=UDP_MAX_PAYLOAD)
    assert wire is not None and dns.message.from_wire(wire).rcode() == dns.rcode.NOTIMP
    badvers = ask(z, ZONE, "A", use_edns=1)
    assert badvers.rcode() == dns.rcode.BADVERS and not badvers.answer


def test_a_query_with_a_cookie_is_answered() -> None:
    cookie = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, bytes(8))
    response = ask(zone(), ZONE, "A", use_edns=0, options=[cookie])
    assert records(response) == {f"{ZONE}. A {V4}"}


def test_only_acme_answers_the_challenge_name_and_refuses_the_rest() -> None:
    z = zone(only_acme=True)
    name = f"_acme-challenge.{ZONE}"
    z.set_challenge([ACME_VALUE])
    assert records(ask(z, name, "TXT")) == {f'{name}. TXT "{ACME_VALUE}"'}
    soa = ask(z, name, "SOA")
    assert [rrset.name.to_text() for rrset in soa.answer] == [name + "."]
    assert ask(z, name, "A").answer == []  # NODATA
    for other in (ZONE, f"x.{ZONE}", f"ns1.{ZONE}", "example.com"):
        assert ask(z, other, "A").rcode() == dns.rcode.REFUSED
    assert ask(z, f"x.{name}", "TXT").rcode() == dns.rcode.NXDOMAIN


def test_a_zone_without_addresses_answers_nodata() -> None:
    z = Zone(ZONE)
    response = ask(z, f"x.{ZONE}", "A")
    assert response.rcode() == dns.rcode.NOERROR and not response.answer and response.authority


def test_too_many_addresses_are_refused_at_start() -> None:
    with pytest.raises(ValueError):
        Zone(ZONE, [f"192.0.2.{i}" for i in range(9)])
    with pytest.raises(ValueError):
        Zone(ZONE, ["not-an-address"])


def test_malformed_input_gets_formerr_or_nothing_and_never_raises() -> None:
    z = zone()
    query = dns.message.make_query(f"x.{ZONE}", "A").to_wire()
    assert z.answer(b"", max_size=UDP_MAX_PAYLOAD) is None
    assert z.answer(query[:5], max_size=UDP_MAX_PAYLOAD) is None  # no whole header
    for broken in (query[:-1], query[:12] + b"\xff" * 20, query + b"trailing"):
        wire = z.answer(broken, max_size=UDP_MAX_PAYLOAD)
        assert wire is not None
        response = dns.message.from_wire(wire)
        assert response.rcode() == dns.rcode.FORMERR and response.id == int.from_bytes(query[:2])
    response_bytes = bytes([query[0], query[1], query[2] | 0x80]) + query[3:]
    assert z.answer(response_bytes, max_size=UDP_MAX_PAYLOAD) is None  # a response: silence
    no_question = dns.message.Message(id=7).to_wire()
    wire = z.answer(no_question, max_size=UDP_MAX_PAYLOAD)
    assert wire is not None and dns.message.from_wire(wire).rcode() == dns.rcode.FORMERR


def test_random_and_cut_packets_never_raise() -> None:
    z = zone()
    z.set_challenge([ACME_VALUE])
    rng = random.Random(11)
    queries = [
        dns.message.make_query(name, rdtype, use_edns=rng.choice([None, 0])).to_wire()
        for name in (ZONE, f"x.{ZONE}", f"_acme-challenge.{ZONE}", "example.org")
        for rdtype in ("A", "AAAA", "TXT", "SOA", "NS", "CAA", "ANY")
    ]
    for _ in range(5000):
        base = bytearray(rng.choice(queries))
        how = rng.randrange(3)
        if how == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(64)))
        elif how == 1:
            data = bytes(base[: rng.randrange(len(base) + 1)])
        else:
            for _ in range(rng.randrange(1, 4)):
                base[rng.randrange(len(base))] = rng.getrandbits(8)
            data = bytes(base)
        for tcp in (False, True):
            wire = z.answer(data, max_size=65535 if tcp else UDP_MAX_PAYLOAD, tcp=tcp)
            if wire is not None:
                assert len(wire) <= (65535 if tcp else UDP_MAX_PAYLOAD)
                dns.message.from_wire(wire)  # always a well-formed message
        assert z.truncated(data) is None or len(z.truncated(data) or b"") <= len(data)


def test_the_truncated_reply_is_no_larger_than_the_query() -> None:
    z = zone()
    query = dns.message.make_query(f"x.{ZONE}", "A", use_edns=0, payload=4096).to_wire()
    wire = z.truncated(query)
    assert wire is not None and len(wire) <= len(query)
    response = dns.message.from_wire(wire)
    assert response.flags & dns.flags.TC and not response.answer
    assert z.truncated(b"\x00" * 5) is None


def test_a_source_over_its_rate_is_dropped_with_every_second_query_slipped() -> None:
    limits = SourceLimits(rate=10, burst=5, slip=2)
    now = 1000.0
    assert [limits.check("198.51.100.7", now) for _ in range(5)] == [Verdict.ANSWER] * 5
    over = [limits.check("198.51.100.7", now) for _ in range(6)]
    assert over == [Verdict.DROP, Verdict.SLIP] * 3
    # Another source is answered meanwhile, and the first recovers with time.
    assert limits.check("203.0.113.9", now) is Verdict.ANSWER
    assert limits.check("198.51.100.7", now + 0.1) is Verdict.ANSWER
    assert limits.check("198.51.100.7", now + 0.1) is not Verdict.ANSWER


def test_ipv6_sources_share_a_bucket_per_64() -> None:
    limits = SourceLimits(rate=1, burst=2, slip=0)
    now = 5.0
    assert limits.check("2001:db8:1:2::1", now) is Verdict.ANSWER
    assert limits.check("2001:db8:1:2::ffff", now) is Verdict.ANSWER
    assert limits.check("2001:db8:1:2:abcd::9", now) is Verdict.DROP  # no slip: all dropped
    assert limits.check("2001:db8:1:3::1", now) is Verdict.ANSWER  # another /64


def test_the_table_of_sources_is_bounded() -> None:
    limits = SourceLimits(rate=1, burst=1, max_sources=100)
    for i in range(1000):
        limits.check(f"10.0.{i // 256}.{i % 256}", 0.0)
    assert len(limits) == 100
    # The source seen most recently is still remembered (and still limited).
    assert limits.check("10.0.3.231", 0.0) is not Verdict.ANSWER


def test_the_source_forgotten_first_is_the_one_silent_longest() -> None:
    limits = SourceLimits(rate=1, burst=1, max_sources=3)
    assert limits.check("192.0.2.1", 0.0) is Verdict.ANSWER  # its bucket is now empty
    limits.check("192.0.2.2", 0.0)
    assert limits.check("192.0.2.1", 0.0) is not Verdict.ANSWER  # seen again: the newest
    limits.check("192.0.2.3", 0.0)
    limits.check("192.0.2.4", 0.0)  # the table is full: 192.0.2.2 goes
    assert limits.check("192.0.2.1", 0.0) is not Verdict.ANSWER  # still remembered
    assert limits.check("192.0.2.2", 0.0) is Verdict.ANSWER  # forgotten: a fresh bucket
