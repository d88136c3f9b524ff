"""Tests for burrow.tokens: minting, verifying, forgeries, garbage and key files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow.exception import AuthError, InvalidError
from burrow.tokens import (
    MAX_TOKEN_LENGTH,
    TOKEN_ISSUER,
    KeyRing,
    TokenError,
    TokenGrant,
    append_revocation,
    check_time,
    generate_signing_key,
    key_id,
    mint,
    parse_duration,
    parse_revocation_list,
    public_key_pem,
    read_public_key,
    read_public_keys,
    read_signing_key,
    token_id_of,
    unverified_subject,
    verify,
    write_public_key,
    write_signing_key,
)

KEY = generate_signing_key()
PUBLIC = KEY.public_key()
NOW = 1_767_225_600  # 2026-01-01T00:00:00Z


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signed(header: Any, payload: Any, key: Ed25519PrivateKey = KEY) -> str:
    """A token with any header and payload, truly signed by ``key`` (bypasses PyJWT's checks)."""
    head = b64(json.dumps(header).encode())
    body = b64(payload if isinstance(payload, bytes) else json.dumps(payload).encode())
    return f"{head}.{body}.{b64(key.sign(f'{head}.{body}'.encode()))}"


def good_payload(**changes: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"iss": TOKEN_ISSUER, "sub": "ci", "iat": NOW, "jti": "abc"}
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def reason_of(token: Any, **kwargs: Any) -> str:
    with pytest.raises(TokenError) as info:
        verify(token, PUBLIC, **kwargs)
    return info.value.reason


# Round trips


def test_mint_and_verify() -> None:
    token = mint(KEY, subject="alice", ttl_seconds=3600, max_tunnels=5, now=NOW)
    grant = verify(token, PUBLIC, now=NOW + 10)
    assert grant == TokenGrant(
        subject="alice",
        token_id=grant.token_id,
        issued_at=NOW,
        expires_at=NOW + 3600,
        max_tunnels=5,
    )
    assert len(grant.token_id) == 16  # token_urlsafe(12)


def test_token_payload_is_what_the_docs_say() -> None:
    token = mint(KEY, subject="alice", ttl_seconds=60, now=NOW + 0.9)
    header = json.loads(unb64(token.split(".")[0]))
    payload = json.loads(unb64(token.split(".")[1]))
    assert header["alg"] == "EdDSA"
    assert set(payload) == {"iss", "sub", "iat", "exp", "jti"}
    assert payload["iss"] == "burrow"
    assert payload["iat"] == NOW
    assert payload["exp"] == NOW + 60


def test_token_without_expiry_or_limit() -> None:
    token = mint(KEY, subject="bob", ttl_seconds=None, now=NOW)
    assert "exp" not in json.loads(unb64(token.split(".")[1]))
    grant = verify(token, PUBLIC, now=NOW + 100 * 365 * 86400)
    assert grant.expires_at is None
    assert grant.max_tunnels is None


def test_token_ids_differ() -> None:
    tokens = {mint(KEY, subject="x", ttl_seconds=60, now=NOW) for _ in range(100)}
    assert len({verify(t, PUBLIC, now=NOW).token_id for t in tokens}) == 100


def test_verify_uses_the_clock_by_default() -> None:
    assert verify(mint(KEY, subject="x", ttl_seconds=60), PUBLIC).subject == "x"
    with pytest.raises(TokenError) as info:
        verify(mint(KEY, subject="x", ttl_seconds=60, now=NOW), PUBLIC)
    assert info.value.reason == "expired"


def test_token_error_is_an_auth_error() -> None:
    assert issubclass(TokenError, AuthError)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subject": "", "ttl_seconds": 60},
        {"subject": "x" * 257, "ttl_seconds": 60},
        {"subject": "x", "ttl_seconds": 0},
        {"subject": "x", "ttl_seconds": -5},
        {"subject": "x", "ttl_seconds": 10**12},
        {"subject": "x", "ttl_seconds": 60, "max_tunnels": 0},
    ],
)
def test_mint_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidError):
        mint(KEY, now=NOW, **kwargs)


