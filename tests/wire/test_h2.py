"""The HTTP/2 check: requests for the connection's name pass, others get 421.

Client frames come from the ``h2`` library (a real HPACK encoder with its
dynamic table) or are built by hand where a flag matters; what the inspector
forwards is read back by an ``h2`` server, so a request reaches the server
with exactly the headers the client sent or not at all. Every input is fed
whole and one byte at a time. Whatever arrives, the inspector returns or
raises H2Error, never anything else (Hypothesis).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import hpack
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    Event,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.settings import SettingCodes
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow.exception import RemoteProtocolError
from burrow.wire import h2
from burrow.wire.h2 import (
    CONTINUATION,
    DATA,
    FLAG_END_HEADERS,
    FLAG_END_STREAM,
    FLAG_PADDED,
    FLAG_PRIORITY,
    HEADERS,
    MAX_HEADER_BLOCK,
    MAX_REFUSED_STREAMS,
    PREFACE,
    SETTINGS,
    H2Error,
    Inspector,
    frame,
)

NAME = "ours0000000000.r1.localhost"
OTHER = "them0000000000.r1.localhost"
PORT = 8443
SERVER_PREFACE = frame(SETTINGS, 0, 0)
MODES = pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])

Headers = list[tuple[bytes, bytes]]


def request_headers(
    authority: str, *extra: tuple[str, str], path: str = "/", method: str = "GET"
) -> Headers:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
        *((k.encode(), v.encode()) for k, v in extra),
    ]


def client() -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    return conn


# What an h2 client sends after the preface when it starts (always the same).
CLIENT_SETTINGS = client().data_to_send()[len(PREFACE) :]


def server(**local_settings: int) -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    if local_settings:
        conn.local_settings = conn.local_settings.__class__(
            client=False,
            initial_values={SettingCodes(int(k)): v for k, v in local_settings.items()},
        )
    conn.initiate_connection()
    return conn


@dataclass
class Relay:
    """The inspector between a visitor and a server, as the relay drives it."""

    inspector: Inspector = field(default_factory=lambda: Inspector(NAME, frozenset({PORT})))
    bytewise: bool = False
    forwarded: bytearray = field(default_factory=bytearray)
    to_visitor: bytearray = field(default_factory=bytearray)

    def from_client(self, data: bytes) -> bytes:
        """Feed the visitor's bytes; what was forwarded by this call."""
        start = len(self.forwarded)
        for piece in self._pieces(data):
            self.forwarded += self.inspector.from_visitor(piece)
            self.to_visitor += self.inspector.replies()
        return bytes(self.forwarded[start:])

    def from_server(self, data: bytes) -> bytes:
        """Feed the server's bytes; what the visitor got from this call."""
        start = len(self.to_visitor)
        for piece in self._pieces(data):
            self.to_visitor += self.inspector.to_visitor(piece)
        return bytes(self.to_visitor[start:])

    def _pieces(self, data: bytes) -> Iterable[bytes]:
        if self.bytewise:
            return (data[i : i + 1] for i in range(len(data)))
        return (data,)


def requests_at_server(srv: H2Connection, data: bytes) -> dict[int, Headers]:
    return {
        e.stream_id: [(bytes(k), bytes(v)) for k, v in e.headers]
        for e in srv.receive_data(data)
        if isinstance(e, RequestReceived) and e.headers is not None
    }


def events_at_client(conn: H2Connection, data: bytes) -> list[Event]:
    return conn.receive_data(data)


