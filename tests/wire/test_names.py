"""Tests for burrow.wire.names: labels, domains, SNI routing and addresses."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from burrow.exception import InvalidError
from burrow.wire.names import (
    LABEL_ALPHABET,
    LABEL_LENGTH,
    is_label,
    is_loopback_name,
    label_of,
    new_label,
    normalize_domain,
    parse_address,
    resolve_host,
    server_name,
)

# Labels


def test_new_labels_are_unique_and_well_formed() -> None:
    labels = [new_label() for _ in range(10_000)]
    assert len(set(labels)) == len(labels)
    pattern = re.compile(r"[a-z0-9]{14}")
    assert all(pattern.fullmatch(label) for label in labels)
    assert all(is_label(label) for label in labels)


def test_new_labels_use_the_whole_alphabet() -> None:
    # A generator stuck on a subset of the alphabet would still pass the
    # regex above; 10,000 labels draw each symbol thousands of times.
    seen = set("".join(new_label() for _ in range(10_000)))
    assert seen == set(LABEL_ALPHABET)


def test_label_constants() -> None:
    assert LABEL_LENGTH == 14
    assert LABEL_ALPHABET == "abcdefghijklmnopqrstuvwxyz0123456789"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "wtqcahqwhd4tu",  # 13
        "wtqcahqwhd4tu00",  # 15
        "WTQCAHQWHD4TU0",
        "wtqcahqwhd4tu-",
        "wtqcahqwhd4tu\n",
        "wtqcahqwhd4t\u00fc0",
        "wtqcahqwhd4tu0.r1",
    ],
)
def test_is_label_rejects(text: str) -> None:
    assert not is_label(text)


def test_is_label_accepts() -> None:
    assert is_label("wtqcahqwhd4tu0")
    assert is_label("00000000000000")


# Domains


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("r1.example.com", "r1.example.com"),
        ("R1.Example.COM", "r1.example.com"),
        ("r1.example.com.", "r1.example.com"),
        ("localhost", "localhost"),
        ("r1.localhost", "r1.localhost"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("a-b.c0", "a-b.c0"),
        ("1.example.com", "1.example.com"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
        (".".join(["a" * 63] * 3 + ["b" * 61]), ".".join(["a" * 63] * 3 + ["b" * 61])),
    ],
)
def test_normalize_domain_accepts(domain: str, expected: str) -> None:
    assert normalize_domain(domain) == expected


@pytest.mark.parametrize(
    "domain",
    [
        "",
        ".",
        "example.com..",
        ".example.com",
        "a..b",
        "-a.com",
        "a-.com",
        "a_b.com",
        "a b.com",
        " example.com",
        "example.com\n",
        "a" * 64 + ".com",
        ".".join(["a" * 63] * 3 + ["b" * 62]),  # 254 characters
        "b\u00fccher.example",
        "\u212aelvin.example",  # Kelvin sign, which lower() turns into "k"
        "127.0.0.1",
        "example.123",
        "*.example.com",
        "example.com:443",
    ],
)
def test_normalize_domain_rejects(domain: str) -> None:
    with pytest.raises(InvalidError, match="invalid domain"):
        normalize_domain(domain)


@given(st.text(max_size=300))
def test_normalize_domain_only_raises_invalid_error(text: str) -> None:
    try:
        result = normalize_domain(text)
    except InvalidError:
        return
    assert result == normalize_domain(result)
    assert len(result) <= 253


# SNI routing


@pytest.mark.parametrize(
    ("server_name", "domain", "expected"),
    [
        ("wtqcahqwhd4tu0.r1.example.com", "r1.example.com", "wtqcahqwhd4tu0"),
        ("WTQCAHQWHD4TU0.R1.Example.com", "r1.example.com", "wtqcahqwhd4tu0"),
        ("wtqcahqwhd4tu0.r1.example.com.", "r1.example.com", "wtqcahqwhd4tu0"),
        ("abc.r1.localhost", "r1.localhost", "abc"),
        ("not-a-burrow-label.r1.localhost", "r1.localhost", "not-a-burrow-label"),
        ("abc.localhost", "localhost", "abc"),
    ],
)
def test_label_of_finds_the_label(server_name: str, domain: str, expected: str) -> None:
    assert label_of(server_name, domain) == expected


@pytest.mark.parametrize(
    "server_name",
    [
        None,
        "",
        "r1.example.com",
        "r1.example.com.",
        ".r1.example.com",
        "a.b.r1.example.com",
        "abc.r2.example.com",
        "abcr1.example.com",
        "abc.r1.example.com.evil.com",
        "abc.example.com",
        "-abc.r1.example.com",
        "a_b.r1.example.com",
        "*.r1.example.com",
        "abc..r1.example.com",
        "\u212a.r1.example.com",
        "abc.r1.example.com..",
        "a" * 64 + ".r1.example.com",
    ],
)
def test_label_of_refuses(server_name: str | None) -> None:
    assert label_of(server_name, "r1.example.com") is None


# Loopback


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST", "localhost.", "r1.localhost", "abc.R1.LocalHost."]
)
def test_loopback_names(host: str) -> None:
    assert is_loopback_name(host)
    assert resolve_host(host) == "127.0.0.1"


@pytest.mark.parametrize(
    "host",
    ["example.com", "localhost.example.com", "notlocalhost", "127.0.0.1", "::1", "", "localhos"],
)
def test_not_loopback_names(host: str) -> None:
    assert not is_loopback_name(host)
    assert resolve_host(host) == host


# Addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.com", ("example.com", 443)),
        ("Example.COM.", ("example.com", 443)),
        ("example.com:8443", ("example.com", 8443)),
        ("r1.localhost:0", ("r1.localhost", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("127.0.0.1", ("127.0.0.1", 443)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]", ("::1", 443)),
        ("[::1]:8000", ("::1", 8000)),
        ("::1", ("::1", 443)),
        ("2001:db8::1", ("2001:db8::1", 443)),
        ("[2001:db8::1]:22", ("2001:db8::1", 22)),
        ("fe80::1%eth0", ("fe80::1%eth0", 443)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text, 443) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":",
        ":443",
        "example.com:",
        "example.com:65536",
        "example.com:-1",
        "example.com:+80",
        "example.com: 80",
        "example.com:80 ",
        "example.com:8_0",
        "example.com:\u0668\u0660",  # Arabic-Indic digits, which int() accepts
        "example.com:http",
        "exa mple.com",
        "example..com",
        "[::1",
        "[::1]x",
        "[::1]:",
        "[::1]:99999",
        "[127.0.0.1]:80",
        "[example.com]:80",
        "[]",
        "::1:xyz",
        "1:2:3",
        "256.1.1.1",
        "http://example.com",
    ],
)
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(InvalidError, match="address"):
        parse_address(text, 443)


def test_parse_address_checks_default_port() -> None:
    with pytest.raises(InvalidError):
        parse_address("example.com", 70000)


@given(st.text(max_size=80), st.integers(min_value=0, max_value=65535))
def test_parse_address_only_raises_invalid_error(text: str, default_port: int) -> None:
    try:
        host, port = parse_address(text, default_port)
    except InvalidError:
        return
    assert host
    assert 0 <= port <= 65535


# Server names: one normal form for every path that routes by name


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("abc.r1.example.com", "abc.r1.example.com"),
        ("ABC.R1.Example.com.", "abc.r1.example.com"),
        ("r1.example.com.", "r1.example.com"),
        ("abc.r1.example.com..", None),
        ("abc..r1.example.com", None),
        (".abc.r1.example.com", None),
        ("", None),
        (".", None),
        ("\u212a.r1.example.com", None),
        (None, None),
    ],
)
def test_server_name_is_the_one_normal_form(name: str | None, expected: str | None) -> None:
    assert server_name(name) == expected


@given(st.text(alphabet="aB.-1", max_size=30))
def test_label_of_agrees_with_server_name(name: str) -> None:
    # Whatever a visitor sends, every path routes it the same way: _route reads
    # label_of of the raw name, the SNI callback label_of of server_name's.
    normal = server_name(name)
    assert label_of(name, "r1.example.com") == (
        label_of(normal, "r1.example.com") if normal is not None else None
    )
    if normal is not None:
        assert server_name(normal) == normal