# Time


def test_expired() -> None:
    token = mint(KEY, subject="x", ttl_seconds=60, now=NOW)
    with pytest.raises(TokenError, match="token expired at 2026-01-01T00:01:00Z") as info:
        verify(token, PUBLIC, now=NOW + 60 + 30)
    assert info.value.reason == "expired"


def test_expiry_leeway() -> None:
    token = mint(KEY, subject="x", ttl_seconds=60, now=NOW)
    assert verify(token, PUBLIC, now=NOW + 60 + 29).subject == "x"
    assert reason_of(token, now=NOW + 61, leeway_seconds=0) == "expired"


def test_not_yet_valid() -> None:
    token = mint(KEY, subject="x", ttl_seconds=60, now=NOW)
    assert verify(token, PUBLIC, now=NOW - 30).subject == "x"
    with pytest.raises(TokenError, match="not valid yet") as info:
        verify(token, PUBLIC, now=NOW - 31)
    assert info.value.reason == "not-yet-valid"


# Forgeries


def test_tampered_signature() -> None:
    token = mint(KEY, subject="x", ttl_seconds=60, now=NOW)
    head, body, sig = token.split(".")
    # Change a middle character: the last one of a base64url signature
    # carries padding bits, so changing it may leave the bytes unchanged.
    i = len(sig) // 2
    tampered = sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1 :]
    assert reason_of(f"{head}.{body}.{tampered}", now=NOW) == "bad-signature"
    assert reason_of(f"{head}.{body}.", now=NOW) == "bad-signature"


def test_tampered_payload() -> None:
    token = mint(KEY, subject="x", ttl_seconds=60, max_tunnels=1, now=NOW)
    head, body, sig = token.split(".")
    payload = json.loads(unb64(body))
    payload["max_tunnels"] = 1000
    assert reason_of(f"{head}.{b64(json.dumps(payload).encode())}.{sig}", now=NOW) == (
        "bad-signature"
    )


def test_signed_by_another_key() -> None:
    other = generate_signing_key()
    token = mint(other, subject="x", ttl_seconds=60, now=NOW)
    with pytest.raises(TokenError) as info:
        verify(token, PUBLIC, now=NOW)
    assert info.value.reason == "unknown-key"
    assert str(info.value) == (
        f"token is signed with key {key_id(other)!r}, which this relay does not hold "
        f"(it holds {key_id(KEY)})"
    )
    # One signed before key ids, or that leaves its kid out, is checked against the key.
    assert reason_of(signed({"alg": "EdDSA"}, good_payload(), other), now=NOW) == "bad-signature"


def test_alg_none_forgery() -> None:
    for alg in ("none", "None", "NONE"):
        head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
        body = b64(json.dumps(good_payload()).encode())
        assert reason_of(f"{head}.{body}.", now=NOW) == "bad-signature"


@pytest.mark.parametrize(
    "secret",
    [
        public_key_pem(KEY),
        PUBLIC.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    ],
)
@pytest.mark.parametrize("alg", ["HS256", "HS512"])
def test_hmac_with_public_key_forgery(secret: bytes, alg: str) -> None:
    digest = hashlib.sha256 if alg == "HS256" else hashlib.sha512
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    body = b64(json.dumps(good_payload()).encode())
    mac = hmac.new(secret, f"{head}.{body}".encode(), digest).digest()
    assert reason_of(f"{head}.{body}.{b64(mac)}", now=NOW) == "bad-signature"


def test_other_algorithm_with_a_real_signature_is_refused() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    import jwt

    token = jwt.encode(good_payload(), ec_key, algorithm="ES256")
    assert reason_of(token, now=NOW) == "bad-signature"


# Well signed, badly formed


def test_control_token_built_by_hand_verifies() -> None:
    # Guards the helpers below: a hand-built good token must pass, so that
    # the failures in the next tests are about the payload only.
    grant = verify(signed({"alg": "EdDSA"}, good_payload()), PUBLIC, now=NOW)
    assert grant.subject == "ci"


