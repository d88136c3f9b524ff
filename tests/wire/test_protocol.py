"""The wire protocol as docs/protocol.md writes it: exact bytes, whole conversations, state rules.

Every byte stream is fed whole, one byte at a time and (with Hypothesis) in
random chunks, and must give the same messages. Whatever garbage arrives, a
Connection yields messages or NEED_DATA, or raises RemoteProtocolError.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from burrow.exception import LocalProtocolError, RemoteProtocolError
from burrow.wire.protocol import (
    MAX_FLEET_SIZE,
    MAX_FRAME_SIZE,
    NEED_DATA,
    PROTOCOL_VERSION,
    Attach,
    Bind,
    Close,
    Closed,
    Connection,
    Dial,
    Error,
    Heartbeat,
    HeartbeatTimeout,
    Hello,
    Kind,
    Message,
    Open,
    Opened,
    Ping,
    Pong,
    Role,
    State,
    Welcome,
    decode_payload,
    encode,
)

AGENT, RELAY = Role.AGENT, Role.RELAY
CONTROL, DATA = Kind.CONTROL, Kind.DATA

Chunker = Callable[[bytes], list[bytes]]


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


CHUNKERS = [pytest.param(whole, id="whole"), pytest.param(bytewise, id="bytewise")]


def cut(data: bytes, points: Iterable[int]) -> list[bytes]:
    """``data`` split at ``points`` (any order, repeats allowed: empty chunks are fed too)."""
    bounds = [0, *sorted(p % (len(data) + 1) for p in points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feed(conn: Connection, chunks: Iterable[bytes]) -> list[Message]:
    """Feed ``chunks`` as an I/O layer would, draining messages after each; stop once spliced.

    Raises whatever the connection raises.
    """
    events: list[Message] = []
    for chunk in chunks:
        if conn.state is State.SPLICED:
            break
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


def feed_checked(conn: Connection, chunks: Iterable[bytes]) -> tuple[list[Message], bool]:
    """Like :func:`feed`, but the fuzz invariant: only RemoteProtocolError may escape.

    Returns the messages before the error and whether there was one.
    """
    events: list[Message] = []
    try:
        for chunk in chunks:
            if conn.state is State.SPLICED:
                break
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                assert type(event) in MESSAGE_TYPES, event
                events.append(event)
    except RemoteProtocolError:
        return events, True
    return events, False


# One sample of every message, its exact frame as docs/protocol.md writes it.
EXACT_FRAMES: list[tuple[Message, bytes]] = [
    (
        Hello(version=1, token="t", agent="a"),
        b'\x00\x00\x004{"type":"hello","version":1,"token":"t","agent":"a"}',
    ),
    (
        Welcome(session="s1", key="k1", domain="r1.example.com", heartbeat=20, pool=4),
        b'\x00\x00\x00^{"type":"welcome","session":"s1","key":"k1",'
        b'"domain":"r1.example.com","heartbeat":20,"pool":4}',
    ),
    (
        Open(id=1, local_port=8000, tcp=False, h2=True),
        b'\x00\x00\x00>{"type":"open","id":1,"local_port":8000,"tcp":false,"h2":true}',
    ),
    (
        Opened(id=1, host="abcdefghij0123.r1.example.com", port=443),
        b'\x00\x00\x00J{"type":"opened","id":1,"host":"abcdefghij0123.r1.example.com","port":443}',
    ),
    (
        Opened(
            id=2,
            host="abcdefghij0123.r1.example.com",
            port=443,
            tcp_host="r1.example.com",
            tcp_port=20001,
        ),
        b'\x00\x00\x00w{"type":"opened","id":2,"host":"abcdefghij0123.r1.example.com",'
        b'"port":443,"tcp_host":"r1.example.com","tcp_port":20001}',
    ),
    (Close(id=1), b'\x00\x00\x00\x17{"type":"close","id":1}'),
    (Closed(id=1), b'\x00\x00\x00\x18{"type":"closed","id":1}'),
    (Dial(count=2), b'\x00\x00\x00\x19{"type":"dial","count":2}'),
    (
        Error(code="auth", message="token expired"),
        b'\x00\x00\x008{"type":"error","code":"auth","message":"token expired"}',
    ),
    (
        # The spec's member order for error is id, code, message.
        Error(id=3, code="bad-request", message="duplicate id"),
        b'\x00\x00\x00E{"type":"error","id":3,"code":"bad-request","message":"duplicate id"}',
    ),
    (Ping(seq=1), b'\x00\x00\x00\x17{"type":"ping","seq":1}'),
    (Pong(seq=1), b'\x00\x00\x00\x17{"type":"pong","seq":1}'),
    (
        Attach(session="s1", key="k1"),
        b'\x00\x00\x00+{"type":"attach","session":"s1","key":"k1"}',
    ),
    (
        Bind(id=1, visitor="203.0.113.7:51234"),
        b'\x00\x00\x004{"type":"bind","id":1,"visitor":"203.0.113.7:51234"}',
    ),
]
EXACT_IDS = [
    f"{m.TYPE}{'-' + str(getattr(m, 'id', None)) if getattr(m, 'id', None) else ''}"
    for m, _ in EXACT_FRAMES
]

MESSAGE_TYPES: tuple[type[Message], ...] = (
    Hello,
    Welcome,
    Open,
    Opened,
    Close,
    Closed,
    Dial,
    Error,
    Ping,
    Pong,
    Attach,
    Bind,
)

# A sample of each type, for the state rules.
SAMPLES: dict[type[Message], Message] = {
    Hello: Hello(version=PROTOCOL_VERSION, token="tok", agent="burrow/0.1"),
    Welcome: Welcome(session="s1", key="k1", domain="r1.example.com", heartbeat=20, pool=4),
    Open: Open(id=1, local_port=8000, tcp=False, h2=False),
    Opened: Opened(id=1, host="abcdefghij0123.r1.example.com", port=443),
    Close: Close(id=1),
    Closed: Closed(id=1),
    Dial: Dial(count=1),
    Error: Error(code="protocol", message="no"),
    Ping: Ping(seq=1),
    Pong: Pong(seq=1),
    Attach: Attach(session="s1", key="k1"),
    Bind: Bind(id=1, visitor="203.0.113.7:51234"),
}


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


# --------------------------------------------------------------------------
# Exact bytes


@pytest.mark.parametrize(("message", "wire"), EXACT_FRAMES, ids=EXACT_IDS)
def test_encode_gives_the_documented_bytes(message: Message, wire: bytes) -> None:
    assert encode(message) == wire


@pytest.mark.parametrize(("message", "wire"), EXACT_FRAMES, ids=EXACT_IDS)
def test_decode_reads_the_documented_bytes(message: Message, wire: bytes) -> None:
    assert int.from_bytes(wire[:4], "big") == len(wire) - 4
    assert decode_payload(wire[4:]) == message
    assert decode_payload(encode(message)[4:]) == message


def test_optional_members_are_left_out_when_none() -> None:
    assert b"tcp_host" not in encode(Opened(id=1, host="h", port=443))
    assert b"tcp_port" not in encode(Opened(id=1, host="h", port=443))
    assert b'"id"' not in encode(Error(code="auth", message="m"))
    assert decode_payload(b'{"type":"error","code":"auth","message":"m"}') == Error(
        code="auth", message="m", id=None
    )


def test_hello_frame_from_a_connection() -> None:
    agent = Connection(CONTROL, AGENT)
    assert agent.send(Hello(version=1, token="t", agent="a")) == (
        b'\x00\x00\x004{"type":"hello","version":1,"token":"t","agent":"a"}'
    )
    assert agent.state is State.WELCOME


def test_non_ascii_strings_round_trip() -> None:
    message = Bind(id=7, visitor="[2001:db8::1]:443 ☃ \U0001f600")
    assert decode_payload(encode(message)[4:]) == message


def test_a_frame_of_exactly_max_frame_size_is_accepted() -> None:
    head = b'{"type":"ping","seq":9,"pad":"'
    payload = head + b"x" * (MAX_FRAME_SIZE - len(head) - 2) + b'"}'
    assert len(payload) == MAX_FRAME_SIZE
    agent, _ = ready_control()
    assert feed(agent, [frame(payload)]) == [Ping(seq=9)]


def test_encoding_a_frame_larger_than_max_frame_size_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode(Hello(version=1, token="t" * MAX_FRAME_SIZE, agent="a"))


def test_a_send_that_fails_to_encode_leaves_the_state_alone() -> None:
    # Nothing went on the wire, so the connection must not act as if a hello did.
    agent = Connection(CONTROL, AGENT)
    with pytest.raises(LocalProtocolError):
        agent.send(Hello(version=1, token="t" * MAX_FRAME_SIZE, agent="a"))
    assert agent.state is State.HELLO
    agent.send(Hello(version=1, token="t", agent="a"))
    assert agent.state is State.WELCOME


# Round trip of arbitrary messages.

ints = st.integers(min_value=-(2**63), max_value=2**63)
texts = st.text(max_size=30)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, version=ints, token=texts, agent=texts),
    st.builds(Welcome, session=texts, key=texts, domain=texts, heartbeat=ints, pool=ints),
    st.builds(Open, id=ints, local_port=ints, tcp=st.booleans(), h2=st.booleans()),
    st.builds(
        Opened,
        id=ints,
        host=texts,
        port=ints,
        tcp_host=st.none() | texts,
        tcp_port=st.none() | ints,
    ),
    st.builds(Close, id=ints),
    st.builds(Closed, id=ints),
    st.builds(Dial, count=ints),
    st.builds(Error, code=texts, message=texts, id=st.none() | ints),
    st.builds(Ping, seq=ints),
    st.builds(Pong, seq=ints),
    st.builds(Attach, session=texts, key=texts),
    st.builds(Bind, id=ints, visitor=texts),
)


DOC_ORDER = {
    "hello": ["version", "token", "agent"],
    "welcome": ["session", "key", "domain", "heartbeat", "pool"],
    "open": ["id", "local_port", "tcp", "h2"],
    "opened": ["id", "host", "port", "tcp_host", "tcp_port"],
    "close": ["id"],
    "closed": ["id"],
    "dial": ["count"],
    "error": ["id", "code", "message"],
    "ping": ["seq"],
    "pong": ["seq"],
    "attach": ["session", "key"],
    "bind": ["id", "visitor"],
}


@settings(max_examples=200, deadline=None)
@given(messages)
def test_every_message_round_trips(message: Message) -> None:
    wire = encode(message)
    assert int.from_bytes(wire[:4], "big") == len(wire) - 4
    obj = json.loads(wire[4:])
    # Members in the order docs/protocol.md gives, optional ones only when set.
    assert list(obj) == ["type", *(m for m in DOC_ORDER[message.TYPE] if m in obj)]
    assert None not in obj.values()
    assert wire[4:] == json.dumps(obj, separators=(",", ":")).encode()
    assert decode_payload(wire[4:]) == message


# --------------------------------------------------------------------------
# Conversations: an agent-side and a relay-side Connection, in memory


def converse(
    steps: Sequence[tuple[Role, Message]],
    chunker: Chunker,
    agent: Connection,
    relay: Connection,
) -> None:
    """Each step: the sender sends, the other side is fed those bytes and yields exactly that."""
    for sender, message in steps:
        src, dst = (agent, relay) if sender is AGENT else (relay, agent)
        wire = src.send(message)
        assert wire == encode(message)
        assert feed(dst, chunker(wire)) == [message]
        assert src.state is dst.state


def ready_control() -> tuple[Connection, Connection]:
    agent, relay = Connection(CONTROL, AGENT), Connection(CONTROL, RELAY)
    converse(HANDSHAKE, whole, agent, relay)
    assert agent.state is relay.state is State.READY
    return agent, relay


HANDSHAKE: list[tuple[Role, Message]] = [
    (AGENT, Hello(version=PROTOCOL_VERSION, token="tok", agent="burrow/0.1")),
    (RELAY, Welcome(session="s1", key="k1", domain="r1.example.com", heartbeat=20, pool=4)),
]

CONTROL_SESSION: list[tuple[Role, Message]] = [
    *HANDSHAKE,
    (AGENT, Open(id=1, local_port=8000, tcp=False, h2=True)),
    (RELAY, Opened(id=1, host="abcdefghij0123.r1.example.com", port=443)),
    (RELAY, Dial(count=4)),
    (AGENT, Open(id=2, local_port=5432, tcp=True, h2=False)),
    (
        RELAY,
        Opened(
            id=2,
            host="0123456789abcd.r1.example.com",
            port=443,
            tcp_host="r1.example.com",
            tcp_port=20001,
        ),
    ),
    (AGENT, Open(id=2, local_port=5433, tcp=False, h2=False)),
    (RELAY, Error(id=2, code="bad-request", message="duplicate id")),
    (AGENT, Ping(seq=1)),
    (RELAY, Pong(seq=1)),
    (RELAY, Ping(seq=1)),
    (AGENT, Pong(seq=1)),
    (AGENT, Close(id=1)),
    (RELAY, Closed(id=1)),
    (RELAY, Dial(count=1)),
    (AGENT, Close(id=2)),
    (RELAY, Closed(id=2)),
]


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_control_session(chunker: Chunker) -> None:
    agent, relay = Connection(CONTROL, AGENT), Connection(CONTROL, RELAY)
    assert agent.state is relay.state is State.HELLO
    converse(CONTROL_SESSION, chunker, agent, relay)
    # An error that answers one open leaves the session going.
    assert agent.state is relay.state is State.READY


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_control_session_in_random_chunks(data: st.DataObject) -> None:
    def chunker(wire: bytes) -> list[bytes]:
        return cut(wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))

    converse(CONTROL_SESSION, chunker, Connection(CONTROL, AGENT), Connection(CONTROL, RELAY))


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_frames_written_back_to_back_come_out_in_order(chunker: Chunker) -> None:
    agent, relay = ready_control()
    sent: list[Message] = [
        Open(id=1, local_port=1, tcp=False, h2=False),
        Ping(seq=5),
        Close(id=1),
        Pong(seq=2),
    ]
    wire = b"".join(agent.send(m) for m in sent)
    assert feed(relay, chunker(wire)) == sent


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=10))
def test_back_to_back_frames_in_random_chunks(points: list[int]) -> None:
    agent, relay = ready_control()
    sent: list[Message] = [
        Opened(id=1, host="h", port=443),
        Dial(count=3),
        Ping(seq=1),
        Closed(id=1),
    ]
    wire = b"".join(relay.send(m) for m in sent)
    assert feed(agent, cut(wire, points)) == sent


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_welcome_refused_with_an_error_closes(chunker: Chunker) -> None:
    agent, relay = Connection(CONTROL, AGENT), Connection(CONTROL, RELAY)
    converse(
        [
            (AGENT, Hello(version=2, token="tok", agent="burrow/9")),
            (RELAY, Error(code="version", message="this relay speaks version 1")),
        ],
        chunker,
        agent,
        relay,
    )
    assert agent.state is relay.state is State.CLOSED


def test_relay_may_refuse_a_peer_before_any_hello() -> None:
    agent, relay = Connection(CONTROL, AGENT), Connection(CONTROL, RELAY)
    wire = relay.send(Error(code="protocol", message="expected hello"))
    assert relay.state is State.CLOSED
    assert feed(agent, [wire]) == [Error(code="protocol", message="expected hello")]
    assert agent.state is State.CLOSED


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_error_with_an_id_keeps_the_session_ready(chunker: Chunker) -> None:
    agent, relay = ready_control()
    converse(
        [
            (AGENT, Open(id=9, local_port=22, tcp=True, h2=False)),
            (RELAY, Error(id=9, code="tcp-exhausted", message="no free port")),
            (AGENT, Close(id=4)),
            (RELAY, Error(id=4, code="bad-request", message="unknown id")),
            (AGENT, Ping(seq=3)),
        ],
        chunker,
        agent,
        relay,
    )
    assert agent.state is relay.state is State.READY


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_error_without_an_id_ends_the_session(chunker: Chunker) -> None:
    # docs/protocol.md: "An error without an id ends the session; the relay
    # closes the connection after it." Nothing more may be sent either way.
    agent, relay = ready_control()
    wire = relay.send(Error(code="shutting-down", message="relay is stopping"))
    assert feed(agent, chunker(wire)) == [Error(code="shutting-down", message="relay is stopping")]
    assert relay.state is State.CLOSED
    assert agent.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        relay.send(Dial(count=1))
    with pytest.raises(LocalProtocolError):
        agent.send(Open(id=1, local_port=1, tcp=False, h2=False))


# Data connections.

VISITOR_BYTES = b"GET / HTTP/1.1\r\nHost: abcdefghij0123.r1.example.com\r\n\r\n\x00\x00\x00\x00\xff"


def pooled_data() -> tuple[Connection, Connection]:
    agent, relay = Connection(DATA, AGENT), Connection(DATA, RELAY)
    assert agent.state is relay.state is State.ATTACH
    converse([(AGENT, Attach(session="s1", key="k1"))], whole, agent, relay)
    assert agent.state is relay.state is State.POOLED
    return agent, relay


def splice_with(chunks: list[bytes], agent: Connection) -> bytes:
    """Feed a bind and visitor bytes as an I/O layer would; return the raw bytes it ends with."""
    raw = bytearray()
    for i, chunk in enumerate(chunks):
        if agent.state is State.SPLICED:
            raw += b"".join(chunks[i:])
            break
        agent.receive_data(chunk)
        while (event := agent.next_event()) is not NEED_DATA:
            assert event == Bind(id=1, visitor="203.0.113.7:51234")
            assert agent.state is State.SPLICED
            first = agent.take_trailing_data()
            assert agent.trailing_data == b""
            raw += first
    return bytes(raw)


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_data_connection(chunker: Chunker) -> None:
    agent, relay = Connection(DATA, AGENT), Connection(DATA, RELAY)
    wire = agent.send(Attach(session="s1", key="k1"))
    assert wire == b'\x00\x00\x00+{"type":"attach","session":"s1","key":"k1"}'
    assert feed(relay, chunker(wire)) == [Attach(session="s1", key="k1")]
    assert agent.state is relay.state is State.POOLED

    bind = relay.send(Bind(id=1, visitor="203.0.113.7:51234"))
    assert relay.state is State.SPLICED
    # The visitor's first bytes follow the bind in the same write.
    raw = splice_with(chunker(bind + VISITOR_BYTES), agent)
    assert agent.state is State.SPLICED
    assert raw == VISITOR_BYTES


def test_bytes_behind_bind_in_one_read_are_trailing_data() -> None:
    agent, relay = pooled_data()
    agent.receive_data(relay.send(Bind(id=1, visitor="203.0.113.7:51234")) + VISITOR_BYTES)
    assert agent.next_event() == Bind(id=1, visitor="203.0.113.7:51234")
    assert agent.state is State.SPLICED
    assert agent.next_event() is NEED_DATA
    assert agent.trailing_data == VISITOR_BYTES
    assert agent.trailing_data == VISITOR_BYTES  # looking does not take
    assert agent.take_trailing_data() == VISITOR_BYTES
    assert agent.trailing_data == b""
    assert agent.take_trailing_data() == b""


def test_bind_alone_leaves_no_trailing_data() -> None:
    agent, relay = pooled_data()
    assert feed(agent, [relay.send(Bind(id=3, visitor="v"))]) == [Bind(id=3, visitor="v")]
    assert agent.take_trailing_data() == b""


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 200), max_size=8), st.binary(max_size=40))
def test_data_connection_in_random_chunks(points: list[int], visitor: bytes) -> None:
    agent, relay = pooled_data()
    bind = relay.send(Bind(id=1, visitor="203.0.113.7:51234"))
    assert splice_with(cut(bind + visitor, points), agent) == visitor


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_bad_attach_is_refused(chunker: Chunker) -> None:
    agent, relay = Connection(DATA, AGENT), Connection(DATA, RELAY)
    converse(
        [
            (AGENT, Attach(session="s1", key="wrong")),
            (RELAY, Error(code="bad-attach", message="wrong key")),
        ],
        chunker,
        agent,
        relay,
    )
    assert agent.state is relay.state is State.CLOSED


def test_relay_may_close_a_pooled_connection_with_an_error() -> None:
    agent, relay = pooled_data()
    converse([(RELAY, Error(code="shutting-down", message="bye"))], whole, agent, relay)
    assert agent.state is relay.state is State.CLOSED


def test_nothing_is_framed_after_spliced() -> None:
    agent, relay = pooled_data()
    converse([(RELAY, Bind(id=1, visitor="v"))], whole, agent, relay)
    assert agent.state is relay.state is State.SPLICED
    for conn in (agent, relay):
        for message in SAMPLES.values():
            with pytest.raises(LocalProtocolError):
                conn.send(message)
        # The I/O layer must move raw bytes itself from here on.
        with pytest.raises(LocalProtocolError):
            conn.receive_data(b"\x00\x00\x00\x17")
        assert conn.next_event() is NEED_DATA
        assert conn.state is State.SPLICED


# --------------------------------------------------------------------------
# State rules: every (kind, state, sender, message type), from docs/protocol.md

# (kind, state, sender) -> {message type: next state}; anything else is refused.
ALLOWED: dict[tuple[Kind, State, Role], dict[type[Message], State]] = {
    (CONTROL, State.HELLO, AGENT): {Hello: State.WELCOME},
    (CONTROL, State.HELLO, RELAY): {Error: State.CLOSED},
    (CONTROL, State.WELCOME, AGENT): {},
    (CONTROL, State.WELCOME, RELAY): {Welcome: State.READY, Error: State.CLOSED},
    (CONTROL, State.READY, AGENT): {m: State.READY for m in (Open, Close, Ping, Pong)},
    # The error sample in READY carries an id (see test_error_without_an_id_ends_the_session).
    (CONTROL, State.READY, RELAY): {
        m: State.READY for m in (Opened, Closed, Dial, Error, Ping, Pong)
    },
    (CONTROL, State.CLOSED, AGENT): {},
    (CONTROL, State.CLOSED, RELAY): {},
    (DATA, State.ATTACH, AGENT): {Attach: State.POOLED},
    (DATA, State.ATTACH, RELAY): {Error: State.CLOSED},
    (DATA, State.POOLED, AGENT): {},
    (DATA, State.POOLED, RELAY): {Bind: State.SPLICED, Error: State.CLOSED},
    (DATA, State.SPLICED, AGENT): {},
    (DATA, State.SPLICED, RELAY): {},
    (DATA, State.CLOSED, AGENT): {},
    (DATA, State.CLOSED, RELAY): {},
}

# How to bring each end to each state through the public API: (sender, message) steps.
PATHS: dict[tuple[Kind, State], list[tuple[Role, Message]]] = {
    (CONTROL, State.HELLO): [],
    (CONTROL, State.WELCOME): HANDSHAKE[:1],
    (CONTROL, State.READY): HANDSHAKE,
    (CONTROL, State.CLOSED): [HANDSHAKE[0], (RELAY, Error(code="auth", message="revoked"))],
    (DATA, State.ATTACH): [],
    (DATA, State.POOLED): [(AGENT, Attach(session="s1", key="k1"))],
    (DATA, State.SPLICED): [
        (AGENT, Attach(session="s1", key="k1")),
        (RELAY, Bind(id=1, visitor="v")),
    ],
    (DATA, State.CLOSED): [
        (AGENT, Attach(session="s1", key="k")),
        (RELAY, Error(code="bad-attach", message="wrong key")),
    ],
}


def at(kind: Kind, state: State, role: Role) -> Connection:
    """A ``role`` end of a ``kind`` connection brought to ``state`` by sending and receiving."""
    conn = Connection(kind, role)
    for sender, message in PATHS[kind, state]:
        if sender is role:
            conn.send(message)
        else:
            assert feed(conn, [encode(message)]) == [message]
    assert conn.state is state
    return conn


def sample(kind: Kind, state: State, message_type: type[Message]) -> Message:
    if message_type is Error and kind is CONTROL and state is State.READY:
        return Error(id=1, code="bad-request", message="unknown id")
    return SAMPLES[message_type]


STATE_CASES = [
    pytest.param(kind, state, sender, m, id=f"{kind.value}-{state.value}-{sender.value}-{m.TYPE}")
    for (kind, state, sender) in ALLOWED
    for m in MESSAGE_TYPES
]


@pytest.mark.parametrize(("kind", "state", "sender", "message_type"), STATE_CASES)
def test_sending(kind: Kind, state: State, sender: Role, message_type: type[Message]) -> None:
    conn = at(kind, state, sender)
    message = sample(kind, state, message_type)
    allowed = ALLOWED[kind, state, sender]
    if message_type in allowed:
        assert conn.send(message) == encode(message)
        assert conn.state is allowed[message_type]
    else:
        with pytest.raises(LocalProtocolError):
            conn.send(message)
        assert conn.state is state


@pytest.mark.parametrize(("kind", "state", "sender", "message_type"), STATE_CASES)
@pytest.mark.parametrize("chunker", CHUNKERS)
def test_receiving(
    chunker: Chunker, kind: Kind, state: State, sender: Role, message_type: type[Message]
) -> None:
    receiver = RELAY if sender is AGENT else AGENT
    conn = at(kind, state, receiver)
    message = sample(kind, state, message_type)
    allowed = ALLOWED[kind, state, sender]
    if state is State.SPLICED:
        with pytest.raises(LocalProtocolError):
            conn.receive_data(encode(message))
    elif message_type in allowed:
        assert feed(conn, chunker(encode(message))) == [message]
        assert conn.state is allowed[message_type]
    else:
        with pytest.raises(RemoteProtocolError):
            feed(conn, chunker(encode(message)))
        assert conn.state is state


def test_examples_of_the_rules() -> None:
    # open before welcome
    agent = at(CONTROL, State.WELCOME, AGENT)
    with pytest.raises(LocalProtocolError):
        agent.send(Open(id=1, local_port=1, tcp=False, h2=False))
    relay = at(CONTROL, State.WELCOME, RELAY)
    with pytest.raises(RemoteProtocolError):
        feed(relay, [encode(Open(id=1, local_port=1, tcp=False, h2=False))])
    # the relay sending hello
    with pytest.raises(LocalProtocolError):
        Connection(CONTROL, RELAY).send(Hello(version=1, token="t", agent="a"))
    with pytest.raises(RemoteProtocolError):
        feed(Connection(CONTROL, AGENT), [encode(Hello(version=1, token="t", agent="a"))])
    # bind on a control connection
    with pytest.raises(LocalProtocolError):
        at(CONTROL, State.READY, RELAY).send(Bind(id=1, visitor="v"))
    with pytest.raises(RemoteProtocolError):
        feed(at(CONTROL, State.READY, AGENT), [encode(Bind(id=1, visitor="v"))])
    # a second hello
    with pytest.raises(LocalProtocolError):
        at(CONTROL, State.READY, AGENT).send(Hello(version=1, token="t", agent="a"))


# --------------------------------------------------------------------------
# Bad input


def fresh_ready_relay() -> Connection:
    return at(CONTROL, State.READY, RELAY)


@pytest.mark.parametrize("chunker", CHUNKERS)
@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"\x00\x00\x00\x00", id="zero"),
        pytest.param((MAX_FRAME_SIZE + 1).to_bytes(4, "big"), id="max+1"),
        pytest.param(b"\xff\xff\xff\xff", id="4GiB"),
        pytest.param(b"GET ", id="http"),
        pytest.param(b"\x16\x03\x01\x02", id="tls"),
    ],
)
def test_a_bad_length_is_refused_from_the_header_alone(chunker: Chunker, header: bytes) -> None:
    relay = fresh_ready_relay()
    chunks = chunker(header)
    for chunk in chunks[:-1]:
        relay.receive_data(chunk)
        assert relay.next_event() is NEED_DATA
    # The fourth byte is enough: no payload is waited for.
    with pytest.raises(RemoteProtocolError):
        relay.receive_data(chunks[-1])


def test_a_bad_length_behind_a_good_frame_is_refused_after_it() -> None:
    relay = fresh_ready_relay()
    relay.receive_data(encode(Ping(seq=1)) + b"\x00\x00\x00\x00")
    assert relay.next_event() == Ping(seq=1)
    with pytest.raises(RemoteProtocolError):
        relay.next_event()


@pytest.mark.parametrize(("message", "wire"), EXACT_FRAMES, ids=EXACT_IDS)
def test_truncated_frames_need_data(message: Message, wire: bytes) -> None:
    for n in range(len(wire)):
        conn = Connection(CONTROL, RELAY)
        conn.receive_data(wire[:n])
        assert conn.next_event() is NEED_DATA
        assert conn.next_event() is NEED_DATA
        assert conn.state is State.HELLO


def test_a_truncated_frame_completes_later() -> None:
    relay = fresh_ready_relay()
    wire = encode(Open(id=1, local_port=80, tcp=False, h2=False))
    relay.receive_data(wire[:10])
    assert relay.next_event() is NEED_DATA
    relay.receive_data(wire[10:])
    assert relay.next_event() == Open(id=1, local_port=80, tcp=False, h2=False)
    assert relay.next_event() is NEED_DATA


BAD_PAYLOADS = [
    pytest.param(b'{"type":"ping","seq":1,"x":"\xff"}', id="utf8-ff"),
    pytest.param(b'{"type":"ping","seq":1,"x":"\xc0\xaf"}', id="utf8-overlong"),
    pytest.param(b'{"type":"ping","seq":1,"x":"\xed\xa0\x80"}', id="utf8-surrogate"),
    pytest.param(b'{"type":"ping","seq":1,"x":"\xe2\x98"}', id="utf8-truncated"),
    pytest.param(b'\xef\xbb\xbf{"type":"ping","seq":1}', id="utf8-bom"),
    pytest.param(b'{"type":"ping","seq":1', id="json-unclosed"),
    pytest.param(b'{"type":"ping","seq":1,}', id="json-trailing-comma"),
    pytest.param(b'{"type":"ping","seq":1}x', id="json-trailing-garbage"),
    pytest.param(b'{"type":"ping","seq":1}{"type":"ping","seq":2}', id="json-two-objects"),
    pytest.param(b"{'type':'ping','seq':1}", id="json-single-quotes"),
    pytest.param(b"\x00", id="json-nul"),
    pytest.param(b" ", id="json-blank"),
    pytest.param(b"[]", id="not-object-array"),
    pytest.param(b'[{"type":"ping","seq":1}]', id="not-object-wrapped"),
    pytest.param(b'"ping"', id="not-object-string"),
    pytest.param(b"1", id="not-object-number"),
    pytest.param(b"null", id="not-object-null"),
    pytest.param(b"true", id="not-object-true"),
    pytest.param(b"NaN", id="not-object-nan"),
    pytest.param(b"{}", id="type-missing"),
    pytest.param(b'{"seq":1}', id="type-missing-2"),
    pytest.param(b'{"type":null,"seq":1}', id="type-null"),
    pytest.param(b'{"type":1,"seq":1}', id="type-int"),
    pytest.param(b'{"type":["ping"],"seq":1}', id="type-list"),
    pytest.param(b'{"type":"hullo","seq":1}', id="type-unknown"),
    pytest.param(b'{"type":"Ping","seq":1}', id="type-wrong-case"),
    pytest.param(b'{"type":"","seq":1}', id="type-empty"),
    pytest.param(b'{"type":"__init__","seq":1}', id="type-dunder"),
    pytest.param(b'{"type":"ping","seq":' + b"9" * 5000 + b"}", id="int-too-many-digits"),
    pytest.param(b"[" * (MAX_FRAME_SIZE - 4), id="deep-array"),
    pytest.param(b'{"a":' * (MAX_FRAME_SIZE // 5 - 1), id="deep-object"),
    pytest.param(
        b'{"type":"ping","seq":1,"x":' + b"[" * 60000 + b"]" * 60 + b"}", id="deep-member"
    ),
]


@pytest.mark.parametrize("payload", BAD_PAYLOADS)
@pytest.mark.parametrize("chunker", CHUNKERS)
def test_bad_payloads_are_remote_errors(chunker: Chunker, payload: bytes) -> None:
    assert len(payload) <= MAX_FRAME_SIZE
    with pytest.raises(RemoteProtocolError):
        decode_payload(payload)
    relay = fresh_ready_relay()
    with pytest.raises(RemoteProtocolError):
        feed(relay, chunker(frame(payload)))
    assert relay.state is State.READY


def test_deep_nesting_is_a_remote_error_not_a_recursion_error() -> None:
    for payload in (b"[" * 100_000, b'{"a":' * 100_000, b"[" * 100_000 + b"]" * 100_000):
        with pytest.raises(RemoteProtocolError):
            decode_payload(payload)


# Each member of each message: leaving it out, and wrong types in it.

WRONG_VALUES: dict[type, list[Any]] = {
    int: ["1", True, False, 1.0, 1.5, None, [1], {"v": 1}],
    str: [1, True, 1.5, None, ["s"], {"s": "s"}],
    bool: [1, 0, "true", None, [True]],
}

MEMBER_CASES = []
for _message, _wire in EXACT_FRAMES:
    _obj = json.loads(_wire[4:])
    for _name, _value in list(_obj.items())[1:]:
        _required = _name not in ("tcp_host", "tcp_port") and not (
            _message.TYPE == "error" and _name == "id"
        )
        for _bad in WRONG_VALUES[type(_value)]:
            if _bad is None and not _required:
                continue  # null stands for an absent optional member
            MEMBER_CASES.append(
                pytest.param(
                    {**_obj, _name: _bad}, id=f"{_message.TYPE}.{_name}={json.dumps(_bad)}"
                )
            )
        if _required:
            MEMBER_CASES.append(
                pytest.param(
                    {k: v for k, v in _obj.items() if k != _name},
                    id=f"{_message.TYPE}-without-{_name}",
                )
            )


@pytest.mark.parametrize("obj", MEMBER_CASES)
def test_members_are_checked(obj: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_payload(json.dumps(obj).encode())


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_true_is_not_an_int(chunker: Chunker) -> None:
    relay = fresh_ready_relay()
    with pytest.raises(RemoteProtocolError):
        feed(relay, chunker(frame(b'{"type":"ping","seq":true}')))
    agent = at(CONTROL, State.HELLO, AGENT)
    agent.send(Hello(version=1, token="t", agent="a"))
    with pytest.raises(RemoteProtocolError):
        feed(
            agent,
            chunker(
                frame(
                    b'{"type":"welcome","session":"s","key":"k","domain":"d",'
                    b'"heartbeat":true,"pool":4}'
                )
            ),
        )
    assert agent.state is State.WELCOME


@pytest.mark.parametrize("chunker", CHUNKERS)
def test_unknown_members_are_ignored(chunker: Chunker) -> None:
    relay = fresh_ready_relay()
    payload = (
        b'{"future":{"a":[1,2,{"b":null}]},"type":"open","id":4,"local_port":80,'
        b'"tcp":false,"h2":false,"priority":"high","zzz":1.5}'
    )
    assert feed(relay, chunker(frame(payload))) == [Open(id=4, local_port=80, tcp=False, h2=False)]


def test_member_order_on_the_wire_does_not_matter_to_a_reader() -> None:
    payload = b'{"message":"m","code":"auth","id":2,"type":"error"}'
    assert decode_payload(payload) == Error(code="auth", message="m", id=2)


def test_a_bad_frame_does_not_change_the_state() -> None:
    agent = Connection(CONTROL, AGENT)
    agent.send(Hello(version=1, token="t", agent="a"))
    with pytest.raises(RemoteProtocolError):
        feed(agent, [frame(b'{"type":"welcome","session":"s"}')])
    assert agent.state is State.WELCOME


# --------------------------------------------------------------------------
# Fuzz: only messages, NEED_DATA or RemoteProtocolError, whatever arrives

ENDS = [(kind, role) for kind in (CONTROL, DATA) for role in (AGENT, RELAY)]
FUZZ_STATES = [
    (kind, state, role)
    for (kind, state) in PATHS
    if state not in (State.SPLICED,)
    for role in (AGENT, RELAY)
]

MEMBER_NAMES = sorted({name for _, w in EXACT_FRAMES for name in json.loads(w[4:])} - {"type"})
TYPE_NAMES = [m.TYPE for m in MESSAGE_TYPES]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
member_values = st.integers(-3, 70000) | st.booleans() | st.text(max_size=6) | json_values


@st.composite
def json_objects(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    if draw(st.integers(0, 9)) > 0:
        obj["type"] = draw(st.sampled_from(TYPE_NAMES) | json_values)
    obj.update(draw(st.dictionaries(st.sampled_from(MEMBER_NAMES), member_values, max_size=6)))
    obj.update(draw(st.dictionaries(st.text(max_size=4), json_values, max_size=2)))
    return obj


frames = st.one_of(
    json_objects().map(lambda o: frame(json.dumps(o, allow_nan=False).encode())),
    messages.map(encode),
    st.binary(min_size=1, max_size=40).map(frame),
)


def check_invariant(kind: Kind, state: State, role: Role, data: bytes, points: list[int]) -> None:
    results = [
        feed_checked(at(kind, state, role), chunks)
        for chunks in (whole(data), bytewise(data), cut(data, points))
    ]
    assert results[0] == results[1] == results[2]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(ENDS),
    st.binary(max_size=120),
    st.lists(st.integers(0, 120), max_size=5),
)
def test_fuzz_arbitrary_bytes(end: tuple[Kind, Role], data: bytes, points: list[int]) -> None:
    kind, role = end
    initial = State.HELLO if kind is CONTROL else State.ATTACH
    check_invariant(kind, initial, role, data, points)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(ENDS),
    st.binary(min_size=4, max_size=100),
    st.lists(st.integers(0, 104), max_size=5),
)
def test_fuzz_arbitrary_bytes_with_a_fitting_length(
    end: tuple[Kind, Role], body: bytes, points: list[int]
) -> None:
    kind, role = end
    initial = State.HELLO if kind is CONTROL else State.ATTACH
    # A length that fits (often exactly) gets the garbage past the header check.
    data = len(body).to_bytes(4, "big") + body
    check_invariant(kind, initial, role, data, points)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(FUZZ_STATES),
    st.lists(frames, min_size=1, max_size=4),
    st.binary(max_size=8),
    st.lists(st.integers(0, 400), max_size=5),
)
def test_fuzz_structurally_valid_frames(
    where: tuple[Kind, State, Role], framed: list[bytes], tail: bytes, points: list[int]
) -> None:
    kind, state, role = where
    check_invariant(kind, state, role, b"".join(framed) + tail, points)


# --------------------------------------------------------------------------
# Heartbeats: time is passed in


def test_heartbeat_pings_after_an_interval_of_not_sending() -> None:
    beat = Heartbeat(interval=20, now=1000.0)
    assert beat.timeout == 60
    assert beat.deadline() == 1020.0
    assert beat.poll(1000.0) is None
    assert beat.poll(1019.9) is None
    assert beat.poll(1020.0) == Ping(seq=1)
    # Polling again at once has nothing to say.
    assert beat.poll(1020.0) is None
    assert beat.deadline() == 1040.0
    beat.received(1030.0)
    assert beat.poll(1045.0) == Ping(seq=2)
    assert beat.deadline() == 1065.0


def test_heartbeat_sending_anything_else_defers_the_ping() -> None:
    beat = Heartbeat(interval=20, now=0.0)
    beat.sent(15.0)
    assert beat.deadline() == 35.0
    assert beat.poll(20.0) is None
    assert beat.poll(35.0) == Ping(seq=1)


def test_heartbeat_times_out_after_three_intervals_of_silence() -> None:
    beat = Heartbeat(interval=10, now=100.0)
    assert beat.poll(110.0) == Ping(seq=1)
    assert beat.poll(120.0) == Ping(seq=2)
    # The deadline is the earlier of the next ping and the timeout.
    beat.sent(125.0)
    assert beat.deadline() == 130.0
    assert beat.poll(129.9) is None
    with pytest.raises(HeartbeatTimeout) as caught:
        beat.poll(130.0)
    assert isinstance(caught.value, RemoteProtocolError)


def test_heartbeat_received_resets_the_timeout() -> None:
    beat = Heartbeat(interval=10, now=0.0)
    for t in range(10, 200, 10):
        beat.received(float(t) - 1)
        assert beat.poll(float(t)) is not None
    assert beat.deadline() == 200.0
    beat.received(195.0)
    beat.sent(195.0)
    assert beat.deadline() == 205.0
    with pytest.raises(HeartbeatTimeout):
        beat.poll(225.0)


def test_heartbeat_pings_count_up() -> None:
    beat = Heartbeat(interval=1, now=0.0)
    seqs = []
    for t in range(1, 6):
        beat.received(float(t))
        ping = beat.poll(float(t))
        assert isinstance(ping, Ping)
        seqs.append(ping.seq)
    assert seqs == [1, 2, 3, 4, 5]


def test_heartbeat_drives_a_ping_and_its_pong() -> None:
    agent, relay = ready_control()
    beat = Heartbeat(interval=20, now=0.0)
    ping = beat.poll(20.0)
    assert ping is not None
    wire = agent.send(ping)
    assert wire == b'\x00\x00\x00\x17{"type":"ping","seq":1}'
    assert feed(relay, bytewise(wire)) == [ping]
    pong = relay.send(Pong(seq=ping.seq))
    assert feed(agent, [pong]) == [Pong(seq=1)]
    beat.received(21.0)
    assert beat.deadline() == 40.0


# --------------------------------------------------------------------------
# The fleet document's members (docs/protocol.md, "Fleet document")


def test_hello_carries_the_agents_fleet_serial() -> None:
    hello = Hello(version=2, token="t", agent="a", fleet_serial=0)
    wire = b'{"type":"hello","version":2,"token":"t","agent":"a","fleet_serial":0}'
    assert encode(hello) == frame(wire)
    assert decode_payload(wire) == hello
    # An agent older than fleet documents sends none, and is read as before.
    old = decode_payload(b'{"type":"hello","version":2,"token":"t","agent":"a"}')
    assert isinstance(old, Hello) and old.fleet_serial is None


def test_welcome_carries_a_fleet_document() -> None:
    welcome = Welcome(
        session="s1", key="k1", domain="r1.example.com", heartbeat=20, pool=4, fleet="a.b.c"
    )
    wire = (
        b'{"type":"welcome","session":"s1","key":"k1","domain":"r1.example.com",'
        b'"heartbeat":20,"pool":4,"fleet":"a.b.c"}'
    )
    assert encode(welcome) == frame(wire)
    assert decode_payload(wire) == welcome


@pytest.mark.parametrize("bad", [b'"1"', b"true", b"1.5", b"[]"])
def test_a_fleet_serial_is_an_integer(bad: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match=r"hello\.fleet_serial must be int"):
        decode_payload(
            b'{"type":"hello","version":2,"token":"t","agent":"a","fleet_serial":' + bad + b"}"
        )


def test_a_welcome_fleet_over_its_limit_is_refused_both_ways() -> None:
    def welcome(fleet: str) -> Welcome:
        return Welcome(session="s", key="k", domain="d", heartbeat=1, pool=1, fleet=fleet)

    assert encode(welcome("x" * MAX_FLEET_SIZE))  # at the limit: fine
    with pytest.raises(LocalProtocolError, match=r"welcome\.fleet is longer than 32768"):
        encode(welcome("x" * (MAX_FLEET_SIZE + 1)))
    payload = json.dumps(
        {"type": "welcome", "session": "s", "key": "k", "domain": "d", "heartbeat": 1,
         "pool": 1, "fleet": "x" * (MAX_FLEET_SIZE + 1)}
    ).encode()  # fmt: skip
    assert len(payload) < MAX_FRAME_SIZE  # a frame the size of which is fine
    agent = Connection(CONTROL, AGENT)
    agent.send(SAMPLES[Hello])
    with pytest.raises(RemoteProtocolError, match=r"welcome\.fleet is longer than 32768"):
        feed(agent, [frame(payload)])
