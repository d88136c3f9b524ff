"""The ClientHello reader: real hellos from Python's ssl, exact bytes, and fuzzing.

Every input is fed whole and as growing prefixes: a prefix needs more bytes
(None) until the hello is complete, and from then on the same ClientHello comes
back. Whatever garbage arrives, the reader returns None or a ClientHello, or
raises RemoteProtocolError, never anything else.
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Sequence

import pytest
from backends import client_hello
from hypothesis import given
from hypothesis import strategies as st

from burrow.exception import RemoteProtocolError
from burrow.wire.clienthello import (
    MAX_CLIENT_HELLO_SIZE,
    MAX_RECORD_SIZE,
    ClientHello,
    parse_client_hello,
)

# ---------------------------------------------------------------------------
# Real ClientHellos, as Python's ssl (OpenSSL) sends them.




LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
assert len(LONG_NAME) == 253  # the longest name DNS allows

REAL_HELLOS: dict[str, tuple[bytes, ClientHello]] = {
    case: (client_hello(name, alpn, version), ClientHello(server_name=name, alpn=tuple(alpn)))
    for case, name, alpn, version in [
        ("sni-h2-http11", "visitor.example.com", ("h2", "http/1.1"), None),
        ("burrow-control", "relay.example.com", ("burrow/1",), None),
        ("burrow-data", "relay.example.com", ("burrow-data/1",), None),
        ("no-alpn", "visitor.example.com", (), None),
        ("no-sni", None, ("h2",), None),
        ("no-sni-no-alpn", None, (), None),
        ("long-name", LONG_NAME, ("http/1.1",), None),
        ("tls12-max", "old.example.com", ("http/1.1",), ssl.TLSVersion.TLSv1_2),
    ]
}
REAL = pytest.mark.parametrize("case", sorted(REAL_HELLOS))


def records_of(data: bytes) -> list[bytes]:
    """The fragments of the TLS records at the start of ``data`` (test's own parser)."""
    fragments = []
    while data:
        length = int.from_bytes(data[3:5], "big")
        fragments.append(data[5 : 5 + length])
        data = data[5 + length :]
    return fragments


def handshake_message(hello: bytes) -> bytes:
    return b"".join(records_of(hello))


def fragmented(message: bytes, sizes: Sequence[int]) -> bytes:
    """``message`` re-sent as handshake records of the given fragment sizes, cycled."""
    out = bytearray()
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= len(message):
            return bytes(out)
        fragment = message[pos : pos + size]
        out += b"\x16\x03\x01" + len(fragment).to_bytes(2, "big") + fragment
        pos += size
    raise AssertionError("unreachable")


Outcome = ClientHello | RemoteProtocolError | None


def outcome(data: bytes) -> Outcome:
    """What the reader makes of ``data``; any exception but RemoteProtocolError escapes."""
    try:
        return parse_client_hello(data)
    except RemoteProtocolError as exc:
        return exc


def growing(data: bytes) -> Outcome:
    """Feed every prefix of ``data`` in turn; check they agree and return the last outcome.

    Prefixes need more bytes until, at one length, the hello is complete or
    broken; every longer prefix then gives the same hello, or an error.
    """
    settled: Outcome = None
    for end in range(len(data) + 1):
        result = outcome(data[:end])
        if settled is None:
            settled = result
        elif isinstance(settled, ClientHello):
            assert result == settled, f"prefix of {end} bytes"
        else:
            assert isinstance(result, RemoteProtocolError), f"prefix of {end} bytes"
    return settled


@REAL
def test_real_hello_whole(case: str) -> None:
    data, expected = REAL_HELLOS[case]
    assert data[0] == 22
    assert parse_client_hello(data) == expected
    assert parse_client_hello(memoryview(data)) == expected
    assert parse_client_hello(memoryview(bytearray(data))) == expected


@REAL
def test_real_hello_every_proper_prefix_needs_more(case: str) -> None:
    data, _ = REAL_HELLOS[case]
    for end in range(len(data)):
        assert parse_client_hello(data[:end]) is None, f"prefix of {end} bytes"


@REAL
@pytest.mark.parametrize(
    "after",
    [b"\x00", b"GET / HTTP/1.1\r\n", b"\x15\x03\x03\x00\x02\x02\x28", b"\xff" * 300],
)
def test_real_hello_with_bytes_after_it(case: str, after: bytes) -> None:
    data, expected = REAL_HELLOS[case]
    assert parse_client_hello(data + after) == expected
    assert parse_client_hello(data + data) == expected


@REAL
@pytest.mark.parametrize("sizes", [[1], [7], [100], [1, 7, 100], [MAX_RECORD_SIZE]])
def test_real_hello_split_into_records(case: str, sizes: list[int]) -> None:
    data, expected = REAL_HELLOS[case]
    resplit = fragmented(handshake_message(data), sizes)
    assert parse_client_hello(resplit) == expected
    assert parse_client_hello(resplit + b"\x17\x03\x03") == expected
    # Every prefix would be quadratic in 1-byte records (3 KiB of them): take a sample.
    for end in [*range(0, len(resplit), 13), len(resplit) - 1]:
        assert parse_client_hello(resplit[:end]) is None, f"prefix of {end} bytes"


# ---------------------------------------------------------------------------
# Hand-built hellos, exact bytes.

RANDOM = bytes(range(32))

# The fields every ClientHello has, 41 bytes: the smallest a hello can be.
BODY_START = (
    b"\x03\x03"  # legacy_version: TLS 1.2
    + RANDOM
    + b"\x00"  # legacy_session_id: empty
    + b"\x00\x02\x13\x01"  # cipher_suites: TLS_AES_128_GCM_SHA256
    + b"\x01\x00"  # legacy_compression_methods: null
)

NO_EXTENSIONS = (
    b"\x16\x03\x01\x00\x2d"  # handshake record, version TLS 1.0, 45 bytes
    + b"\x01\x00\x00\x29"  # ClientHello, 41 bytes
    + BODY_START
)

SNI_ONLY = (
    b"\x16\x03\x01\x00\x43"  # handshake record, 67 bytes
    + b"\x01\x00\x00\x3f"  # ClientHello, 63 bytes
    + BODY_START
    + b"\x00\x14"  # extensions, 20 bytes
    + b"\x00\x00\x00\x10"  # server_name, 16 bytes
    + b"\x00\x0e"  # server_name_list, 14 bytes
    + b"\x00\x00\x0bexample.com"  # host_name, 11 bytes
)

ALPN_ONLY = (
    b"\x16\x03\x01\x00\x41"  # handshake record, 65 bytes
    + b"\x01\x00\x00\x3d"  # ClientHello, 61 bytes
    + BODY_START
    + b"\x00\x12"  # extensions, 18 bytes
    + b"\x00\x10\x00\x0e"  # application_layer_protocol_negotiation, 14 bytes
    + b"\x00\x0c"  # protocol_name_list, 12 bytes
    + b"\x02h2\x08http/1.1"
)


def record(fragment: bytes, content_type: int = 22) -> bytes:
    return bytes([content_type, 3, 1]) + len(fragment).to_bytes(2, "big") + fragment


def hello_of(body: bytes) -> bytes:
    """A ClientHello message with ``body``, in one handshake record."""
    return record(b"\x01" + len(body).to_bytes(3, "big") + body)


def with_extensions(extensions: bytes) -> bytes:
    return hello_of(BODY_START + len(extensions).to_bytes(2, "big") + extensions)


def test_helpers_build_the_exact_bytes() -> None:
    assert hello_of(BODY_START) == NO_EXTENSIONS
    assert with_extensions(SNI_ONLY[-20:]) == SNI_ONLY
    assert with_extensions(ALPN_ONLY[-18:]) == ALPN_ONLY


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (NO_EXTENSIONS, ClientHello(server_name=None, alpn=())),
        (SNI_ONLY, ClientHello(server_name="example.com", alpn=())),
        (ALPN_ONLY, ClientHello(server_name=None, alpn=("h2", "http/1.1"))),
        # An empty extensions block, as TLS 1.2 allows.
        (hello_of(BODY_START + b"\x00\x00"), ClientHello(server_name=None, alpn=())),
        # A 32-byte session id, 2 cipher suites and 2 compression methods.
        (
            hello_of(
                b"\x03\x01" + RANDOM + b"\x20" + bytes(32) + b"\x00\x04\x00\x2f\x00\x35\x02\x01\x00"
            ),
            ClientHello(server_name=None, alpn=()),
        ),
        # An unknown name type before the host_name, which is taken as sent.
        (
            with_extensions(b"\x00\x00\x00\x10\x00\x0e\x07\x00\x03abc\x00\x00\x05Ex.Co"),
            ClientHello(server_name="Ex.Co", alpn=()),
        ),
        # Only the first host_name counts.
        (
            with_extensions(b"\x00\x00\x00\x0c\x00\x0a\x00\x00\x02aa\x00\x00\x02bb"),
            ClientHello(server_name="aa", alpn=()),
        ),
        # A server_name list with no host_name in it.
        (
            with_extensions(b"\x00\x00\x00\x08\x00\x06\x07\x00\x03abc"),
            ClientHello(server_name=None, alpn=()),
        ),
        # ALPN ids are bytes: a non-ASCII one comes back as Latin-1.
        (
            with_extensions(b"\x00\x10\x00\x08\x00\x06\x02\xff\x00\x02h2"),
            ClientHello(server_name=None, alpn=("\xff\x00", "h2")),
        ),
        # Unknown extensions are skipped, an empty one included.
        (
            with_extensions(b"\x0a\x0a\x00\x00" + SNI_ONLY[-20:] + b"\xfe\xff\x00\x01\x00"),
            ClientHello(server_name="example.com", alpn=()),
        ),
    ],
)
def test_hand_built_hello(data: bytes, expected: ClientHello) -> None:
    assert growing(data + b"\x16") == expected
    assert growing(fragmented(handshake_message(data), [1])) == expected


