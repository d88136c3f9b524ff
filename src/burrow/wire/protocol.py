"""The burrow wire protocol, sans-IO: frames, messages and the state of one connection.

Feed received bytes to :meth:`Connection.receive_data`, pull messages with
:meth:`Connection.next_event`, and turn messages into bytes with
:meth:`Connection.send`. Nothing here touches a socket, a clock or an event
loop; ``docs/protocol.md`` is the specification this module implements.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from burrow.exception import LocalProtocolError, RemoteProtocolError

# 2: open's `port` became `local_port` (one name per concept: `opened.port` is public).
PROTOCOL_VERSION: Final = 2
ALPN_CONTROL: Final = "burrow/1"
ALPN_DATA: Final = "burrow-data/1"

# The largest control message is a hello carrying a token (at most 4 KiB);
# 64 KiB leaves room for later members while keeping a hostile peer from
# making us buffer more than that before we can reject it.
MAX_FRAME_SIZE: Final = 64 * 1024

# The largest fleet document (``welcome.fleet``, burrow.fleet): half a frame,
# so that a welcome carrying one always fits. It holds a few hundred relays or
# about a thousand revoked token ids; tokens expire, so the list stays short.
MAX_FLEET_SIZE: Final = 32 * 1024

_LENGTH = struct.Struct("!I")


# Error codes carried by ``Error.code``; docs/protocol.md says what each means.
CODE_AUTH: Final = "auth"
CODE_VERSION: Final = "version"
CODE_PROTOCOL: Final = "protocol"
CODE_BAD_REQUEST: Final = "bad-request"
CODE_TCP_EXHAUSTED: Final = "tcp-exhausted"
CODE_LIMIT: Final = "limit"
CODE_BAD_ATTACH: Final = "bad-attach"
CODE_SHUTTING_DOWN: Final = "shutting-down"
CODE_CLAIM: Final = "claim"
CODE_PORT_FORWARDED: Final = "port-forwarded"
CODE_TOKEN_EXPIRED: Final = "token-expired"
CODE_ENDED_BY_OPERATOR: Final = "ended-by-operator"
CODE_FULL: Final = "full"


class _Message:
    """Base of every message; ``TYPE`` is its ``type`` member on the wire."""

    TYPE: ClassVar[str]


@dataclass(frozen=True, slots=True)
class Hello(_Message):
    TYPE: ClassVar[str] = "hello"
    version: int
    token: str
    agent: str
    workload: str | None = None
    fleet_serial: int | None = None


@dataclass(frozen=True, slots=True)
class Welcome(_Message):
    TYPE: ClassVar[str] = "welcome"
    session: str
    key: str
    domain: str
    heartbeat: int
    pool: int
    plain_port: int | None = None
    data_name: str | None = None
    fleet: str | None = None


@dataclass(frozen=True, slots=True)
class Open(_Message):
    TYPE: ClassVar[str] = "open"
    id: int
    local_port: int
    tcp: bool
    h2: bool
    allow: str | None = None
    claim: str | None = None


@dataclass(frozen=True, slots=True)
class Opened(_Message):
    TYPE: ClassVar[str] = "opened"
    id: int
    host: str
    port: int
    tcp_host: str | None = None
    tcp_port: int | None = None
    claim: str | None = None


@dataclass(frozen=True, slots=True)
class Close(_Message):
    TYPE: ClassVar[str] = "close"
    id: int


@dataclass(frozen=True, slots=True)
class Closed(_Message):
    TYPE: ClassVar[str] = "closed"
    id: int


@dataclass(frozen=True, slots=True)
class Dial(_Message):
    TYPE: ClassVar[str] = "dial"
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(_Message):
    TYPE: ClassVar[str] = "error"
    id: int | None = None
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Ping(_Message):
    TYPE: ClassVar[str] = "ping"
    seq: int


@dataclass(frozen=True, slots=True)
class Pong(_Message):
    TYPE: ClassVar[str] = "pong"
    seq: int


@dataclass(frozen=True, slots=True)
class Attach(_Message):
    TYPE: ClassVar[str] = "attach"
    session: str
    key: str


@dataclass(frozen=True, slots=True)
class Bind(_Message):
    TYPE: ClassVar[str] = "bind"
    id: int
    visitor: str


Message = (
    Hello | Welcome | Open | Opened | Close | Closed | Dial | Error | Ping | Pong | Attach | Bind
)

_MESSAGE_TYPES: Final[dict[str, type[Message]]] = {
    cls.TYPE: cls
    for cls in (Hello, Welcome, Open, Opened, Close, Closed, Dial, Error, Ping, Pong, Attach, Bind)
}


def _schema(cls: type[Message]) -> list[tuple[str, type, bool]]:
    """(name, JSON type, required) for each member of a message class."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, type, bool]] = []
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        required = field.default is dataclasses.MISSING
        out.append((field.name, base, required))
    return out