@pytest.mark.parametrize(
    "payload",
    [
        good_payload(iss="someone-else"),
        good_payload(iss=None),
        good_payload(sub=None),
        good_payload(sub=5),
        good_payload(jti=None),
        good_payload(jti=["a"]),
        good_payload(iat=None),
        good_payload(iat="2026"),
        good_payload(iat=1.5),
        good_payload(iat=True),
        good_payload(iat=-1),
        good_payload(iat=10**20),
        good_payload(exp="soon"),
        good_payload(exp=10**20),
        good_payload(max_tunnels=-1),
        good_payload(max_tunnels=True),
        good_payload(max_tunnels="3"),
        good_payload(aud="not a relay"),
        [1, 2, 3],
        "a string",
        b"not json at all",
        b"\xff\xfe",
    ],
)
def test_well_signed_but_malformed(payload: Any) -> None:
    assert reason_of(signed({"alg": "EdDSA"}, payload), now=NOW) == "malformed"


@pytest.mark.parametrize(
    "header", [[], "x", None, {"alg": "EdDSA", "kid": 5}, {"alg": "EdDSA", "crit": ["exp"]}]
)
def test_bad_headers(header: Any) -> None:
    assert reason_of(signed(header, good_payload()), now=NOW) in {"malformed", "bad-signature"}


# Garbage


@pytest.mark.parametrize(
    "token",
    [
        None,
        123,
        b"bytes.are.not.tokens",
        ["a", "b"],
        "",
        ".",
        "..",
        "a.b",
        "a.b.c.d",
        "a.b.c",
        "===.===.===",
        "\x00.\x00.\x00",
        "\u00e9.\u00e9.\u00e9",
        "x" * (MAX_TOKEN_LENGTH + 1),
        "a." + "b" * MAX_TOKEN_LENGTH + ".c",
        mint(KEY, subject="x", ttl_seconds=60, now=NOW) + "\n",
        " " + mint(KEY, subject="x", ttl_seconds=60, now=NOW),
    ],
)
def test_garbage_is_malformed(token: Any) -> None:
    assert reason_of(token, now=NOW) == "malformed"


def test_garbage_near_the_length_limit_is_still_just_malformed() -> None:
    token = mint(KEY, subject="x" * 256, ttl_seconds=60, now=NOW)
    assert len(token) < MAX_TOKEN_LENGTH
    padded = token.split(".")
    padded[1] += "A" * (MAX_TOKEN_LENGTH - len(token))
    assert reason_of(".".join(padded), now=NOW) in {"malformed", "bad-signature"}


def check_contract(token: Any) -> None:
    """Whatever arrives, verify returns grant or raises TokenError; nothing else."""
    try:
        grant = verify(token, PUBLIC, now=NOW)
    except TokenError as exc:
        # unknown-key: a kid in the header that names no key held (an empty one too).
        assert exc.reason in {
            "malformed",
            "bad-signature",
            "unknown-key",
            "expired",
            "not-yet-valid",
        }
        assert str(exc)
    else:
        assert isinstance(grant, TokenGrant)


@given(st.text(max_size=5000))
def test_random_text(token: str) -> None:
    check_contract(token)


@given(st.binary(max_size=500))
def test_random_bytes(token: bytes) -> None:
    check_contract(token)
    check_contract(token.decode("latin-1"))


segment = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@given(segment, segment, segment)
def test_random_base64_segments(a: str, b: str, c: str) -> None:
    check_contract(f"{a}.{b}.{c}")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
claim_names = st.sampled_from(["iss", "sub", "iat", "exp", "nbf", "jti", "aud", "max_tunnels"])


