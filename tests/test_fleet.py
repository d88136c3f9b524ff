"""Tests for burrow.fleet: signing, verifying and reading the fleet document; hostile documents."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow import fleet
from burrow.exception import InvalidError
from burrow.fleet import (
    FLEET_TYPE,
    MAX_FLEET_SIZE,
    Fleet,
    FleetError,
    FleetRelay,
    parse_relays_file,
    read_unverified,
    sign,
    verify,
)
from burrow.tokens import KeyRing, TokenError, generate_signing_key, key_id, mint
from burrow.tokens import verify as verify_token

KEY = generate_signing_key()
OTHER = generate_signing_key()
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z
RELAYS = (
    FleetRelay("r1", "r1.example.com:443", "eu-west", 2),
    FleetRelay("r2", "r2.example.com:443", "us-east", 1),
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def document(serial: int = 7, expires: int = NOW + 3600, **kw: Any) -> str:
    return sign(KEY, serial=serial, expires=expires, relays=RELAYS, now=NOW, **kw)


def signed(header: Any, payload: Any, key: Any = KEY) -> str:
    """A document with any header and payload, truly signed (bypasses PyJWT's checks)."""
    head = b64(json.dumps(header).encode())
    body = b64(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    return f"{head}.{body}.{b64(key.sign(f'{head}.{body}'.encode()))}"


def good_header(**changes: Any) -> dict[str, Any]:
    return {"alg": "EdDSA", "typ": FLEET_TYPE, "kid": key_id(KEY), **changes}


def good_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "serial": 1,
        "issued": NOW,
        "expires": NOW + 60,
        "relays": [{"name": "r1", "address": "r1.example.com:443", "region": "", "weight": 1}],
        "revoked": [],
    }
    payload.update(changes)
    return payload


def reason_of(text: Any, keys: Any = None, now: float = NOW) -> str:
    with pytest.raises(FleetError) as info:
        verify(text, keys or KEY.public_key(), now=now)
    return info.value.reason


# -- round trips -------------------------------------------------------------------


def test_sign_and_verify() -> None:
    text = document(revoked=["b-id", "a_id", "b-id"])
    assert "\n" not in text and len(text) < 1000
    assert verify(text, KEY.public_key(), now=NOW + 10) == Fleet(
        serial=7,
        expires=NOW + 3600,
        relays=RELAYS,
        revoked=frozenset({"a_id", "b-id"}),
        issued=NOW,
        key_id=key_id(KEY),
    )


def test_the_header_names_the_type_and_the_key() -> None:
    header = json.loads(base64.urlsafe_b64decode(document().split(".")[0] + "=="))
    assert header == {"alg": "EdDSA", "kid": key_id(KEY), "typ": FLEET_TYPE}


def test_read_unverified_says_what_verify_says() -> None:
    text = document(revoked=["gone"])
    assert read_unverified(text) == verify(text, KEY.public_key(), now=NOW)
    # ... without checking anything but its shape: not the signature, not the expiry.
    assert read_unverified(document(expires=NOW - 1)).serial == 7
    forged = signed(good_header(), good_payload(serial=99), OTHER)
    assert read_unverified(forged).serial == 99


def test_reading_a_document_unverified_loads_no_cryptography() -> None:
    probe = (
        "import sys, burrow.fleet\n"
        f"assert burrow.fleet.read_unverified({document()!r}).serial == 7\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jwt', 'cryptography')"
        " or m == 'burrow.tokens']\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_ring_checks_with_the_key_the_kid_names() -> None:
    ring = KeyRing.of([OTHER.public_key(), KEY.public_key()])
    assert verify(document(), ring, now=NOW).serial == 7
    # Without a kid, any key of the ring will do (as tokens before key ids).
    no_kid = signed({"alg": "EdDSA", "typ": FLEET_TYPE}, good_payload())
    assert verify(no_kid, ring, now=NOW).key_id is None
    # With one, only the key it names: another key's signature is not good enough.
    wrong = signed(good_header(kid=key_id(OTHER)), good_payload())
    assert reason_of(wrong, ring) == "bad-signature"


def test_an_unknown_key_is_named() -> None:
    with pytest.raises(FleetError) as info:
        verify(document(), OTHER.public_key(), now=NOW)
    assert info.value.reason == "unknown-key"
    assert str(info.value) == (
        f"fleet document is signed with key {key_id(KEY)!r}, which this relay does not hold "
        f"(it holds {key_id(OTHER)})"
    )


def test_expired() -> None:
    text = document(expires=NOW + 60)
    assert verify(text, KEY.public_key(), now=NOW + 59).serial == 7
    with pytest.raises(FleetError) as info:
        verify(text, KEY.public_key(), now=NOW + 60)
    assert info.value.reason == "expired"
    assert str(info.value) == "fleet document 7 expired at 2026-01-01T00:01:00Z"


# -- hostile documents ---------------------------------------------------------------


def test_a_token_is_not_a_fleet_document_nor_the_other_way() -> None:
    token = mint(KEY, subject="x", ttl_seconds=60, now=NOW)
    assert reason_of(token) == "malformed"
    with pytest.raises(TokenError) as info:
        verify_token(document(), KEY.public_key(), now=NOW)
    assert info.value.reason == "malformed"


def test_tampered_payload() -> None:
    head, _, sig = document().split(".")
    payload = good_payload(serial=1000, revoked=[])
    assert reason_of(f"{head}.{b64(json.dumps(payload).encode())}.{sig}") == "bad-signature"


@pytest.mark.parametrize("alg", ["none", "HS256", "ES256"])
def test_other_algorithms(alg: str) -> None:
    head = b64(json.dumps(good_header(alg=alg)).encode())
    body = b64(json.dumps(good_payload()).encode())
    assert reason_of(f"{head}.{body}.{b64(b'x' * 64)}") in {"bad-signature", "malformed"}


@pytest.mark.parametrize(
    "text",
    [
        None,
        b"bytes",
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "\x00.\x00.\x00",
        "é.é.é",
        "x" * (MAX_FLEET_SIZE + 1),
        "a." + "b" * MAX_FLEET_SIZE + ".c",
    ],
)
def test_garbage(text: Any) -> None:
    assert reason_of(text) == "malformed"


def test_truncated_anywhere() -> None:
    text = document()
    for end in range(len(text)):
        # Cut short, a document is malformed or its signature fails; never anything else.
        assert reason_of(text[:end]) in {"malformed", "bad-signature"}


@pytest.mark.parametrize(
    "payload",
    [
        good_payload(serial=0),
        good_payload(serial=True),
        good_payload(serial="1"),
        good_payload(serial=2**53 + 1),
        good_payload(expires=None),
        good_payload(expires=10**20),
        good_payload(relays=None),
        good_payload(relays={"r1": "r1.example.com:443"}),
        good_payload(relays=[{"name": "r1", "address": "r1.example.com"}]),
        good_payload(relays=[{"name": "r1", "address": "host:99999"}]),
        good_payload(relays=[{"name": "r 1", "address": "r1.example.com:443"}]),
        good_payload(relays=[{"name": "r1\n", "address": "r1.example.com:443"}]),
        good_payload(relays=[{"name": "r1", "address": "r1:443", "weight": -1}]),
        good_payload(relays=[{"name": "r1", "address": "r1:443", "weight": True}]),
        good_payload(relays=[{"name": "r1", "address": "r1:443", "shell": "rm"}]),
        good_payload(relays=[{"name": "r1", "address": "a:1"}, {"name": "r1", "address": "b:1"}]),
        good_payload(revoked="abc"),
        good_payload(revoked=["two words"]),
        good_payload(revoked=["x" * 200]),
        good_payload(revoked=[1]),
        [1, 2],
        "a string",
        b"not json",
        b"\xff\xfe",
    ],
)
def test_well_signed_but_malformed(payload: Any) -> None:
    assert reason_of(signed(good_header(), payload)) == "malformed"
    with pytest.raises(FleetError):
        read_unverified(signed(good_header(), payload))


@pytest.mark.parametrize(
    "header",
    [
        [],
        "x",
        None,
        {"alg": "EdDSA", "kid": key_id(KEY)},  # no typ: a token's header
        good_header(typ="JWT"),
        good_header(kid=5),
        good_header(crit=["exp"]),
    ],
)
def test_bad_headers(header: Any) -> None:
    assert reason_of(signed(header, good_payload())) in {"malformed", "bad-signature"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300)
@given(
    st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit"]), json_values) | json_values,
    st.dictionaries(
        st.sampled_from(["serial", "expires", "issued", "relays", "revoked"]), json_values
    )
    | json_values,
)
def test_random_json_truly_signed(header: Any, payload: Any) -> None:
    if isinstance(header, dict):
        header.setdefault("alg", "EdDSA")
        header.setdefault("typ", FLEET_TYPE)
    text = signed(header, payload)
    for read in (lambda: verify(text, KEY.public_key(), now=NOW), lambda: read_unverified(text)):
        with contextlib.suppress(FleetError):
            assert isinstance(read(), Fleet)


@settings(max_examples=300)
@given(
    st.text(max_size=300)
    | st.from_regex(r"[A-Za-z0-9_-]{0,40}\.[A-Za-z0-9_-]{0,60}\.[A-Za-z0-9_-]{0,90}")
)
def test_any_text_is_a_fleet_or_a_fleet_error(text: str) -> None:
    for read in (lambda: verify(text, KEY.public_key(), now=NOW), lambda: read_unverified(text)):
        with contextlib.suppress(FleetError):
            read()


# -- signing -------------------------------------------------------------------------


def test_sign_refuses_what_relays_would_refuse() -> None:
    with pytest.raises(InvalidError, match="'serial' is not an integer"):
        sign(KEY, serial=0, expires=NOW, relays=RELAYS)
    with pytest.raises(InvalidError, match="has no port"):
        sign(KEY, serial=1, expires=NOW, relays=[FleetRelay("r1", "r1.example.com")])
    with pytest.raises(InvalidError, match="revoked token id"):
        sign(KEY, serial=1, expires=NOW, relays=RELAYS, revoked=["a b"])


def test_sign_refuses_a_document_too_large_for_a_welcome() -> None:
    many = [f"{n:016d}" for n in range(2000)]
    with pytest.raises(InvalidError, match="more than 32768: leave out revoked ids"):
        sign(KEY, serial=1, expires=NOW + 60, relays=RELAYS, revoked=many)
    fits = sign(KEY, serial=1, expires=NOW + 60, relays=RELAYS, revoked=many[:1000])
    assert len(fits) <= MAX_FLEET_SIZE
    assert len(verify(fits, KEY.public_key(), now=NOW).revoked) == 1000


# -- the relays file -------------------------------------------------------------------


def test_parse_relays_file() -> None:
    text = """
[[relay]]
name = "r1"
address = "r1.example.com:443"
region = "eu-west"
weight = 2

[[relay]]
name = "r2"
address = "[2001:db8::1]:443"
"""
    assert parse_relays_file(text) == (
        FleetRelay("r1", "r1.example.com:443", "eu-west", 2),
        FleetRelay("r2", "[2001:db8::1]:443", "", 1),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("relay = [", "not TOML"),
        ("", "no \\[\\[relay\\]\\] tables"),
        ('revoked = ["x"]', "unknown keys: revoked"),
        ('[[relay]]\nname = "r1"\n', "relay 1's 'address' is not host:port"),
        ('[[relay]]\nname = "r1"\naddress = "r1:443"\nport = 1\n', "unknown members: port"),
        (
            '[[relay]]\nname = "r1"\naddress = "a:1"\n[[relay]]\nname = "r1"\naddress = "b:1"\n',
            "names a relay twice",
        ),
    ],
)
def test_parse_relays_file_errors(text: str, message: str) -> None:
    with pytest.raises(InvalidError, match=message):
        parse_relays_file(text)


def test_check_address() -> None:
    assert fleet.check_address("r1.example.com:443") == "r1.example.com:443"
    for bad in ("r1.example.com", "", ":443", "r1.example.com:0", "a b:1"):
        with pytest.raises(FleetError):
            fleet.check_address(bad)
