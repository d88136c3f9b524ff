"""Tests for burrow.relay.claims: claims signed and checked on exact strings, no sockets."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from burrow.relay.claims import CLAIM_KEY_CONTEXT, CLAIM_MAC_HEX, Claim, ClaimSigner

SECRET = b"relay key"
LABEL = "abcdefghijklmn"
SIGNER = ClaimSigner(SECRET)


def reference_mac(secret: bytes, body: str) -> str:
    """The format, written out: HMAC-SHA256(secret, context || body), 32 hex digits."""
    return hmac.new(secret, CLAIM_KEY_CONTEXT + body.encode(), hashlib.sha256).hexdigest()[:32]


def test_a_claim_has_the_documented_bytes() -> None:
    # Pinned: a relay restarted on a new version must still honour the claims
    # agents hold, so the format may never drift.
    assert SIGNER.sign(LABEL, None, "tok1") == "abcdefghijklmn.0.6899d53d7d3fa9eb70ed4200b2b23c2c"
    assert SIGNER.sign(LABEL, 20001, "tok1") == (
        "abcdefghijklmn.20001.71fdd49a62151db471fc665c58d20e45"
    )
    mac = reference_mac(SECRET, f"{LABEL}.0.tok1")
    assert SIGNER.sign(LABEL, None, "tok1") == f"{LABEL}.0.{mac}"
    assert CLAIM_MAC_HEX == 32


def test_a_claim_proves_its_label_and_port_for_its_token() -> None:
    assert SIGNER.check(SIGNER.sign(LABEL, None, "tok1"), "tok1") == Claim(LABEL, None)
    assert SIGNER.check(SIGNER.sign(LABEL, 20001, "tok1"), "tok1") == Claim(LABEL, 20001)


def test_a_restarted_relay_with_the_same_key_honours_old_claims() -> None:
    claim = SIGNER.sign(LABEL, 20001, "tok1")
    assert ClaimSigner(SECRET).check(claim, "tok1") == Claim(LABEL, 20001)
    assert ClaimSigner(b"another relay's key").check(claim, "tok1") is None


def test_a_claim_is_for_its_token_only() -> None:
    assert SIGNER.check(SIGNER.sign(LABEL, None, "tok1"), "tok2") is None


@pytest.mark.parametrize(
    "claim",
    [
        "",
        "abcdefghijklmn.0",
        "abcdefghijklmn.0.6899d53d7d3fa9eb70ed4200b2b23c2c.extra",
        # the right mac, one digit changed
        "abcdefghijklmn.0.6899d53d7d3fa9eb70ed4200b2b23c2d",
        # a shorter mac, a longer one
        "abcdefghijklmn.0.6899d53d7d3fa9eb70ed4200b2b23c2",
        "abcdefghijklmn.0.6899d53d7d3fa9eb70ed4200b2b23c2c0",
        # another label or port under the same mac
        "bbcdefghijklmn.0.6899d53d7d3fa9eb70ed4200b2b23c2c",
        "abcdefghijklmn.1.6899d53d7d3fa9eb70ed4200b2b23c2c",
        # not a label: upper case, too short, a dash
        "ABCDEFGHIJKLMN.0.6899d53d7d3fa9eb70ed4200b2b23c2c",
        "abc.0.6899d53d7d3fa9eb70ed4200b2b23c2c",
        "abcdefghijklm-.0.6899d53d7d3fa9eb70ed4200b2b23c2c",
        # not a port: too many digits, a sign, not digits
        "abcdefghijklmn.000000.6899d53d7d3fa9eb70ed4200b2b23c2c",
        "abcdefghijklmn.-1.6899d53d7d3fa9eb70ed4200b2b23c2c",
        "abcdefghijklmn.x.6899d53d7d3fa9eb70ed4200b2b23c2c",
        # a mac that is not ASCII (compare_digest refuses such str)
        "abcdefghijklmn.0.6899d53d7d3fa9eb70ed4200b2b23c2é",
    ],
)
def test_anything_but_a_signed_claim_proves_nothing(claim: str) -> None:
    assert SIGNER.check(claim, "tok1") is None


@given(st.text(max_size=80), st.text(max_size=20))
def test_whatever_an_agent_sends_checking_returns_none_and_never_raises(
    claim: str, token_id: str
) -> None:
    assert SIGNER.check(claim, token_id) is None