@settings(max_examples=300)
@given(
    st.dictionaries(st.sampled_from(["alg", "typ", "kid", "crit", "jku", "b64"]), json_values)
    | json_values,
    st.dictionaries(claim_names, json_values) | json_values,
)
def test_random_json_truly_signed(header: Any, payload: Any) -> None:
    if isinstance(header, dict) and "alg" not in header:
        header["alg"] = "EdDSA"
    check_contract(signed(header, payload))


@settings(max_examples=300)
@given(
    st.fixed_dictionaries(
        {
            "iss": st.just(TOKEN_ISSUER) | json_values,
            "sub": st.text() | json_values,
            "iat": st.integers() | json_values,
            "jti": st.text() | json_values,
        },
        optional={"exp": st.integers() | json_values, "max_tunnels": st.integers() | json_values},
    )
)
def test_random_claims_truly_signed(payload: dict[str, Any]) -> None:
    check_contract(signed({"alg": "EdDSA"}, payload))


# Key files


def test_signing_key_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    write_signing_key(KEY, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = read_signing_key(path)
    token = mint(loaded, subject="x", ttl_seconds=60, now=NOW)
    assert verify(token, PUBLIC, now=NOW).subject == "x"


def test_public_key_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "public.pem"
    write_public_key(KEY, path)
    assert path.read_bytes() == public_key_pem(KEY)
    assert public_key_pem(KEY).startswith(b"-----BEGIN PUBLIC KEY-----")
    loaded = read_public_key(path)
    assert verify(mint(KEY, subject="x", ttl_seconds=60, now=NOW), loaded, now=NOW).subject == "x"


def test_writing_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    path.write_bytes(b"precious")
    with pytest.raises(InvalidError, match="already exists"):
        write_signing_key(KEY, path)
    with pytest.raises(InvalidError, match="already exists"):
        write_public_key(KEY, path)
    assert path.read_bytes() == b"precious"


def test_writing_into_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "signing.pem"
    with pytest.raises(InvalidError, match=str(path)):
        write_signing_key(KEY, path)


def test_reading_missing_files_names_them(tmp_path: Path) -> None:
    path = tmp_path / "missing.pem"
    with pytest.raises(InvalidError, match=str(path)):
        read_signing_key(path)
    with pytest.raises(InvalidError, match=str(path)):
        read_public_key(path)
    with pytest.raises(InvalidError, match=str(tmp_path)):
        read_signing_key(tmp_path)  # a directory


def test_reading_the_wrong_kind_of_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"hello\n")
    private = tmp_path / "private.pem"
    write_signing_key(KEY, private)
    public = tmp_path / "public.pem"
    write_public_key(KEY, public)
    ec_private = tmp_path / "ec.pem"
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_private.write_bytes(
        ec_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ec_public = tmp_path / "ec-public.pem"
    ec_public.write_bytes(
        ec_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    for path in (garbage, public, ec_private, encrypted):
        with pytest.raises(InvalidError, match=str(path)):
            read_signing_key(path)
    for path in (garbage, private, ec_public, encrypted):
        with pytest.raises(InvalidError, match=str(path)):
            read_public_key(path)


# Durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("12h", 43_200),
        ("30d", 2_592_000),
        ("1w", 604_800),
        ("2W", 1_209_600),
        (" 1d ", 86_400),
        ("never", None),
        ("NEVER", None),
    ],
)
def test_parse_duration(text: str, seconds: int | None) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "30", "d", "0s", "-1d", "1.5h", "1y", "1 d", "1d2h", "forever", "\u0661d", "99999999999w"],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidError, match="invalid duration"):
        parse_duration(text)


# Revocation


def test_revoked_token_is_refused_with_its_own_reason() -> None:
    token = mint(KEY, subject="x", ttl_seconds=60, now=NOW)
    token_id = verify(token, PUBLIC, now=NOW).token_id
    assert verify(token, PUBLIC, now=NOW, revoked={"someone-else"}).token_id == token_id
    with pytest.raises(TokenError) as info:
        verify(token, PUBLIC, now=NOW, revoked={"someone-else", token_id})
    assert info.value.reason == "revoked"
    assert str(info.value) == f"token {token_id} was revoked"