_SCHEMAS: Final = {name: _schema(cls) for name, cls in _MESSAGE_TYPES.items()}

# Members with a limit of their own, below the frame's.
_MAX_LENGTHS: Final = {("welcome", "fleet"): MAX_FLEET_SIZE}


def encode(message: Message) -> bytes:
    """One frame holding ``message``: compact JSON, members in declared order."""
    obj: dict[str, Any] = {"type": message.TYPE}
    for name, _, _ in _SCHEMAS[message.TYPE]:
        value = getattr(message, name)
        if value is not None:
            limit = _MAX_LENGTHS.get((message.TYPE, name))
            if limit is not None and len(value) > limit:
                raise LocalProtocolError(f"{message.TYPE}.{name} is longer than {limit}")
            obj[name] = value
    payload = json.dumps(obj, separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME_SIZE:
        raise LocalProtocolError(f"{message.TYPE} frame of {len(payload)} bytes is too large")
    return _LENGTH.pack(len(payload)) + payload


def _is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_payload(payload: bytes) -> Message:
    """The message in one frame's payload, or :class:`RemoteProtocolError`."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RemoteProtocolError("frame is not valid UTF-8 JSON") from exc
    if not isinstance(obj, dict):
        raise RemoteProtocolError("frame is not a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str) or kind not in _MESSAGE_TYPES:
        raise RemoteProtocolError(f"unknown message type {kind!r:.40}")
    values: dict[str, Any] = {}
    for name, json_type, required in _SCHEMAS[kind]:
        if name not in obj or obj[name] is None:
            if required:
                raise RemoteProtocolError(f"{kind} message lacks {name!r}")
            continue
        value = obj[name]
        # bool is an int subclass in Python, but never a valid int on the wire.
        if not isinstance(value, json_type) or (json_type is int and isinstance(value, bool)):
            raise RemoteProtocolError(f"{kind}.{name} must be {json_type.__name__}")
        # JSON escapes can spell lone surrogates, which are not text anywhere else.
        if isinstance(value, str) and not _is_encodable(value):
            raise RemoteProtocolError(f"{kind}.{name} is not valid Unicode")
        limit = _MAX_LENGTHS.get((kind, name))
        if limit is not None and isinstance(value, str) and len(value) > limit:
            raise RemoteProtocolError(f"{kind}.{name} is longer than {limit}")
        values[name] = value
    return _MESSAGE_TYPES[kind](**values)


class Role(enum.Enum):
    AGENT = "agent"
    RELAY = "relay"


class Kind(enum.Enum):
    CONTROL = "control"
    DATA = "data"


class State(enum.Enum):
    """Where a connection is in its life; shared by both ends."""

    HELLO = "hello"  # control: waiting for the agent's hello
    WELCOME = "welcome"  # control: hello sent, waiting for the relay's answer
    READY = "ready"  # control: session established
    ATTACH = "attach"  # data: waiting for the agent's attach
    POOLED = "pooled"  # data: attached, idle in the pool until a bind
    SPLICED = "spliced"  # data: bound to a visitor; raw bytes from here on
    CLOSED = "closed"  # nothing more may be sent


# (connection kind, state, sender, message type) -> next state. Anything
# not in this table is a protocol error: local if we tried to send it,
# remote if the peer did.
_TRANSITIONS: Final[dict[tuple[Kind, State, Role, type[Message]], State]] = {
    (Kind.CONTROL, State.HELLO, Role.AGENT, Hello): State.WELCOME,
    # The relay may refuse a peer that never managed a valid first frame.
    (Kind.CONTROL, State.HELLO, Role.RELAY, Error): State.CLOSED,
    (Kind.DATA, State.ATTACH, Role.RELAY, Error): State.CLOSED,
    (Kind.CONTROL, State.WELCOME, Role.RELAY, Welcome): State.READY,
    (Kind.CONTROL, State.WELCOME, Role.RELAY, Error): State.CLOSED,
    **{(Kind.CONTROL, State.READY, Role.AGENT, m): State.READY for m in (Open, Close, Ping, Pong)},
    **{
        (Kind.CONTROL, State.READY, Role.RELAY, m): State.READY
        for m in (Opened, Closed, Dial, Error, Ping, Pong)
    },
    (Kind.DATA, State.ATTACH, Role.AGENT, Attach): State.POOLED,
    (Kind.DATA, State.POOLED, Role.RELAY, Bind): State.SPLICED,
    (Kind.DATA, State.POOLED, Role.RELAY, Error): State.CLOSED,
}

_INITIAL_STATE: Final = {Kind.CONTROL: State.HELLO, Kind.DATA: State.ATTACH}


class NeedData(enum.Enum):
    """Returned by :meth:`Connection.next_event` when no whole frame is buffered yet."""

    NEED_DATA = "need-data"


NEED_DATA: Final = NeedData.NEED_DATA


class Connection:
    """One end of a control or data connection.

    After a data connection is spliced, :attr:`trailing_data` holds the raw
    bytes that arrived behind the ``bind`` frame; the I/O layer takes them
    and moves bytes itself from then on.
    """

    def __init__(self, kind: Kind, role: Role) -> None:
        self.kind = kind
        self.role = role
        self.state = _INITIAL_STATE[kind]
        self._peer = Role.RELAY if role is Role.AGENT else Role.AGENT
        self._buffer = bytearray()

    def send(self, message: Message) -> bytes:
        """The bytes to write for ``message``; :class:`LocalProtocolError` if not allowed now."""
        data = encode(message)  # first: a message too large to encode changes nothing
        self.state = self._advance(self.role, message, LocalProtocolError)
        return data

    def receive_data(self, data: bytes | memoryview) -> None:
        """Buffer bytes read from the peer."""
        if self.state is State.SPLICED:
            raise LocalProtocolError("a spliced connection carries raw bytes, not frames")
        self._buffer += data
        # Fail as soon as a length is visibly bad rather than after buffering it.
        if len(self._buffer) >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(self._buffer)
            if length == 0 or length > MAX_FRAME_SIZE:
                raise RemoteProtocolError(f"frame length {length} is outside 1..{MAX_FRAME_SIZE}")

    def next_event(self) -> Message | NeedData:
        """The next whole message from the peer, or ``NEED_DATA``."""
        if self.state is State.SPLICED:
            return NEED_DATA
        if len(self._buffer) < _LENGTH.size:
            return NEED_DATA
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length == 0 or length > MAX_FRAME_SIZE:
            raise RemoteProtocolError(f"frame length {length} is outside 1..{MAX_FRAME_SIZE}")
        end = _LENGTH.size + length
        if len(self._buffer) < end:
            return NEED_DATA
        payload = bytes(self._buffer[_LENGTH.size : end])
        del self._buffer[:end]
        message = decode_payload(payload)
        self.state = self._advance(self._peer, message, RemoteProtocolError)
        return message

    @property
    def trailing_data(self) -> bytes:
        """Bytes buffered behind the last frame (the first raw bytes once spliced)."""
        return bytes(self._buffer)

    def take_trailing_data(self) -> bytes:
        """Return and forget :attr:`trailing_data`."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data

    def _advance(
        self,
        sender: Role,
        message: Message,
        error: type[LocalProtocolError] | type[RemoteProtocolError],
    ) -> State:
        key = (self.kind, self.state, sender, type(message))
        try:
            state = _TRANSITIONS[key]
        except KeyError:
            raise error(
                f"{sender.value} may not send {message.TYPE} on a {self.kind.value} "
                f"connection in state {self.state.value}"
            ) from None
        # An error that answers no request ends the whole session.
        if isinstance(message, Error) and message.id is None:
            return State.CLOSED
        return state


class Heartbeat:
    """When to ping and when to give up on a silent peer; time is passed in.

    The I/O layer calls :meth:`received` on every frame from the peer,
    :meth:`sent` on every frame it writes, and :meth:`poll` when the time
    from :meth:`deadline` comes.
    """

    # Missing this many intervals in a row means the peer (or the path) is gone.
    MISSED_INTERVALS: Final = 3

    def __init__(self, interval: float, now: float) -> None:
        self.interval = interval
        self._last_received = now
        self._last_sent = now
        self._seq = 0

    @property
    def timeout(self) -> float:
        return self.interval * self.MISSED_INTERVALS

    def received(self, now: float) -> None:
        self._last_received = now

    def sent(self, now: float) -> None:
        self._last_sent = now

    def deadline(self) -> float:
        """The next time :meth:`poll` has something to say."""
        return min(self._last_sent + self.interval, self._last_received + self.timeout)

    def poll(self, now: float) -> Ping | None:
        """A ping to send now, or ``None``; :class:`HeartbeatTimeout` if the peer is gone."""
        if now >= self._last_received + self.timeout:
            raise HeartbeatTimeout(f"nothing received for {now - self._last_received:.1f}s")
        if now >= self._last_sent + self.interval:
            self._seq += 1
            self._last_sent = now
            return Ping(seq=self._seq)
        return None


class HeartbeatTimeout(RemoteProtocolError):
    """The peer sent nothing for longer than the heartbeat timeout."""


__all__ = [
    "ALPN_CONTROL",
    "ALPN_DATA",
    "MAX_FLEET_SIZE",
    "MAX_FRAME_SIZE",
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "Attach",
    "Bind",
    "Close",
    "Closed",
    "Connection",
    "Dial",
    "Error",
    "Heartbeat",
    "HeartbeatTimeout",
    "Hello",
    "Kind",
    "Message",
    "NeedData",
    "Open",
    "Opened",
    "Ping",
    "Pong",
    "Role",
    "State",
    "Welcome",
    "decode_payload",
    "encode",
]
