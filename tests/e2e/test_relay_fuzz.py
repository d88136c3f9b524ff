"""Every relay listener against 100,000 hostile inputs, while a live tunnel keeps serving.

One campaign per listener: the public TLS port before any TLS is done, the
agent side after a TLS handshake (ALPN ``burrow/1`` and ``burrow-data/1``),
a raw TCP tunnel port, and the plaintext data port. Inputs are seeded, so a
failure replays: random bytes, real ClientHellos and real frames cut at every
offset, mutated (bit flips, bad lengths, slices cut, inserted or repeated),
JSON garbage, plain HTTP.

This file is also the campaigns' client: the test runs it as a child process
(``python test_fuzz.py CONFIG``) with a few hundred connections in flight, so
the relay (a thread of the test process, as in ``harness.run_relay``) and its
hostile peers each get one of the two cores. Meanwhile the test fetches a page
through a live tunnel; afterwards the relay must still serve it and a new
tunnel, its event loop (and the agent's) must have reported no exception, and
the test process must hold no more file descriptors than before.

Every connection must end in a clean close, an error frame or a TLS alert
(a reset counts as a close: the kernel sends one when the relay closes with
input unread). A connection that the relay keeps open after our EOF for
longer than ``HANG_AFTER`` is a hang, and fails the campaign.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import gc
import hashlib
import json
import logging
import os
import random
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import pytest
from backends import HttpServer, client_hello, http_server
from harness import DOMAIN, RelayHarness, run_relay

import burrow
from burrow.relay.server import NOT_FOUND_REPLY, PLAIN_HTTP_REPLY
from burrow.wire import protocol

# Inputs per listener: enough that rare shapes (a mutation that leaves a hello
# valid but for one length, a frame cut at the one offset that matters) occur.
INPUTS_PER_LISTENER: Final = 100_000

# Connections the child keeps in flight: enough to keep the relay's core busy
# while each connection waits on a round trip.
CONCURRENCY: Final = 256

# The relay's own timers (handshake, first frame) fire after 10 s; a peer it
# still holds after this long, with our EOF sent, is hung.
HANG_AFTER: Final = 25.0

# The whole campaign, as a guard for the test process; it normally takes 5-30 s.
CAMPAIGN_TIMEOUT: Final = 240.0

SEED: Final = 20261123

# Frames from the relay that a fuzzing peer may see (welcome, and the answers
# to the valid frames it sent); anything else (bind, above all) is a bug.
RELAY_FRAME_TYPES: Final = {"welcome", "opened", "closed", "error", "dial", "ping", "pong"}
ERROR_CODES: Final = {value for name, value in vars(protocol).items() if name.startswith("CODE_")}

ALIVE_PATH: Final = "alive.txt"
ALIVE_BODY: Final = b"the live tunnel still answers\n" * 8

# Bytes a raw TCP connection starts with, naming it to the echo server.
CONNECTION_ID_SIZE: Final = 16

# ============================================================================
# Inputs (pure functions of a seeded Random; the child process uses them)
# ============================================================================


def frame(payload: bytes | dict[str, Any]) -> bytes:
    if isinstance(payload, dict):
        payload = json.dumps(payload, separators=(",", ":")).encode()
    return struct.pack("!I", len(payload)) + payload


def real_client_hellos(visitor_host: str) -> list[bytes]:
    """A ClientHello for every way of calling the relay's public port."""
    return [
        client_hello(DOMAIN, [protocol.ALPN_CONTROL]),
        client_hello(DOMAIN, [protocol.ALPN_DATA]),
        client_hello(visitor_host, ["h2", "http/1.1"]),
        client_hello(f"zzzzzzzzzzzzzz.{DOMAIN}", ["http/1.1"]),
        client_hello(None, []),
        client_hello(DOMAIN, [protocol.ALPN_CONTROL], ssl.TLSVersion.TLSv1_2),
    ]