def test_largest_record_and_hello_allowed() -> None:
    # The headers alone of a record and a hello at their limits need more bytes.
    size = MAX_CLIENT_HELLO_SIZE.to_bytes(3, "big")
    assert parse_client_hello(b"\x16\x03\x01\x40\x00\x01" + size) is None
    padding = MAX_CLIENT_HELLO_SIZE - len(BODY_START) - 2 - 4
    body = BODY_START + (padding + 4).to_bytes(2, "big")
    body += b"\x00\x15" + padding.to_bytes(2, "big") + bytes(padding)  # padding extension
    assert len(body) == MAX_CLIENT_HELLO_SIZE
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    data = fragmented(message, [MAX_RECORD_SIZE])
    assert parse_client_hello(data) == ClientHello(server_name=None, alpn=())
    assert parse_client_hello(data[:-1]) is None


# A record with the first 20 bytes of a hello, which needs more records.
FIRST_20 = b"\x16\x03\x01\x00\x14" + NO_EXTENSIONS[5:25]

ERRORS = [
    # Not TLS at all.
    (b"GET / HTTP/1.1\r\n", "content type 71 at byte 0"),
    (b"\x80\x2e\x01\x03\x01", "content type 128"),  # an SSL 2.0 hello
    (b"\x16\x02\x00\x00\x2d", "version major byte 2"),
    (b"\x16\x04", "version major byte 4"),
    # Records that cannot carry a ClientHello.
    (b"\x16\x03\x01\x40\x01", "record of 16385 bytes"),
    (b"\x16\x03\x01\x00\x00", "empty TLS handshake record"),
    (b"\x15\x03\x03\x00\x02\x02\x28", "alert record before the end of the ClientHello"),
    (FIRST_20 + record(b"\x02\x28", 21), "alert record before the end"),
    (FIRST_20 + record(b"\x01", 20), "change_cipher_spec record before"),
    (FIRST_20 + b"\x16\x02", "version major byte 2 at byte 26"),
    (FIRST_20 + b"GET", "content type 71 at byte 25"),
    # A handshake message that is not a ClientHello, or too large for one.
    (b"\x16\x03\x03\x00\x01\x02", "handshake message of type 2"),
    (record(b"\x02\x00\x00\x26" + BODY_START[:38]), "handshake message of type 2"),
    (b"\x16\x03\x01\x00\x04\x01\x00\x80\x01", "ClientHello of 32769 bytes"),
    (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "ClientHello of 16777215 bytes"),
    # Fields that overflow the message the handshake header says it is.
    (hello_of(BODY_START[:10]), r"random \(32 bytes\) runs past the end of the ClientHello"),
    (hello_of(b"\x03\x03" + RANDOM + b"\x20" + bytes(31)), "legacy_session_id"),
    (hello_of(b"\x03\x03" + RANDOM + b"\x00\x00\x04\x13\x01"), "cipher_suites"),
    (hello_of(b"\x03\x03" + RANDOM + b"\x00\x00\x02\x13\x01"), "length of legacy_comp"),
    (hello_of(BODY_START + b"\x00"), "length of extensions"),
    (hello_of(BODY_START + b"\x00\x05\x00\x00\x00\x00"), r"extensions \(5 bytes\) runs past"),
    (hello_of(b"\x02\x00" + BODY_START[2:]), "legacy_version 0x0200 is not TLS"),
    # Fields with sizes the protocol does not allow.
    (hello_of(b"\x03\x03" + RANDOM + b"\x21" + bytes(33) + BODY_START[35:]), "33 bytes"),
    (hello_of(b"\x03\x03" + RANDOM + b"\x00\x00\x03\x13\x01\x02\x01\x00"), "cipher_suites of 3"),
    (hello_of(b"\x03\x03" + RANDOM + b"\x00\x00\x00\x01\x00"), "cipher_suites of 0"),
    (hello_of(BODY_START[:-2] + b"\x00"), "empty legacy_compression_methods"),
    # Extensions that overflow or leave bytes over.
    (with_extensions(b"\x00\x17\x00\x01"), r"extension 23 \(1 bytes\) runs past"),
    (with_extensions(b"\x00\x17\x00"), "length of extension 23"),
    (with_extensions(b"\x00"), "extension type"),
    (hello_of(BODY_START + b"\x00\x00\x00"), "1 trailing bytes after the ClientHello"),
    (hello_of(ALPN_ONLY[9:] + b"\x00\x00\x00\x00"), "4 trailing bytes after the ClientHello"),
    (with_extensions(SNI_ONLY[-20:] + b"\x00\x17\x00\x00" + SNI_ONLY[-20:]), "duplicate ext"),
    (with_extensions(ALPN_ONLY[-18:] * 2), "duplicate extension 16"),
    (with_extensions(b"\x00\x17\x00\x00\x00\x17\x00\x00"), "duplicate extension 23"),
    # server_name extensions that break RFC 6066.
    (with_extensions(b"\x00\x00\x00\x0d\x00\x0b\x00\x00\x08ex\xc3\xa4m.co"), "not ASCII"),
    (with_extensions(b"\x00\x00\x00\x05\x00\x03\x00\x00\x00"), "empty server name of type 0"),
    (with_extensions(b"\x00\x00\x00\x02\x00\x00"), "empty server_name_list"),
    (with_extensions(b"\x00\x00\x00\x00"), "length of server_name_list"),
    (with_extensions(b"\x00\x00\x00\x06\x00\x03\x00\x00\x00\x00"), "1 trailing bytes after"),
    (with_extensions(b"\x00\x00\x00\x07\x00\x05\x00\x00\x05ab"), r"server name of type 0 \(5"),
    (with_extensions(b"\x00\x00\x00\x03\x00\x01\x00"), "length of server name"),
    # ALPN extensions that break RFC 7301.
    (with_extensions(b"\x00\x10\x00\x02\x00\x00"), "empty ALPN protocol_name_list"),
    (with_extensions(b"\x00\x10\x00\x04\x00\x02\x00\x00"), "empty ALPN protocol name"),
    (with_extensions(b"\x00\x10\x00\x05\x00\x03\x03h2"), "ALPN protocol name"),
    (with_extensions(b"\x00\x10\x00\x06\x00\x03\x02h2\x00"), "1 trailing bytes after the ALPN"),
]