def test_a_forgery_of_a_revoked_id_is_a_forgery() -> None:
    # Only a token we signed can be "revoked": the signature is checked first.
    forged = signed(
        {"alg": "EdDSA", "typ": "JWT"}, good_payload(jti="gone"), generate_signing_key()
    )
    assert reason_of(forged, now=NOW, revoked={"gone"}) == "bad-signature"


def test_every_refusal_says_which_it_is() -> None:
    """Wrong signature, unknown key, expired, malformed, revoked: messages told apart."""
    other = generate_signing_key()
    cases = {
        "bad-signature": (signed({"alg": "EdDSA"}, good_payload(), other), NOW),
        "unknown-key": (mint(other, subject="x", ttl_seconds=60, now=NOW), NOW),
        "expired": (mint(KEY, subject="x", ttl_seconds=60, now=NOW), NOW + 3600),
        "malformed": ("not.a-token", NOW),
        "revoked": (signed({"alg": "EdDSA", "typ": "JWT"}, good_payload(jti="gone")), NOW),
    }
    words = {"bad-signature": "signature", "expired": "expired", "malformed": "malformed"}
    words["revoked"] = "revoked"
    words["unknown-key"] = "does not hold"
    for reason, (token, now) in cases.items():
        with pytest.raises(TokenError) as info:
            verify(token, PUBLIC, now=now, revoked={"gone"})
        assert info.value.reason == reason
        message = str(info.value)
        assert [word for word in words.values() if word in message] == [words[reason]], message


def test_parse_revocation_list() -> None:
    text = (
        "# revoked burrow tokens\n"
        "\n"
        "abc\n"
        "  def  # subject ci, revoked 2026-01-01\n"
        "\t\n"
        "ghi#no space before the comment\r\n"
        "# jkl is only mentioned\n"
        "abc\n"
        "last-line-without-newline"
    )
    assert parse_revocation_list(text) == {"abc", "def", "ghi", "last-line-without-newline"}
    assert parse_revocation_list("") == frozenset()
    assert parse_revocation_list("# nothing yet\n\n") == frozenset()


def test_token_id_needs_no_key() -> None:
    stranger = generate_signing_key()
    token = mint(stranger, subject="alice", ttl_seconds=60, now=NOW)
    assert token_id_of(token) == verify(token, stranger.public_key(), now=NOW).token_id
    assert token_id_of(f"  {token}\n") == token_id_of(token)
    assert unverified_subject(token) == "alice"


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b.c",
        "x" * (MAX_TOKEN_LENGTH + 1),
        signed({"alg": "EdDSA"}, [1, 2]),
        signed({"alg": "EdDSA"}, {"sub": "no id"}),
        signed({"alg": "EdDSA"}, {"jti": 7}),
    ],
)
def test_token_id_of_garbage(token: str) -> None:
    with pytest.raises(InvalidError):
        token_id_of(token)


def test_unverified_subject_stays_on_one_line() -> None:
    token = signed(
        {"alg": "EdDSA"}, good_payload(sub="evil\nrevoked-id\u2028x\x1b[31m" + "y" * 200)
    )
    subject = unverified_subject(token)
    assert subject is not None
    assert subject.isprintable()
    assert subject.startswith("evil?revoked-id?x?[31m")
    assert len(subject) <= 64