_INTERESTING_BYTES: Final = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
_INTERESTING_LENGTHS: Final = (0, 1, 0xFF, 0x100, 0x3FFF, 0x4000, 0x4001, 0x7FFF, 0xFFFF)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` with one to eight small damages: bit flips, bytes set, slices cut or added."""
    out = bytearray(data or b"\x00")
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        if not out:
            out += rng.randbytes(1)
        i = rng.randrange(len(out))
        op = rng.randrange(7)
        if op == 0:
            out[i] ^= 1 << rng.randrange(8)
        elif op == 1:
            out[i] = rng.randrange(256)
        elif op == 2:
            out[i] = rng.choice(_INTERESTING_BYTES)
        elif op == 3:
            del out[i : i + rng.randint(1, 32)]
        elif op == 4:
            out[i:i] = rng.randbytes(rng.randint(1, 32))
        elif op == 5:
            j = rng.randrange(len(out))
            out[i:i] = out[j : j + rng.randint(1, 64)]
        else:  # a length field, most likely, set to an extreme
            out[i : i + 2] = rng.choice(_INTERESTING_LENGTHS).to_bytes(2, "big")
    return bytes(out)


def _record(content_type: int, version: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return struct.pack("!BHH", content_type, version, size) + body


def bad_tls_record(rng: random.Random, hellos: list[bytes]) -> bytes:
    """TLS records whose lengths (record, handshake or field) are wrong, or that are not hellos."""
    hello = rng.choice(hellos)
    choice = rng.randrange(5)
    if choice == 0:  # a record header announcing a length the body does not have
        content_type = rng.choice((20, 21, 22, 22, 22, 23, 24, rng.randrange(256)))
        version = rng.choice((0x0300, 0x0301, 0x0303, 0x0304, 0xFEFF, rng.randrange(65536)))
        length = rng.choice((0, 1, 4, 2**14, 2**14 + 1, 2**14 + 2048, 0xFFFF))
        body = hello[5:] if rng.random() < 0.5 else rng.randbytes(rng.randint(0, 600))
        return _record(content_type, version, body[: rng.randint(0, len(body))], length)
    if choice == 1:  # the hello's handshake length (3 bytes at offset 6) set wrong
        wrong = rng.choice((0, 1, len(hello) - 9 + 1, len(hello) - 9 - 1, 2**24 - 1, 2**14 + 1))
        return hello[:6] + wrong.to_bytes(3, "big") + hello[9:]
    if choice == 2:  # the hello split into many records, one of them lying about its length
        body = hello[5:]
        records = []
        pos = 0
        while pos < len(body):
            size = rng.randint(1, 64)
            records.append(_record(22, 0x0301, body[pos : pos + size]))
            pos += size
        k = rng.randrange(len(records))
        records[k] = (
            records[k][:3] + rng.choice(_INTERESTING_LENGTHS).to_bytes(2, "big") + (records[k][5:])
        )
        return b"".join(records)
    if choice == 3:  # the hello followed by more records: an alert, CCS, app data, junk
        tail = _record(rng.choice((20, 21, 23, 24)), 0x0303, rng.randbytes(rng.randint(0, 64)))
        return hello + tail
    # SSLv2-style hello and other ancient shapes
    return rng.choice((b"\x80", b"\x81\x00", b"\x80\x2e\x01\x00\x02")) + rng.randbytes(
        rng.randint(0, 64)
    )


_METHODS: Final = (
    "GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT", "PRI", "TRACE", "get", "BREW"
)  # fmt: skip


def plain_http(rng: random.Random, visitor_host: str) -> bytes:
    """Plain HTTP (or something like it) sent to the TLS port."""
    method = rng.choice(_METHODS)
    target = rng.choice(("/", "*", "/alive.txt", "http://evil.example/", "/%00", "/" + "a" * 9000))
    version = rng.choice(("HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/9.9", ""))
    lines = [f"{method} {target} {version}"]
    for _ in range(rng.randint(0, 6)):
        lines.append(
            rng.choice(
                (
                    f"Host: {visitor_host}",
                    "Connection: Upgrade",
                    "Upgrade: websocket",
                    f"Content-Length: {rng.randint(0, 10**12)}",
                    "Transfer-Encoding: chunked",
                    "X-Junk: " + "x" * rng.randint(0, 2000),
                )
            )
        )
    text = "\r\n".join(lines) + "\r\n\r\n"
    data = text.encode() + rng.randbytes(rng.choice((0, 0, 10, 1000)))
    if rng.random() < 0.3:
        data = data[: rng.randint(1, len(data))]
    if method == "PRI" and rng.random() < 0.5:
        data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(rng.randint(0, 64))
    return data


def public_port_inputs(
    rng: random.Random, hellos: list[bytes], visitor_host: str
) -> Iterator[tuple[str, bytes]]:
    """(kind, input) for the public port, before any TLS; never ends."""
    for hello in hellos:  # every real hello cut at every offset (0 is "connect, then EOF")
        for cut in range(len(hello)):
            yield "truncated-hello", hello[:cut]
    while True:
        kind = rng.randrange(10)
        if kind <= 1:
            yield "random", rng.randbytes(rng.choice((1, 2, 5, 16, 100, 600, 2048)))
        elif kind <= 4:
            yield "mutated-hello", mutate(rng, rng.choice(hellos))
        elif kind <= 6:
            yield "bad-record", bad_tls_record(rng, hellos)
        elif kind <= 8:
            yield "plain-http", plain_http(rng, visitor_host)
        else:
            yield (
                "other-protocol",
                rng.choice(
                    (
                        b"SSH-2.0-OpenSSH_9.2p1\r\n",
                        b"\r\n\r\n",
                        b"\x00" * rng.randint(1, 100),
                        b"\xff" * rng.randint(1, 100),
                        _record(21, 0x0303, b"\x02\x28"),  # a fatal alert first
                        _record(20, 0x0303, b"\x01"),  # change_cipher_spec first
                        _record(23, 0x0303, rng.randbytes(100)),  # application data first
                    )
                ),
            )


# Python reads and writes integers of at most 4300 digits (sys.int_info);
# converting one costs about a millisecond, so it is made once.
_BIGGEST_READABLE_INT: Final = int("9" * 4300)


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    """Any JSON value, leaning to the ones that break readers."""
    roll = rng.randrange(14 if depth < 4 else 10)
    if roll == 0:
        return None
    if roll == 1:
        return rng.random() < 0.5
    if roll == 2:
        return rng.choice((0, -1, 1, 2**31, 2**53 + 1, 2**63, -(2**63) - 1, 10**30))
    if roll == 3:
        return rng.choice((0.0, -0.0, 1.5, 1e308, float("inf"), float("nan")))
    if roll == 4:
        return ""
    if roll == 5:
        return "x" * rng.choice((1, 14, 255, 4096))
    if roll == 6:
        return rng.choice(("\u0000", "\u202e", "é", "\U0001f600", "\ufeff", "a.b", "../.."))
    if roll == 7:
        return "\ud800"  # a lone surrogate: json.dumps writes it as an escape
    if roll == 8:
        return rng.choice((int("9" * 19), int("9" * 100), _BIGGEST_READABLE_INT))
    if roll == 9:
        return rng.choice(("hello", "open", "attach", "bind", "error", "welcome"))
    if roll < 12:
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        rng.choice(("type", "id", "seq", "port", "x", "")): _json_value(rng, depth + 1)
        for _ in range(rng.randint(0, 4))
    }


_MESSAGE_TYPES: Final = (
    "hello", "welcome", "open", "opened", "close", "closed", "dial", "error",
    "ping", "pong", "attach", "bind",
)  # fmt: skip
_MESSAGE_MEMBERS: Final = (
    "version", "token", "agent", "session", "key", "id", "seq", "port", "local_port", "tcp", "h2",
    "count", "code", "message", "visitor", "allow", "claim", "resume",
)  # fmt: skip


def json_garbage(rng: random.Random) -> bytes:
    """A frame payload that is not a valid message, or barely is."""
    roll = rng.randrange(12)
    if roll == 0:
        depth = rng.choice((100, 1000, 30000))
        return b"[" * depth + b"]" * depth
    if roll == 1:
        depth = rng.choice((100, 1000, 10000))
        return b'{"type":' * depth + b"1" + b"}" * depth
    if roll == 2:
        return b'{"type":"ping","seq":' + b"9" * rng.choice((4300, 4301, 20000)) + b"}"
    if roll == 3:
        return rng.choice(
            (b"NaN", b"-Infinity", b'{"type":NaN}', b'{"type":"ping","seq":1e999}', b"1e999")
        )
    if roll == 4:
        return b"\xef\xbb\xbf" + json.dumps({"type": "ping", "seq": 1}).encode()  # a BOM
    if roll == 5:
        return rng.choice((b'{"type":"\\ud800"}', b'{"type":"ping\\u0000","seq":1}'))
    if roll == 6:
        return rng.choice((b"\xc0\xaf", b"\xed\xa0\x80", b'{"type":"\xff"}', b"\x00" * 16))
    if roll == 7:
        return b'{"type":"hello","type":"attach","session":"s","key":"k"}'  # duplicate keys
    if roll == 8:
        return json.dumps(_json_value(rng)).encode()
    if roll == 9:
        whole = json.dumps(
            {"type": "hello", "version": protocol.PROTOCOL_VERSION, "token": "x", "agent": "a"}
        ).encode()
        return whole[: rng.randint(0, len(whole) - 1)]
    # a message of a known (or unknown) type with members of any JSON type
    body: dict[str, Any] = {
        "type": rng.choice((*_MESSAGE_TYPES, "x", "", "HELLO", "hello ")),
    }
    for name in rng.sample(_MESSAGE_MEMBERS, rng.randint(0, 6)):
        body[name] = _json_value(rng)
    return json.dumps(body, separators=rng.choice(((",", ":"), (", ", ": ")))).encode()


def frame_inputs(rng: random.Random, real: list[bytes]) -> Iterator[tuple[str, bytes]]:
    """(kind, first bytes after the handshake) for a control or data connection; never ends."""
    for whole in real:  # every real frame cut at every offset
        for cut in range(1, len(whole)):
            yield "truncated-frame", whole[:cut]
    while True:
        kind = rng.randrange(10)
        if kind == 0:
            yield "random", rng.randbytes(rng.choice((1, 3, 4, 5, 64, 512)))
        elif kind == 1:
            yield "random-frame", frame(rng.randbytes(rng.randint(1, 300)))
        elif kind <= 3:
            yield "mutated-frame", mutate(rng, rng.choice(real))
        elif kind == 4:
            length = rng.choice(
                (0, 1, protocol.MAX_FRAME_SIZE, protocol.MAX_FRAME_SIZE + 1, 2**31, 2**32 - 1)
            )
            yield "odd-length", struct.pack("!I", length) + rng.randbytes(rng.randint(0, 64))
        elif kind <= 6:
            yield "json-garbage", frame(json_garbage(rng))
        elif kind == 7:
            whole = rng.choice(real)
            tail = rng.choice((rng.randbytes(rng.randint(1, 64)), rng.choice(real)))
            yield "frame-then-more", whole + tail
        elif kind == 8:  # the length promises more than comes
            whole = frame(json_garbage(rng))
            yield "short-body", whole[: rng.randint(4, max(4, len(whole) - 1))]
        else:  # a frame of the largest allowed size, full of junk
            yield (
                "max-size-frame",
                frame(b'{"type":"hello","pad":"' + b"a" * (protocol.MAX_FRAME_SIZE - 26) + b'"}'),
            )


def surviving_frame(rng: random.Random, opened: list[int]) -> tuple[bytes, tuple[str, Any]]:
    """A valid but hostile control frame after welcome, and the answer it must get.

    Members take extreme values of their JSON type, unknown members carry any
    JSON at all, and the order and spacing vary: a reader must ignore what it
    does not know and answer the rest. The answer is (type, id or seq), where
    the type is "opened|error" for an open and "closed|error" for a close.
    """
    ints: tuple[int, ...] = (0, 1, -1, 2**31, 2**53 + 1, 2**63, 10**30)
    if rng.random() < 0.01:
        ints = (_BIGGEST_READABLE_INT,)
    kind = rng.choice(("open", "open", "close", "ping", "pong"))
    body: dict[str, Any] = {"type": kind}
    answer: tuple[str, Any]
    if kind == "open":
        tunnel_id = rng.choice((*ints, rng.randrange(1, 1000)))
        body.update(
            id=tunnel_id,
            local_port=rng.choice((*ints, 80, 65535, 65536)),
            tcp=rng.random() < 0.02,  # each one binds a real port of the relay's range
            h2=rng.random() < 0.5,
        )
        for name in ("allow", "claim"):
            if rng.random() < 0.2:
                body[name] = rng.choice(("", "x" * 300, "127.0.0.1/32", "é\u202e", "0.0.0.0/0"))
        opened.append(tunnel_id)
        answer = ("opened|error", tunnel_id)
    elif kind == "close":
        tunnel_id = rng.choice(opened) if opened and rng.random() < 0.5 else rng.choice(ints)
        body["id"] = tunnel_id
        answer = ("closed|error", tunnel_id)
    else:
        seq = rng.choice(ints)
        body["seq"] = seq
        answer = ("pong", seq) if kind == "ping" else ("", None)
    for _ in range(rng.choice((0, 0, 1, 3))):
        body[rng.choice(("x", "resume", "version", "zz" * 20, "\u202e"))] = _json_value(rng)
    items = list(body.items())
    rng.shuffle(items)
    separators = rng.choice(((",", ":"), (", ", ": "), (" ,\n", " :\t")))
    return frame(json.dumps(dict(items), separators=separators).encode()), answer


def split_writes(rng: random.Random, data: bytes) -> list[bytes]:
    """``data`` whole, or in pieces (one byte each, sometimes): TLS sends each as a record."""
    roll = rng.random()
    if roll < 0.7 or len(data) < 2:
        return [data]
    if roll < 0.8 and len(data) <= 200:
        return [data[i : i + 1] for i in range(len(data))]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 5))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def tcp_inputs(rng: random.Random, hellos: list[bytes]) -> Iterator[tuple[str, bytes]]:
    """Chunks for a raw TCP tunnel, where every byte is legal; never ends."""
    while True:
        kind = rng.randrange(6)
        if kind <= 2:
            yield "random", rng.randbytes(rng.choice((1, 2, 7, 100, 1000, 4096, 16384)))
        elif kind == 3:
            yield "frame", frame({"type": "bind", "id": rng.randrange(9), "visitor": "x"})
        elif kind == 4:
            yield "tls", rng.choice(hellos)
        else:
            junk = (b"\x00" * 512, b"\xff" * 512, b"\r\n", b"GET / HTTP/1.1\r\n")
            yield "bytes", rng.choice(junk)


# ============================================================================
# The child process: hostile clients, and the local echo server of the TCP tunnel
# ============================================================================


@dataclass
class Tally:
    """What a campaign sent and saw; the child prints it as JSON."""

    listener: str
    inputs: int = 0
    connections: int = 0
    by_kind: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    details: collections.Counter[str] = field(default_factory=collections.Counter)
    hangs: list[str] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    connect_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, kind: str, count: int = 1) -> None:
        self.inputs += count
        self.by_kind[kind] += count

    def wrong(self, what: str, data: bytes) -> None:
        self.outcomes["wrong"] += 1
        if len(self.bad) < 20:
            self.bad.append(f"{what}: input {data[:120]!r} ({len(data)} bytes)")

    def as_json(self) -> dict[str, Any]:
        return {
            "listener": self.listener,
            "inputs": self.inputs,
            "connections": self.connections,
            "by_kind": dict(self.by_kind),
            "outcomes": dict(self.outcomes),
            "details": dict(self.details),
            "hangs": self.hangs,
            "bad": self.bad,
            "connect_errors": self.connect_errors,
            "seconds": round(self.seconds, 2),
        }


class _Peer(asyncio.Protocol):
    """One hostile connection: sends its chunks, ends its side, reads until closed.

    With TLS (:meth:`with_tls`) it first does a real handshake, its own, over
    memory BIOs, so it can end its side with close_notify or a bare FIN and
    keep reading. ``after_welcome`` chunks wait for the relay's first whole
    frame: an agent may send nothing after hello until welcome has come.
    """

    def __init__(
        self,
        chunks: list[bytes],
        *,
        after_welcome: list[bytes] | None = None,
        close_notify: bool = False,
    ) -> None:
        self.chunks = chunks
        self.after_welcome = after_welcome
        self.close_notify = close_notify
        self.tls: ssl.SSLObject | None = None
        self.received = bytearray()
        self.ending = "open"
        self.handshake_error: str | None = None
        self.handshake_done = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.transport: asyncio.Transport | None = None

    @classmethod
    def with_tls(
        cls,
        context: ssl.SSLContext,
        server_name: str,
        session: ssl.SSLSession | None,
        chunks: list[bytes],
        *,
        after_welcome: list[bytes] | None = None,
        close_notify: bool = False,
    ) -> _Peer:
        peer = cls(chunks, after_welcome=after_welcome, close_notify=close_notify)
        peer.tls = context.wrap_bio(peer._incoming, peer._outgoing, server_hostname=server_name)
        if session is not None:
            peer.tls.session = session
        return peer

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if self.tls is None:
            self._send(self.chunks)
        else:
            self._handshake()

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            self.received += data
        else:
            self._incoming.write(data)
            if self.handshake_error is not None:
                return
            if not self.handshake_done:
                self._handshake()
                return
            self._read()
        if self.after_welcome is not None and self._whole_frame_received():
            chunks, self.after_welcome = self.after_welcome, None
            self._send(chunks)

    def eof_received(self) -> bool:
        if self.ending == "open":
            self.ending = "eof"
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.ending in ("open", "eof"):
            # ENOTCONN: our own write or shutdown met the reset first.
            reset = isinstance(exc, ConnectionError) or (
                isinstance(exc, OSError) and exc.errno == errno.ENOTCONN
            )
            self.ending = "reset" if reset else repr(exc)
        elif self.ending == "open":
            self.ending = "eof"
        if not self.done.done():
            self.done.set_result(None)

    # -- sending and receiving ------------------------------------------------

    def _send(self, chunks: list[bytes]) -> None:
        """Write ``chunks`` (each its own TLS records) and, unless more must wait, end our side."""
        assert self.transport is not None
        for chunk in chunks:
            if self.tls is None:
                self.transport.write(chunk)
            else:
                self.tls.write(chunk)  # records of its own; sent together below
        self._flush()
        if self.after_welcome is not None:
            return
        if self.tls is not None and self.close_notify:
            with contextlib.suppress(ssl.SSLError):
                self.tls.unwrap()
            self._flush()
        elif not self.transport.is_closing():
            self.transport.write_eof()

    def _whole_frame_received(self) -> bool:
        if len(self.received) < 4:
            return False
        length: int = struct.unpack_from("!I", self.received)[0]
        return len(self.received) >= 4 + length

    def _flush(self) -> None:
        if self._outgoing.pending and self.transport is not None:
            self.transport.write(self._outgoing.read())

    def _handshake(self) -> None:
        assert self.tls is not None and self.transport is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except ssl.SSLError as exc:
            self.handshake_error = f"{type(exc).__name__}: {exc.reason}"
            self._flush()
            self.transport.close()
            return
        self.handshake_done = True
        self._send(self.chunks)
        self._read()

    def _read(self) -> None:
        assert self.tls is not None
        while True:
            try:
                data = self.tls.read(65536)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                self.ending = "close_notify"
                return
            except ssl.SSLError as exc:
                self.ending = f"alert {exc.reason}"
                if self.transport is not None:
                    self.transport.close()
                return
            if not data:
                self.ending = "close_notify"
                return
            self.received += data


async def _run_peer(
    peer_factory: Callable[[], _Peer], port: int, tally: Tally, what: bytes
) -> _Peer | None:
    """Connect, let the peer do its exchange; None when it could not connect or hung."""
    loop = asyncio.get_running_loop()
    tally.connections += 1
    try:
        _, peer = await asyncio.wait_for(
            loop.create_connection(peer_factory, "127.0.0.1", port), HANG_AFTER
        )
    except (OSError, TimeoutError) as exc:
        tally.outcomes["connect-failed"] += 1
        if len(tally.connect_errors) < 20:
            tally.connect_errors.append(f"{type(exc).__name__}: {exc}")
        return None
    try:
        await asyncio.wait_for(asyncio.shield(peer.done), HANG_AFTER)
    except TimeoutError:
        tally.outcomes["hang"] += 1
        if len(tally.hangs) < 20:
            tally.hangs.append(
                f"input {what[:120]!r} ({len(what)} bytes), received {bytes(peer.received[:120])!r}"
            )
        if peer.transport is not None:
            peer.transport.abort()
        return None
    return peer


def parse_frames(data: bytes) -> list[dict[str, Any]] | str:
    """The relay's frames in ``data``, or what is wrong with them."""
    frames: list[dict[str, Any]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            return f"a truncated length at byte {pos}"
        (length,) = struct.unpack_from("!I", data, pos)
        if not 0 < length <= protocol.MAX_FRAME_SIZE or pos + 4 + length > len(data):
            return f"a frame of {length} bytes at byte {pos} of {len(data)}"
        try:
            message = json.loads(data[pos + 4 : pos + 4 + length])
        except ValueError:
            return f"invalid JSON {data[pos + 4 : pos + 100]!r}"
        if not isinstance(message, dict) or message.get("type") not in RELAY_FRAME_TYPES:
            return f"an unexpected message {str(message)[:200]}"
        if message["type"] == "error" and message.get("code") not in ERROR_CODES:
            return f"an unknown error code {str(message)[:200]}"
        frames.append(message)
        pos += 4 + length
    return frames


def judge_frames(tally: Tally, peer: _Peer, sent: bytes, *, data_connection: bool) -> None:
    """An error frame, a clean close or an alert, and no frame a fuzzing peer may not get."""
    if peer.handshake_error is not None:
        tally.wrong(f"our TLS handshake failed ({peer.handshake_error})", sent)
        return
    frames = parse_frames(bytes(peer.received))
    if isinstance(frames, str):
        tally.wrong(f"not whole relay frames: {frames}", sent)
        return
    if data_connection and (len(frames) > 1 or any(f["type"] != "error" for f in frames)):
        tally.wrong(f"a data connection got {frames}", sent)
        return
    tally.details[f"ended by {peer.ending.split(' ')[0]}"] += 1
    if any(f["type"] == "error" for f in frames):
        tally.outcomes["error frame"] += 1
    elif peer.ending.startswith("alert"):
        tally.outcomes["TLS alert"] += 1
    else:
        tally.outcomes["clean close"] += 1


def judge_public(tally: Tally, peer: _Peer, sent: bytes) -> None:
    """Before TLS: an alert (or handshake records, then a close), a 400 for plain text, a close."""
    data = bytes(peer.received)
    tally.details[f"ended by {peer.ending}"] += 1
    if sent[:1].isalpha():
        if data != PLAIN_HTTP_REPLY:
            tally.wrong(f"plain text got {data[:200]!r}", sent)
        else:
            tally.outcomes["HTTP 400"] += 1
        return
    if data == NOT_FOUND_REPLY:
        tally.wrong("a 404 before any handshake", sent)
        return
    pos = 0
    alert = False
    while pos < len(data):
        # (The record version is not checked: OpenSSL's alert to a hello with a
        # broken legacy_version carries that version back.)
        if len(data) - pos < 5 or data[pos] not in (20, 21, 22, 23):
            tally.wrong(f"not TLS records: {data[pos : pos + 100]!r}", sent)
            return
        (length,) = struct.unpack_from("!H", data, pos + 3)
        alert = alert or data[pos] == 21
        pos += 5 + length
    if pos != len(data):
        tally.wrong(f"a truncated TLS record: {data[-100:]!r}", sent)
    elif alert:
        tally.outcomes["TLS alert"] += 1
    else:
        tally.outcomes["clean close"] += 1


class _Sessions:
    """TLS sessions to resume, per (context, server name): most of the campaign resumes."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[int, str], ssl.SSLSession] = {}
        self.resumed = 0

    def get(self, context: ssl.SSLContext, name: str) -> ssl.SSLSession | None:
        return self._sessions.get((id(context), name))

    def keep(self, context: ssl.SSLContext, name: str, peer: _Peer) -> None:
        if peer.tls is None or peer.tls.version() is None:
            return
        if peer.tls.session_reused:
            self.resumed += 1
        key = (id(context), name)
        # Reading a session costs as much as a handshake in CPython (it copies
        # the session, certificate and all): take one per key.
        if key not in self._sessions:
            session = peer.tls.session
            if session is not None and session.has_ticket:
                self._sessions[key] = session


def _tls_context(alpn: str, version: ssl.TLSVersion) -> ssl.SSLContext:
    # No verification: the campaign is about what comes after the handshake,
    # and checking the chain costs as much as the handshake.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = version
    context.maximum_version = version
    context.set_alpn_protocols([alpn])
    return context


async def _fuzz_session(port: int, token: str) -> tuple[str, str, Callable[[], None]]:
    """A real session of the fuzzer's own (no tunnels): its id and key make real attach frames."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([protocol.ALPN_CONTROL])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=DOMAIN
    )
    writer.write(
        frame(
            {"type": "hello", "version": protocol.PROTOCOL_VERSION, "token": token, "agent": "fuzz"}
        )
    )
    (length,) = struct.unpack("!I", await reader.readexactly(4))
    welcome = json.loads(await reader.readexactly(length))
    assert welcome["type"] == "welcome", welcome

    async def keep_alive() -> None:  # answer the relay's pings so the session lives on
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                (n,) = struct.unpack("!I", await reader.readexactly(4))
                message = json.loads(await reader.readexactly(n))
                if message["type"] == "ping":
                    writer.write(frame({"type": "pong", "seq": message["seq"]}))

    task = asyncio.get_running_loop().create_task(keep_alive())

    def stop() -> None:
        task.cancel()
        writer.close()

    return welcome["session"], welcome["key"], stop


async def _campaign_public(config: dict[str, Any], tally: Tally) -> None:
    rng = random.Random(f"{SEED}-public")
    hellos = real_client_hellos(config["visitor_host"])
    inputs = public_port_inputs(rng, hellos, config["visitor_host"])
    port = config["port"]

    async def worker() -> None:
        while tally.inputs < config["inputs"]:
            kind, data = next(inputs)
            tally.add(kind)
            peer = await _run_peer(functools.partial(_Peer, [data]), port, tally, data)
            if peer is not None:
                judge_public(tally, peer, data)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def _campaign_plain_data(config: dict[str, Any], tally: Tally) -> None:
    rng = random.Random(f"{SEED}-plain-data")
    session, key, stop = await _fuzz_session(config["port"], config["token"])
    real = [
        frame({"type": "attach", "session": session, "key": key}),
        frame({"type": "attach", "session": session, "key": key[:-1] + "A"}),
        frame(
            {
                "type": "hello",
                "version": protocol.PROTOCOL_VERSION,
                "token": config["token"],
                "agent": "fuzz",
            }
        ),
    ]
    inputs = frame_inputs(rng, real)
    port = config["plain_port"]

    async def worker() -> None:
        while tally.inputs < config["inputs"]:
            kind, data = next(inputs)
            tally.add(kind)
            chunks = split_writes(rng, data)
            peer = await _run_peer(functools.partial(_Peer, chunks), port, tally, data)
            if peer is not None:
                judge_frames(tally, peer, data, data_connection=True)

    try:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    finally:
        stop()


# The agent side's inputs: this many data connections and control connections
# carrying one first-frame input each (a TLS connection costs the relay and
# this client about a millisecond of CPU each under OpenSSL 3.0), and control
# sessions for the rest, each a hello, many valid-but-hostile frames and most
# often one last input.
DATA_CONNECTIONS: Final = 4_000
CONTROL_FIRST_FRAMES: Final = 2_000
SURVIVING_FRAMES: Final = (20, 100)


async def _campaign_agent_side(config: dict[str, Any], tally: Tally) -> None:
    rng = random.Random(f"{SEED}-agent-side")
    port, token = config["port"], config["token"]
    session, key, stop = await _fuzz_session(port, token)
    hello = frame(
        {"type": "hello", "version": protocol.PROTOCOL_VERSION, "token": token, "agent": "fuzz"}
    )
    control_inputs = frame_inputs(
        random.Random(f"{SEED}-control"),
        [
            hello,
            frame(
                {
                    "type": "hello",
                    "version": protocol.PROTOCOL_VERSION,
                    "token": "garbage",
                    "agent": "fuzz",
                }
            ),
            frame(
                {
                    "type": "hello",
                    "version": protocol.PROTOCOL_VERSION + 1,
                    "token": token,
                    "agent": "fuzz",
                }
            ),
            frame({"type": "open", "id": 1, "local_port": 80, "tcp": False, "h2": False}),
            frame({"type": "ping", "seq": 1}),
        ],
    )
    data_inputs = frame_inputs(
        random.Random(f"{SEED}-data"),
        [
            frame({"type": "attach", "session": session, "key": key}),
            frame({"type": "attach", "session": session, "key": key[:-1] + "A"}),
            frame({"type": "attach", "session": "zzzzzzzzzzzzzz", "key": key}),
            hello,
        ],
    )
    contexts = {
        (alpn, version): _tls_context(alpn, version)
        for alpn in (protocol.ALPN_CONTROL, protocol.ALPN_DATA)
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)
    }
    sessions = _Sessions()
    data_names = (DOMAIN, f"{session}.{DOMAIN}")

    async def connect(
        alpn: str, chunks: list[bytes], sent: bytes, after_welcome: list[bytes] | None = None
    ) -> _Peer | None:
        # Mostly TLS 1.2 resumed: the cheapest handshake OpenSSL does, so most
        # of the CPU goes to what follows it. Some TLS 1.3, some full handshakes.
        version = ssl.TLSVersion.TLSv1_3 if rng.random() < 0.15 else ssl.TLSVersion.TLSv1_2
        context = contexts[(alpn, version)]
        name = DOMAIN if alpn == protocol.ALPN_CONTROL else rng.choice(data_names)
        session_to_resume = sessions.get(context, name) if rng.random() < 0.9 else None
        close_notify = rng.random() < 0.5
        peer = await _run_peer(
            lambda: _Peer.with_tls(
                context,
                name,
                session_to_resume,
                chunks,
                after_welcome=after_welcome,
                close_notify=close_notify,
            ),
            port,
            tally,
            sent,
        )
        if peer is not None:
            sessions.keep(context, name, peer)
            tally.details[f"TLS {'1.3' if version is ssl.TLSVersion.TLSv1_3 else '1.2'}"] += 1
        return peer

    async def data_connection() -> None:
        kind, data = next(data_inputs)
        tally.add(f"data {kind}")
        peer = await connect(protocol.ALPN_DATA, split_writes(rng, data), data)
        if peer is not None:
            judge_frames(tally, peer, data, data_connection=True)

    async def control_first_frame() -> None:
        kind, data = next(control_inputs)
        tally.add(f"control {kind}")
        peer = await connect(protocol.ALPN_CONTROL, split_writes(rng, data), data)
        if peer is not None:
            judge_frames(tally, peer, data, data_connection=False)

    async def control_session() -> None:
        opened: list[int] = []
        after_welcome: list[bytes] = []
        answers: list[tuple[str, Any]] = []
        for _ in range(rng.randint(*SURVIVING_FRAMES)):
            data, answer = surviving_frame(rng, opened)
            after_welcome += split_writes(rng, data)
            if answer[0]:
                answers.append(answer)
        tally.add("control valid-but-hostile frame", len(answers))
        if rng.random() < 0.8:
            kind, last = next(control_inputs)
            tally.add(f"control {kind} after welcome")
            after_welcome += split_writes(rng, last)
        sent = hello + b"".join(after_welcome)
        peer = await connect(protocol.ALPN_CONTROL, [hello], sent, after_welcome)
        if peer is None:
            return
        judge_frames(tally, peer, sent, data_connection=False)
        frames = parse_frames(bytes(peer.received))
        if isinstance(frames, str):
            return  # judged above
        replies = [f for f in frames if f["type"] not in ("ping", "dial")]
        if not replies or replies[0]["type"] != "welcome":
            tally.wrong(f"no welcome: {replies[:3]}, ended by {peer.ending}", sent)
            return
        for (expected, value), reply in zip(answers, replies[1:], strict=False):
            key_name = "seq" if expected == "pong" else "id"
            if reply["type"] not in expected.split("|") or reply.get(key_name) != value:
                tally.wrong(f"{expected} {str(value)[:20]} answered by {str(reply)[:200]}", sent)
                return
        # A reset (the relay refused the last input with more of it unread) may
        # take answers in flight with it; a clean close may not.
        if len(replies) - 1 < len(answers):
            if peer.ending in ("eof", "close_notify"):
                tally.wrong(f"{len(answers)} frames, {len(replies) - 1} answers", sent)
            else:
                tally.details["answers lost to a reset"] += 1

    scale = config["inputs"] / INPUTS_PER_LISTENER
    left = {"data": round(DATA_CONNECTIONS * scale), "first": round(CONTROL_FIRST_FRAMES * scale)}
    per_session = sum(SURVIVING_FRAMES) // 2

    async def worker() -> None:
        # The three kinds interleaved, each drawn in proportion to what is left of it.
        while tally.inputs < config["inputs"]:
            singles = left["data"] + left["first"]
            sessions_left = max(1, (config["inputs"] - tally.inputs - singles) // per_session)
            roll = rng.random() * (singles + sessions_left)
            if roll < left["data"]:
                left["data"] -= 1
                await data_connection()
            elif roll < singles:
                left["first"] -= 1
                await control_first_frame()
            else:
                await control_session()

    try:
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    finally:
        stop()
    tally.details["TLS resumed"] = sessions.resumed


class _EchoServer(asyncio.Protocol):
    """The raw TCP tunnel's local server: echoes, and records a digest of what it got."""

    def __init__(self, records: dict[bytes, tuple[int, str, str]]) -> None:
        self.records = records
        self.digest = hashlib.sha256()
        self.size = 0
        self.name = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if len(self.name) < CONNECTION_ID_SIZE:
            self.name += data[: CONNECTION_ID_SIZE - len(self.name)]
        self.digest.update(data)
        self.size += len(data)
        self.transport.write(data)

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        assert self.transport is not None
        self.records[self.name] = (self.size, self.digest.hexdigest(), "eof")
        self.transport.close()  # after what is buffered
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.records.setdefault(self.name, (self.size, self.digest.hexdigest(), "lost"))


# Inputs per raw TCP connection: one visitor, one data connection, many inputs.
TCP_INPUTS_PER_CONNECTION: Final = 100
TCP_CONCURRENCY: Final = 48


async def _campaign_tcp(config: dict[str, Any], tally: Tally) -> None:
    rng = random.Random(f"{SEED}-tcp")
    records: dict[bytes, tuple[int, str, str]] = {}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _EchoServer(records), "127.0.0.1", 0)
    print(f"echo-port {server.sockets[0].getsockname()[1]}", flush=True)
    tcp_port = int(sys.stdin.readline().split()[1])
    inputs = tcp_inputs(rng, real_client_hellos(config["visitor_host"]))

    async def worker() -> None:
        while tally.inputs < config["inputs"]:
            name = rng.randbytes(CONNECTION_ID_SIZE)
            chunks = [name]
            for _ in range(TCP_INPUTS_PER_CONNECTION):
                kind, data = next(inputs)
                tally.add(kind)
                chunks.append(data)
            sent = b"".join(chunks)
            peer = await _run_peer(functools.partial(_Peer, chunks), tcp_port, tally, sent)
            if peer is None:
                continue
            record = records.pop(name, None)
            expected = (len(sent), hashlib.sha256(sent).hexdigest(), "eof")
            if peer.received != sent:
                tally.wrong(
                    f"echo differs: {len(peer.received)} of {len(sent)} bytes, "
                    f"ended by {peer.ending}",
                    sent,
                )
            elif record != expected:
                tally.wrong(f"the local server got {record}, not {expected}", sent)
            else:
                tally.outcomes["byte-exact"] += 1

    try:
        await asyncio.gather(*(worker() for _ in range(TCP_CONCURRENCY)))
    finally:
        server.close()


_CAMPAIGNS: Final = {
    "public": _campaign_public,
    "agent-side": _campaign_agent_side,
    "plain-data": _campaign_plain_data,
    "tcp": _campaign_tcp,
}


def _child_main(config: dict[str, Any]) -> None:
    import uvloop

    tally = Tally(config["listener"])

    async def main() -> None:
        started = time.monotonic()
        await _CAMPAIGNS[config["listener"]](config, tally)
        tally.seconds = time.monotonic() - started

    uvloop.run(main())
    print("result " + json.dumps(tally.as_json()), flush=True)


# ============================================================================
# The tests: a relay, a live tunnel, and one campaign per listener
# ============================================================================


@dataclass
class Live:
    relay: RelayHarness
    http: HttpServer
    tunnel: burrow.Tunnel
    client: burrow.Client
    loop_errors: list[str]
    unraisable: list[str]


def fetch(relay: RelayHarness, tunnel: burrow.Tunnel, path: str = f"/{ALIVE_PATH}") -> bytes:
    """GET ``path`` through the tunnel's HTTPS address; the body, once the status is 200."""
    context = ssl.create_default_context(cafile=str(relay.ca))
    host, port = tunnel.tls_socket
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        response = bytearray()
        while data := sock.recv(65536):
            response += data
    head, _, body = bytes(response).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    return body


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(predicate: Callable[[], bool], what: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class _ErrorRecords(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.out = out

    def emit(self, record: logging.LogRecord) -> None:
        self.out.append(f"{record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A relay with a plaintext data port, a live HTTPS tunnel, and watchers on both loops."""
    from burrow.agent.client import runtime

    errors: list[str] = []
    unraisable: list[str] = []

    def record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(f"{context.get('message')}: {context.get('exception')!r}")
        loop.default_exception_handler(context)

    async def swap(handler: Any) -> Any:
        loop = asyncio.get_running_loop()
        old = loop.get_exception_handler()
        loop.set_exception_handler(handler)
        return old

    def unraisable_hook(info: Any) -> None:
        unraisable.append(f"{info.exc_type.__name__}: {info.exc_value} ({info.err_msg})")

    # The relay logs every refused peer at WARNING; millions of lines would
    # cost more than the campaigns. Errors still pass, and are recorded.
    burrow_logger = logging.getLogger("burrow")
    old_level = burrow_logger.level
    burrow_logger.setLevel(logging.ERROR)
    handler = _ErrorRecords(errors)
    for name in ("burrow", "asyncio"):
        logging.getLogger(name).addHandler(handler)
    old_hook = sys.unraisablehook
    sys.unraisablehook = unraisable_hook
    agent_loop = runtime.loop()
    try:
        with run_relay(
            tmp_path_factory.mktemp("fuzz-relay"), plain_data_listen=("127.0.0.1", 0)
        ) as relay:
            old_relay_handler = relay.call(swap(record))
            old_agent_handler = asyncio.run_coroutine_threadsafe(swap(record), agent_loop).result()
            # The TLS agent link (the default), though the relay also offers the plain one.
            client = burrow.Client(relay=relay.address, token=relay.token, ca=str(relay.ca))
            try:
                with (
                    http_server({ALIVE_PATH: ALIVE_BODY}) as server,
                    burrow.forward(server.port, client=client) as tunnel,
                ):
                    assert fetch(relay, tunnel) == ALIVE_BODY
                    yield Live(relay, server, tunnel, client, errors, unraisable)
            finally:
                relay.call(swap(old_relay_handler))
                asyncio.run_coroutine_threadsafe(swap(old_agent_handler), agent_loop).result()
    finally:
        sys.unraisablehook = old_hook
        for name in ("burrow", "asyncio"):
            logging.getLogger(name).removeHandler(handler)
        burrow_logger.setLevel(old_level)


def _pool_full(live: Live) -> bool:
    async def pooled() -> list[int]:
        return [len(s._pool) for s in live.relay.relay.registry.sessions.values()]

    sizes = live.relay.call(pooled())
    return bool(sizes) and all(n >= live.relay.relay.config.pool_size for n in sizes)


def _reserved(live: Live) -> int:
    """Idle data connections pooled beyond the pool size: the reserve a burst of visitors
    raised, kept on purpose for the next burst and shrinking when quiet (relay/pool.py)."""

    async def extra() -> int:
        size = live.relay.relay.config.pool_size
        return sum(max(0, s.pooled - size) for s in live.relay.relay.registry.sessions.values())

    return live.relay.call(extra())


def settled_fds(live: Live) -> int:
    """The test process's open descriptors once the agent's pool is full again, less the
    two (the relay's end and the agent's) of each connection of the pool's reserve."""
    wait_for(lambda: _pool_full(live), "the agent's pool to refill")
    gc.collect()
    return open_fds() - 2 * _reserved(live)


@dataclass
class Campaign:
    result: dict[str, Any]
    live_fetches: int
    fds_before: int
    fds_after: int


def run_campaign(
    live: Live, listener: str, tcp_tunnel: Callable[[int], Any] | None = None
) -> Campaign:
    """Run a listener's campaign in a child process, fetching through the live tunnel meanwhile."""
    relay = live.relay
    config = {
        "listener": listener,
        "inputs": INPUTS_PER_LISTENER,
        "port": relay.port,
        "plain_port": relay.relay.plain_port,
        "token": relay.mint(subject="fuzz"),
        "visitor_host": live.tunnel.host,
    }
    tests_dir = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    fds_before = settled_fds(live)
    unraisable_before = len(live.unraisable)
    fetches = 0
    with (
        tempfile.TemporaryFile() as stderr,
        contextlib.ExitStack() as stack,
        subprocess.Popen(
            [sys.executable, __file__, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        ) as child,
    ):
        assert child.stdin is not None and child.stdout is not None
        try:
            if tcp_tunnel is not None:
                line = child.stdout.readline()
                assert line.startswith("echo-port "), line
                tunnel = stack.enter_context(tcp_tunnel(int(line.split()[1])))
                child.stdin.write(f"go {tunnel.tcp_socket[1]}\n")
                child.stdin.flush()
            deadline = time.monotonic() + CAMPAIGN_TIMEOUT
            while child.poll() is None:
                assert time.monotonic() < deadline, "the campaign did not end"
                assert fetch(relay, live.tunnel) == ALIVE_BODY
                fetches += 1
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(0.25)  # pace the fetches; the child ending wakes us
            out = child.stdout.read()
        finally:
            if child.poll() is None:
                child.kill()
        stderr.seek(0)
        errors = stderr.read().decode(errors="replace")
    assert child.returncode == 0, errors
    lines = [line for line in out.splitlines() if line.startswith("result ")]
    assert lines, f"no result from the child: {out!r} {errors}"
    result: dict[str, Any] = json.loads(lines[-1][len("result ") :])

    # The relay keeps serving: the live tunnel, and a tunnel opened now.
    assert fetch(relay, live.tunnel) == ALIVE_BODY
    with (
        http_server({ALIVE_PATH: b"a fresh tunnel\n"}) as server,
        burrow.forward(server.port, client=live.client) as fresh,
    ):
        assert fetch(relay, fresh) == b"a fresh tunnel\n"

    # Nothing left behind: every descriptor the campaign cost is closed again.
    fds_after = settled_fds(live)
    deadline = time.monotonic() + 30
    while fds_after > fds_before and time.monotonic() < deadline:
        time.sleep(0.1)
        fds_after = settled_fds(live)
    print(
        f"\n{listener}: {result['inputs']:,} inputs over {result['connections']:,} connections "
        f"in {result['seconds']:.1f}s; {fetches} live fetches meanwhile; open files "
        f"{fds_before} before, {fds_after} after; "
        f"{len(live.unraisable) - unraisable_before} server names that are not ASCII\n"
        + json.dumps(result)
    )
    return Campaign(result, fetches, fds_before, fds_after)


def check(live: Live, campaign: Campaign) -> None:
    result = campaign.result
    assert result["hangs"] == [], result["hangs"]
    assert result["bad"] == [], result["bad"]
    assert result["connect_errors"] == [], result["connect_errors"]
    assert result["inputs"] >= INPUTS_PER_LISTENER, result
    assert campaign.live_fetches >= 1
    assert campaign.fds_after <= campaign.fds_before, campaign

    async def collect() -> None:
        gc.collect()  # "Task exception was never retrieved" is reported when a task is freed

    live.relay.call(collect())
    assert live.loop_errors == [], live.loop_errors
    # Python's ssl reports a server name that is not ASCII to sys.unraisablehook
    # (the SNI callback never runs; the peer gets an alert): known, and the only
    # thing allowed there.
    unknown = [u for u in live.unraisable if not u.startswith("UnicodeDecodeError")]
    assert unknown == [], unknown


@pytest.mark.timeout(CAMPAIGN_TIMEOUT + 60)
def test_public_port_before_tls(live: Live) -> None:
    """Random bytes, every real ClientHello cut at every offset, mutated hellos, bad record
    lengths and plain HTTP, one input per connection, each ended by our FIN."""
    check(live, run_campaign(live, "public"))


@pytest.mark.timeout(CAMPAIGN_TIMEOUT + 60)
def test_agent_side_after_tls(live: Live) -> None:
    """After a TLS handshake with ALPN burrow/1 or burrow-data/1: real hello and attach
    frames cut at every offset, mutated, odd lengths, JSON garbage; and control sessions
    that send many valid but hostile frames (each must get its answer) before a last input."""
    check(live, run_campaign(live, "agent-side"))


@pytest.mark.timeout(CAMPAIGN_TIMEOUT + 60)
def test_plain_data_port(live: Live) -> None:
    """The plaintext data port gets the data connection's inputs without TLS."""
    check(live, run_campaign(live, "plain-data"))


@pytest.mark.timeout(CAMPAIGN_TIMEOUT + 60)
def test_raw_tcp_tunnel_port(live: Live) -> None:
    """Any bytes are legal here: every input must reach the local server byte-exact, and
    come back so. The local server (in the child) records a SHA-256 per connection."""

    def tcp_tunnel(port: int) -> Any:
        return burrow.forward(port, unencrypted=True, client=live.client)

    check(live, run_campaign(live, "tcp", tcp_tunnel))


if __name__ == "__main__":
    _child_main(json.loads(sys.argv[1]))