def frames_of(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    while data:
        length = int.from_bytes(data[:3], "big")
        out.append((data[3], data[4], int.from_bytes(data[5:9], "big"), data[9 : 9 + length]))
        data = data[9 + length :]
    return out


# -- the right name --------------------------------------------------------------------


@MODES
def test_requests_for_the_connections_name_pass_byte_for_byte(bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    c = client()
    c.send_headers(1, request_headers(NAME), end_stream=True)
    c.send_headers(3, request_headers(f"{NAME}:{PORT}", ("cookie", "a=1")), end_stream=True)
    c.send_headers(5, request_headers(f"{NAME.upper()}.:{PORT}", ("cookie", "a=1")))
    c.send_data(5, b"x" * 1000, end_stream=True)
    sent = c.data_to_send()
    assert relay.from_client(sent) == sent
    assert relay.from_server(SERVER_PREFACE) == SERVER_PREFACE
    assert relay.to_visitor == SERVER_PREFACE  # nothing of the relay's own
    seen = requests_at_server(server(), sent)
    assert sorted(seen) == [1, 3, 5]


@MODES
def test_server_bytes_pass_unchanged(bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    c, s = client(), server()
    c.send_headers(1, request_headers(NAME), end_stream=True)
    s.receive_data(relay.from_client(c.data_to_send()))
    s.send_headers(1, [(b":status", b"200"), (b"x-big", b"y" * 20000)])
    for _ in range(3):
        s.send_data(1, b"z" * 16000)
    s.end_stream(1)
    out = s.data_to_send()
    assert relay.from_server(out) == out


def test_server_bytes_come_back_as_the_same_object_when_nothing_waits() -> None:
    inspector = Inspector(NAME, frozenset({PORT}))
    big = frame(SETTINGS, 0, 0) + frame(DATA, 0, 1, b"d" * 100)
    assert inspector.to_visitor(big) is big
    head = frame(DATA, 0, 1, b"e" * 1000)[:200]
    assert inspector.to_visitor(head) is head
    middle = b"e" * 500
    assert inspector.to_visitor(middle) is middle  # inside a frame: no parsing


# -- another name ----------------------------------------------------------------------

# :status 421 and content-length 0 as literals without indexing (static names 8 and 28).
MISDIRECTED_1 = bytes.fromhex("000009 01 05 00000001 08 03 343231 0f0d 01 30".replace(" ", ""))


def test_the_421_is_these_bytes_and_touches_no_dynamic_table() -> None:
    assert h2.misdirected(1, reset=False) == MISDIRECTED_1
    decoder = hpack.Decoder()
    assert decoder.decode(MISDIRECTED_1[9:]) == [(":status", "421"), ("content-length", "0")]
    assert len(decoder.header_table.dynamic_entries) == 0


@MODES
def test_a_request_for_another_name_gets_421_and_is_not_forwarded(bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    c = client()
    preface = c.data_to_send()
    assert relay.from_client(preface) == preface
    c.send_headers(1, request_headers(OTHER, ("cookie", "sid=secret-of-them")), end_stream=True)
    assert relay.from_client(c.data_to_send()) == b""
    assert relay.to_visitor == b""  # not before the server's SETTINGS
    assert relay.from_server(SERVER_PREFACE) == SERVER_PREFACE + MISDIRECTED_1
    events = events_at_client(c, bytes(relay.to_visitor))
    response = [e for e in events if isinstance(e, ResponseReceived)]
    assert [(e.stream_id, e.headers) for e in response] == [
        (1, [(b":status", b"421"), (b"content-length", b"0")])
    ]
    assert any(isinstance(e, StreamEnded) and e.stream_id == 1 for e in events)
    assert relay.inspector.refused == {1}


@MODES
@pytest.mark.parametrize(
    "authority",
    [
        OTHER,
        f"{OTHER}:{PORT}",
        f"{NAME}:1",  # not the relay's port
        f"{NAME}:",
        f"x.{NAME}",
        f"{NAME}..",
        "[::1]:8443",
        "127.0.0.1",
        f"user@{NAME}",
        "",
    ],
)
def test_what_is_not_the_name(authority: str, bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    c = client()
    c.send_headers(1, request_headers(authority), end_stream=True)
    relay.from_server(SERVER_PREFACE)
    assert relay.from_client(c.data_to_send()) == PREFACE + CLIENT_SETTINGS
    assert relay.inspector.refused == {1}


@MODES
@pytest.mark.parametrize(
    "headers",
    [
        # no :authority and no host
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/")],
        # host names another tunnel, :authority this one
        [*request_headers(NAME), (b"host", OTHER.encode())],
        # only host, for another tunnel
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"host", OTHER.encode())],
    ],
    ids=["none", "host-differs", "host-only"],
)
def test_host_counts_as_much_as_authority(headers: Headers, bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    relay.from_server(SERVER_PREFACE)
    block = hpack.Encoder().encode(headers)
    sent = PREFACE + frame(HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 1, block)
    assert relay.from_client(sent) == PREFACE
    assert relay.to_visitor == SERVER_PREFACE + MISDIRECTED_1


@MODES
def test_only_host_naming_this_tunnel_passes(bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    headers = [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":path", b"/"),
        (b"host", NAME.encode()),
    ]
    sent = PREFACE + frame(
        HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 1, hpack.Encoder().encode(headers)
    )
    assert relay.from_client(sent) == sent


@MODES
def test_a_refused_requests_body_is_dropped_and_its_window_given_back(bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    c = client()
    c.send_headers(1, request_headers(OTHER, method="POST"))
    c.send_data(1, b"b" * 5000, pad_length=100)
    c.send_data(1, b"c" * 3000)
    window_before = 65535
    assert c.outbound_flow_control_window == window_before - 5101 - 3000
    sent = c.data_to_send()
    forwarded = relay.from_client(sent)
    assert forwarded == PREFACE + CLIENT_SETTINGS  # preface and SETTINGS only
    relay.from_server(SERVER_PREFACE)
    assert relay.to_visitor == SERVER_PREFACE + h2.window_update(5101 + 3000) + h2.misdirected(
        1, reset=True
    )
    events = events_at_client(c, bytes(relay.to_visitor))
    assert [e.stream_id for e in events if isinstance(e, ResponseReceived)] == [1]
    assert any(isinstance(e, StreamReset) and e.error_code == 0 for e in events)
    assert c.outbound_flow_control_window == window_before  # nothing lost for good
    # More of the body, already on its way: still dropped, still given back.
    more = frame(DATA, FLAG_END_STREAM, 1, b"d" * 10)
    assert relay.from_client(more) == b""
    assert relay.to_visitor.endswith(h2.window_update(10))


@MODES
def test_a_refused_request_that_has_ended_gets_no_reset(bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    c = client()
    c.send_headers(1, request_headers(OTHER, method="POST"))
    c.send_data(1, b"b" * 100, end_stream=True)
    c.send_headers(3, request_headers(OTHER, method="POST"))
    c.send_headers(3, [(b"x-trailer", b"1")], end_stream=True)
    c.send_headers(5, request_headers(OTHER, method="POST"))
    c.reset_stream(5)
    relay.from_client(c.data_to_send())
    relay.from_server(SERVER_PREFACE)
    assert relay.to_visitor == SERVER_PREFACE + h2.window_update(100) + b"".join(
        h2.misdirected(stream, reset=False) for stream in (1, 3, 5)
    )


def test_replies_wait_for_a_frame_boundary_of_the_server() -> None:
    relay = Relay()
    c = client()
    relay.from_client(c.data_to_send())
    big = frame(DATA, 0, 1, b"s" * 1000)
    assert relay.from_server(SERVER_PREFACE + big[:500]) == SERVER_PREFACE + big[:500]
    c.send_headers(3, request_headers(OTHER), end_stream=True)
    relay.from_client(c.data_to_send())
    assert relay.to_visitor == SERVER_PREFACE + big[:500]  # mid-frame: it waits
    assert relay.from_server(big[500:] + big) == big[500:] + h2.misdirected(3, reset=False) + big


@MODES
def test_replies_never_split_the_servers_header_block(bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    c = client()
    relay.from_client(c.data_to_send())
    opening = frame(HEADERS, 0, 1, b"\x88") + frame(CONTINUATION, 0, 1, b"")
    relay.from_server(SERVER_PREFACE + opening)
    c.send_headers(3, request_headers(OTHER), end_stream=True)
    relay.from_client(c.data_to_send())
    closing = frame(CONTINUATION, FLAG_END_HEADERS, 1, b"") + frame(DATA, 0, 1, b"x")
    out = relay.from_server(closing)
    assert out == closing[:9] + h2.misdirected(3, reset=False) + closing[9:]


# -- frames built by hand ----------------------------------------------------------------


def blocks(authority: str) -> bytes:
    return hpack.Encoder().encode(request_headers(authority, ("accept", "*/*")))


@MODES
@pytest.mark.parametrize("authority, passes", [(NAME, True), (OTHER, False)])
def test_continuation(bytewise: bool, authority: str, passes: bool) -> None:
    relay = Relay(bytewise=bytewise)
    relay.from_server(SERVER_PREFACE)
    block = blocks(authority)
    sent = (
        PREFACE
        + frame(HEADERS, FLAG_END_STREAM, 1, block[:3])
        + frame(CONTINUATION, 0, 1, block[3:10])
        + frame(CONTINUATION, 0, 1, b"")
        + frame(CONTINUATION, FLAG_END_HEADERS, 1, block[10:])
    )
    assert relay.from_client(sent) == (sent if passes else PREFACE)
    assert relay.to_visitor == SERVER_PREFACE + (b"" if passes else MISDIRECTED_1)


@MODES
@pytest.mark.parametrize("authority, passes", [(NAME, True), (OTHER, False)])
def test_padding_and_priority(bytewise: bool, authority: str, passes: bool) -> None:
    relay = Relay(bytewise=bytewise)
    relay.from_server(SERVER_PREFACE)
    block = blocks(authority)
    pad = 7
    payload = bytes([pad]) + (3).to_bytes(4, "big") + bytes([15]) + block + b"\0" * pad
    flags = FLAG_END_HEADERS | FLAG_END_STREAM | FLAG_PADDED | FLAG_PRIORITY
    priority = frame(h2.PRIORITY, 0, 1, (0).to_bytes(4, "big") + b"\x10")
    sent = PREFACE + frame(HEADERS, flags, 1, payload) + priority
    assert relay.from_client(sent) == (sent if passes else PREFACE)
    if passes:
        assert sorted(requests_at_server(server(), sent)) == [1]


@MODES
def test_the_dynamic_table_stays_in_step_across_streams(bytewise: bool) -> None:
    """Refused blocks are decoded too; the server decodes what it gets to what was sent."""
    relay = Relay(bytewise=bytewise)
    c = client()
    wanted: dict[int, Headers] = {}
    plan = [
        (1, NAME, "sid=ours"),
        (3, OTHER, "sid=theirs"),  # indexes OTHER and its cookie: then dropped
        (5, NAME, "sid=theirs"),  # refers to the entry the refused block added
        (7, OTHER, "sid=ours"),
        (9, NAME, "sid=ours"),
        (11, NAME.upper(), "x=" + "y" * 3000),  # evicts entries
        (13, NAME, "sid=theirs"),
        (15, NAME, "big=" + "z" * 20000),  # re-encoded into HEADERS and CONTINUATION frames
    ]
    for stream, authority, cookie in plan:
        headers = request_headers(authority, ("cookie", cookie), ("user-agent", "test"))
        c.send_headers(stream, headers, end_stream=True)
        if authority != OTHER:
            wanted[stream] = headers
    srv = server()
    seen = requests_at_server(srv, relay.from_client(c.data_to_send()))
    assert {k: sorted(v) for k, v in seen.items()} == {k: sorted(v) for k, v in wanted.items()}
    assert relay.inspector.refused == {3, 7}
    assert relay.inspector.refusals == 2


@MODES
def test_without_a_change_to_the_table_a_refusal_keeps_bytes_as_they_came(bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    wrong = hpack.Encoder()
    right = hpack.Encoder()
    # Never-indexed fields change no table: the refusal leaves the tables in step.
    refused = wrong.encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in request_headers(OTHER)])
    passed = frame(
        HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 3, right.encode(request_headers(NAME))
    )
    sent = PREFACE + frame(HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 1, refused) + passed
    assert relay.from_client(sent) == PREFACE + passed


@MODES
def test_trailers_pass_and_a_refused_streams_trailers_do_not(bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    c = client()
    c.send_headers(1, request_headers(NAME))
    c.send_headers(3, request_headers(OTHER))
    c.send_headers(1, [(b"x-trailer", b"1")], end_stream=True)
    c.send_headers(3, [(b"x-trailer", b"2")], end_stream=True)
    srv = server()
    events = srv.receive_data(relay.from_client(c.data_to_send()))
    assert [type(e) for e in events if not isinstance(e, StreamEnded)][-2:] == [
        RequestReceived,
        TrailersReceived,
    ]
    assert all(getattr(e, "stream_id", 1) == 1 for e in events)


@MODES
def test_the_servers_table_size_is_the_clients_limit(bytewise: bool) -> None:
    srv = server(**{str(int(SettingCodes.HEADER_TABLE_SIZE)): 16384})
    c = client()
    c.receive_data(srv.data_to_send())  # the client may now use a 16 KiB table
    c.send_headers(1, request_headers(NAME, ("a", "b" * 6000), ("c", "d" * 6000)), end_stream=True)
    sent = c.data_to_send()
    relay = Relay(bytewise=bytewise)
    relay.from_server(bytes(_server_settings(16384)))
    assert relay.from_client(sent) == sent
    # Without the server's SETTINGS, the same client breaks the 4 KiB default.
    with pytest.raises(H2Error):
        Relay(bytewise=bytewise).from_client(sent)


def _server_settings(table_size: int) -> bytes:
    return frame(
        SETTINGS,
        0,
        0,
        h2.SETTINGS_HEADER_TABLE_SIZE.to_bytes(2, "big") + table_size.to_bytes(4, "big"),
    )


# -- what closes the connection ---------------------------------------------------------


def hostile(relay: Relay, data: bytes) -> None:
    with pytest.raises(H2Error):
        relay.from_client(data)


@MODES
@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        PREFACE[:10] + b"X",
        PREFACE + frame(HEADERS, FLAG_END_HEADERS, 0, blocks(NAME)),
        PREFACE + frame(HEADERS, FLAG_END_HEADERS, 2, blocks(NAME)),
        PREFACE + frame(CONTINUATION, FLAG_END_HEADERS, 1, b""),
        PREFACE + frame(HEADERS, 0, 1, blocks(NAME)[:2]) + frame(DATA, 0, 1, b""),
        PREFACE + frame(HEADERS, 0, 1, b"") + frame(CONTINUATION, FLAG_END_HEADERS, 3, b""),
        PREFACE + frame(HEADERS, 0, 1, b"") + frame(HEADERS, FLAG_END_HEADERS, 3, b""),
        PREFACE + frame(HEADERS, FLAG_END_HEADERS | FLAG_PADDED, 1, b"\x09abc"),
        PREFACE + frame(HEADERS, FLAG_END_HEADERS | FLAG_PADDED, 1, b""),
        PREFACE + frame(HEADERS, FLAG_END_HEADERS | FLAG_PRIORITY, 1, b"\0\0"),
        PREFACE + frame(HEADERS, FLAG_END_HEADERS, 1, b"\xff\xff\xff\xff"),  # bad index
        PREFACE + frame(DATA, 0, 0, b""),
        # a header block over the cap, in one frame: refused at its frame header
        PREFACE + (MAX_HEADER_BLOCK).to_bytes(3, "big") + bytes((HEADERS, 0)) + b"\0\0\0\1",
    ],
)
def test_broken_http2_is_an_error(bytewise: bool, data: bytes) -> None:
    hostile(Relay(bytewise=bytewise), data)


def test_a_continuation_flood_is_an_error() -> None:
    relay = Relay()
    relay.from_client(PREFACE + frame(HEADERS, 0, 1, b""))
    with pytest.raises(H2Error, match="header block over"):
        for _ in range(MAX_HEADER_BLOCK // 9 + 1):
            relay.from_client(frame(CONTINUATION, 0, 1, b""))
    assert relay.forwarded == PREFACE


@MODES
def test_a_header_list_too_large_once_decoded_is_an_error(bytewise: bool) -> None:
    """An HPACK bomb: one large entry in the table, then many references to it."""
    encoder = hpack.Encoder()
    first = encoder.encode([*request_headers(NAME), (b"x-bomb", b"b" * 4000)])
    again = encoder.encode([*[(b"x-bomb", b"b" * 4000)] * 100, *request_headers(NAME)])
    assert len(again) < 200
    relay = Relay(bytewise=bytewise)
    ok = PREFACE + frame(HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 1, first)
    assert relay.from_client(ok) == ok
    hostile(relay, frame(HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, 3, again))
    assert relay.forwarded == ok


@MODES
def test_a_header_block_naming_another_host_on_an_open_stream_is_an_error(bytewise: bool) -> None:
    relay = Relay(bytewise=bytewise)
    encoder = hpack.Encoder()
    sent = PREFACE + frame(HEADERS, FLAG_END_HEADERS, 1, encoder.encode(request_headers(NAME)))
    relay.from_client(sent)
    hostile(relay, frame(HEADERS, FLAG_END_HEADERS, 1, encoder.encode([(b"host", OTHER.encode())])))


def test_refusals_are_capped_per_connection() -> None:
    relay = Relay()
    c = client()
    relay.from_client(c.data_to_send())
    for n in range(MAX_REFUSED_STREAMS):
        c.send_headers(2 * n + 1, request_headers(OTHER), end_stream=True)
        relay.from_client(c.data_to_send())
    c.send_headers(2 * MAX_REFUSED_STREAMS + 1, request_headers(OTHER), end_stream=True)
    hostile(relay, c.data_to_send())


@pytest.mark.parametrize(
    "data",
    [
        frame(DATA, 0, 1, b""),  # the server's preface must be SETTINGS
        SERVER_PREFACE + frame(CONTINUATION, FLAG_END_HEADERS, 1, b""),
        SERVER_PREFACE + frame(HEADERS, 0, 1, b"") + frame(DATA, 0, 1, b""),
        SERVER_PREFACE + frame(SETTINGS, 0, 0, b"\0" * (h2.MAX_SETTINGS_SIZE + 6)),
    ],
)
def test_a_broken_server_is_an_error(data: bytes) -> None:
    with pytest.raises(H2Error):
        Relay().from_server(data)
    with pytest.raises(H2Error):
        Relay(bytewise=True).from_server(data)


def test_the_error_is_a_remote_protocol_error() -> None:
    assert issubclass(H2Error, RemoteProtocolError)


# -- fuzzing -----------------------------------------------------------------------------

FRAME_KINDS = st.sampled_from(
    [DATA, HEADERS, h2.PRIORITY, h2.RST_STREAM, SETTINGS, 6, 7, 8, 9, 0xA]
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(FRAME_KINDS)
    flags = draw(st.integers(0, 255))
    stream = draw(st.sampled_from([0, 1, 2, 3, 5, 2**31 - 1]))
    if kind == HEADERS and draw(st.booleans()):
        payload = blocks(draw(st.sampled_from([NAME, OTHER])))
    else:
        payload = draw(st.binary(max_size=64))
    return frame(kind, flags, stream, payload)


def chunks(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(frames(), max_size=12),
    st.binary(max_size=40),
    st.lists(st.integers(0, 10_000), max_size=6),
    st.booleans(),
)
def test_fuzz_client_frames(
    sequence: list[bytes], tail: bytes, cuts: list[int], preface: bool
) -> None:
    data = (PREFACE if preface else b"") + b"".join(sequence) + tail
    inspector = Inspector(NAME, frozenset({PORT}))
    inspector.to_visitor(SERVER_PREFACE)
    try:
        for piece in chunks(data, cuts):
            inspector.from_visitor(piece)
            inspector.replies()
    except H2Error:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 10_000), max_size=6))
def test_fuzz_raw_bytes_both_ways(data: bytes, cuts: list[int]) -> None:
    for direction in ("from_visitor", "to_visitor"):
        inspector = Inspector(NAME, frozenset({PORT}))
        feed = getattr(inspector, direction)
        try:
            if direction == "from_visitor":
                feed(PREFACE)
            for piece in chunks(data, cuts):
                feed(piece)
        except H2Error:
            pass


@settings(max_examples=200, deadline=None)
@given(st.lists(frames(), max_size=12), st.lists(st.integers(0, 10_000), max_size=6))
def test_fuzz_server_frames(sequence: list[bytes], cuts: list[int]) -> None:
    inspector = Inspector(NAME, frozenset({PORT}))
    inspector.from_visitor(PREFACE)
    try:
        for piece in chunks(SERVER_PREFACE + b"".join(sequence), cuts):
            inspector.to_visitor(piece)
    except H2Error:
        pass