def test_append_revocation(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    assert append_revocation(path, "abc", "subject alice")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text() == "abc  # subject alice\n"
    assert not append_revocation(path, "abc")  # already there: not listed twice
    path.write_text(path.read_text() + "# a note without a newline")
    assert append_revocation(path, "def", "line\nbreak")
    assert path.read_text().splitlines() == [
        "abc  # subject alice",
        "# a note without a newline",
        "def  # line?break",
    ]
    assert parse_revocation_list(path.read_text()) == {"abc", "def"}


def test_append_revocation_keeps_the_mode_of_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text("")
    path.chmod(0o600)
    assert append_revocation(path, "abc")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("token_id", ["", "a b", "a#b", "a\nb", "a\u2028b"])
def test_append_revocation_refuses_what_cannot_be_a_line(tmp_path: Path, token_id: str) -> None:
    with pytest.raises(InvalidError):
        append_revocation(tmp_path / "revoked.txt", token_id)
    assert not (tmp_path / "revoked.txt").exists()


def test_append_revocation_into_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "revoked.txt"
    with pytest.raises(InvalidError, match=str(path)):
        append_revocation(path, "abc")


# Not before, and the relays a token is for


def test_a_token_is_not_valid_before_its_nbf() -> None:
    token = signed({"alg": "EdDSA", "typ": "JWT"}, good_payload(nbf=NOW + 100))
    assert reason_of(token, now=NOW) == "not-yet-valid"
    assert reason_of(token, now=NOW + 69) == "not-yet-valid"
    assert verify(token, PUBLIC, now=NOW + 70).not_before == NOW + 100
    with pytest.raises(TokenError, match="token is not valid yet: not before 2026-01-01T00:01:40Z"):
        verify(token, PUBLIC, now=NOW, leeway_seconds=0)


def test_mint_not_before() -> None:
    token = mint(KEY, subject="x", ttl_seconds=60, now=NOW, not_before=NOW + 10)
    assert json.loads(unb64(token.split(".")[1]))["nbf"] == NOW + 10
    assert reason_of(token, now=NOW, leeway_seconds=0) == "not-yet-valid"


def test_a_token_may_name_the_relays_it_is_for() -> None:
    token = mint(
        KEY, subject="x", ttl_seconds=60, now=NOW, relays=["R1.Example.com.", "r2.example.com"]
    )
    payload = json.loads(unb64(token.split(".")[1]))
    assert payload["aud"] == ["r1.example.com", "r2.example.com"]
    grant = verify(token, PUBLIC, now=NOW, relay="r2.example.com")
    assert grant.relays == ("r1.example.com", "r2.example.com")
    with pytest.raises(
        TokenError, match=r"^token is for r1.example.com, r2.example.com only, not r3.example.com$"
    ) as info:
        verify(token, PUBLIC, now=NOW, relay="r3.example.com")
    assert info.value.reason == "wrong-relay"
    # Without a relay to check against (a tool reading the token), it is just a grant.
    assert verify(token, PUBLIC, now=NOW).relays == ("r1.example.com", "r2.example.com")


def test_a_token_for_every_relay_names_none() -> None:
    token = mint(KEY, subject="x", ttl_seconds=60, now=NOW)
    assert "aud" not in json.loads(unb64(token.split(".")[1]))
    assert verify(token, PUBLIC, now=NOW, relay="r9.example.com").relays is None


def test_a_single_audience_string_counts_as_one_relay() -> None:
    token = signed({"alg": "EdDSA"}, good_payload(aud="r1.example.com"))
    assert verify(token, PUBLIC, now=NOW, relay="r1.example.com").relays == ("r1.example.com",)
    assert reason_of(token, now=NOW, relay="r2.example.com") == "wrong-relay"


@pytest.mark.parametrize("aud", [5, [], [5], ["ok.example.com", None], {"a": 1}, ["x" * 300]])
def test_a_malformed_audience_is_malformed(aud: Any) -> None:
    token = signed({"alg": "EdDSA"}, good_payload(aud=aud))
    assert reason_of(token, now=NOW, relay="ok.example.com") == "malformed"


@pytest.mark.parametrize("relays", [[], ["not a domain"], ["10.0.0.1"]])
def test_mint_refuses_bad_relays(relays: list[str]) -> None:
    with pytest.raises(InvalidError):
        mint(KEY, subject="x", ttl_seconds=60, now=NOW, relays=relays)


def test_check_time_is_what_verify_checks_and_what_a_relay_checks_later() -> None:
    grant = verify(mint(KEY, subject="x", ttl_seconds=60, now=NOW), PUBLIC, now=NOW)
    assert check_time(grant, now=NOW + 89) is None
    refusal = check_time(grant, now=NOW + 90)
    assert refusal is not None and refusal.reason == "expired"
    assert str(refusal) == "token expired at 2026-01-01T00:01:00Z"
    assert check_time(grant, now=NOW + 61, leeway_seconds=0) is not None


def test_no_token_id_reads_as_a_command_line_option() -> None:
    from burrow import tokens

    key = tokens.generate_signing_key()
    # A random id starts with "-" one time in 64: 2,000 tokens would show it.
    ids = {tokens.token_id_of(tokens.mint(key, subject="s", ttl_seconds=60)) for _ in range(2000)}
    assert not [i for i in ids if i.startswith("-")]


# Key ids and several keys (a rotation)


def test_key_id_is_the_hash_of_the_raw_public_key() -> None:
    raw = PUBLIC.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id(KEY) == key_id(PUBLIC) == hashlib.sha256(raw).hexdigest()[:16]
    assert key_id(generate_signing_key()) != key_id(KEY)


def test_mint_names_its_key_in_the_header() -> None:
    head = mint(KEY, subject="x", ttl_seconds=60, now=NOW).split(".")[0]
    assert json.loads(unb64(head)) == {"alg": "EdDSA", "kid": key_id(KEY), "typ": "JWT"}


def test_a_ring_of_old_and_new_keys_takes_tokens_of_both() -> None:
    new = generate_signing_key()
    ring = KeyRing.of([PUBLIC, new.public_key()])
    assert len(ring) == 2
    for key in (KEY, new):
        assert verify(mint(key, subject="x", ttl_seconds=60, now=NOW), ring, now=NOW).subject == "x"
    # Tokens minted before key ids are tried against every key.
    assert verify(signed({"alg": "EdDSA"}, good_payload()), ring, now=NOW).token_id == "abc"
    # Once the old key is gone, its tokens are refused, saying which key they need.
    with pytest.raises(TokenError) as info:
        verify(mint(KEY, subject="x", ttl_seconds=60, now=NOW), KeyRing.of([new.public_key()]))
    assert info.value.reason == "unknown-key"
    assert key_id(KEY) in str(info.value) and key_id(new) in str(info.value)


def test_a_kid_binds_the_token_to_its_key() -> None:
    # Signed by another key of the ring than the one its kid names: not good enough.
    other = generate_signing_key()
    ring = KeyRing.of([PUBLIC, other.public_key()])
    token = signed({"alg": "EdDSA", "kid": key_id(KEY)}, good_payload(), other)
    assert reason_of(token, now=NOW) == "bad-signature"
    with pytest.raises(TokenError) as info:
        verify(token, ring, now=NOW)
    assert info.value.reason == "bad-signature"


@pytest.mark.parametrize("typ", ["burrow-fleet+jwt", "JWS", 5, ["JWT"]])
def test_a_token_of_another_type_is_refused(typ: Any) -> None:
    token = signed({"alg": "EdDSA", "typ": typ}, good_payload())
    assert reason_of(token, now=NOW) == "malformed"


def test_read_public_keys_from_files_and_directories(tmp_path: Path) -> None:
    new, third = generate_signing_key(), generate_signing_key()
    keys = tmp_path / "keys"
    keys.mkdir()
    write_public_key(KEY, keys / "old.pem")
    write_public_key(new, keys / "new.pem")
    (keys / "README").write_text("not a key, not a .pem")
    write_public_key(third, tmp_path / "third.pem")
    ring = read_public_keys([keys, tmp_path / "third.pem", keys / "old.pem"])
    assert sorted(ring.keys) == sorted({key_id(KEY), key_id(new), key_id(third)})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidError, match=r"holds no \*\.pem public key files"):
        read_public_keys([empty])
    with pytest.raises(InvalidError, match="no token public key given"):
        read_public_keys([])
    write_signing_key(KEY, keys / "signing.pem")
    with pytest.raises(InvalidError, match="holds a private key"):
        read_public_keys([keys])