@pytest.mark.parametrize(("data", "message"), ERRORS, ids=[message for _, message in ERRORS])
def test_error(data: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        parse_client_hello(data)
    # Every shorter prefix needs more bytes or is already broken; none is a hello.
    assert isinstance(growing(data), RemoteProtocolError)


# ---------------------------------------------------------------------------
# Fuzzing: None, a ClientHello or RemoteProtocolError, whatever the bytes.

REAL_BYTES = [REAL_HELLOS[case][0] for case in sorted(REAL_HELLOS)]


@st.composite
def damaged_hellos(draw: st.DrawFn) -> bytes:
    """A real or hand-built hello with some bytes changed, then perhaps cut short."""
    data = bytearray(draw(st.sampled_from([*REAL_BYTES, NO_EXTENSIONS, SNI_ONLY, ALPN_ONLY])))
    if draw(st.booleans()):
        data = bytearray(fragmented(handshake_message(bytes(data)), [draw(st.integers(1, 300))]))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))]) + draw(st.binary(max_size=8))


@st.composite
def random_hellos(draw: st.DrawFn) -> bytes:
    """Random bytes behind valid record and handshake headers, to reach the body's fields."""
    body = draw(st.binary(max_size=200))
    return hello_of(body)[: draw(st.integers(0, len(body) + 9))]


@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    outcome(data)


@given(random_hellos())
def test_fuzz_random_bodies(data: bytes) -> None:
    growing(data)


@given(damaged_hellos())
def test_fuzz_damaged_hellos(data: bytes) -> None:
    outcome(data)


@given(st.one_of(damaged_hellos(), random_hellos(), st.binary(max_size=40)))
def test_fuzz_growing_prefixes(data: bytes) -> None:
    growing(data)
