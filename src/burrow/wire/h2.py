"""Refuse HTTP/2 requests for a name that is not the connection's (RFC 9113 §9.1.1).

Every tunnel shares the relay's wildcard certificate and address, so a browser
may send a request for one tunnel's name on a connection it opened to another
(connection coalescing): that tunnel's server would get the request, and the
cookies that go with it. :class:`Inspector` reads the visitor's frames on the
way in, decodes every header block (HPACK, with the ``hpack`` library), and
answers ``421 Misdirected Request`` to a stream whose ``:authority`` or
``host`` is not the connection's server name, without forwarding any frame of
that stream. The client then retries on a connection of its own.

Forwarded frames are the visitor's bytes, unchanged, with one exception: once
a dropped header block has changed the client's HPACK dynamic table, the
server's table can no longer follow it, and every later header block is
re-encoded from what was decoded (see :meth:`Inspector._dropped_block`).

Sans-IO: bytes in, bytes out. The relay feeds it both directions: the
visitor's bytes (:meth:`Inspector.from_visitor`) come back as the bytes to
forward, and the server's bytes (:meth:`Inspector.to_visitor`) come back with
the refusals inserted between two of the server's frames. The only error it
raises is :class:`H2Error`; the relay then closes the connection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import hpack

from burrow.exception import RemoteProtocolError
from burrow.wire import names

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_SIZE: Final = 9

# Frame types and flags (RFC 9113 §6).
DATA: Final = 0x0
HEADERS: Final = 0x1
PRIORITY: Final = 0x2
RST_STREAM: Final = 0x3
NO_ERROR: Final = 0x0
SETTINGS: Final = 0x4
PUSH_PROMISE: Final = 0x5
WINDOW_UPDATE: Final = 0x8
CONTINUATION: Final = 0x9
FLAG_END_STREAM: Final = 0x1
FLAG_ACK: Final = 0x1
FLAG_END_HEADERS: Final = 0x4
FLAG_PADDED: Final = 0x8
FLAG_PRIORITY: Final = 0x20
SETTINGS_HEADER_TABLE_SIZE: Final = 0x1
MAX_WINDOW_INCREMENT: Final = 2**31 - 1

# What one request's header block may take, compressed (all its HEADERS and
# CONTINUATION frames, frame headers included) and decoded (RFC 7541 §4.1
# sizes: name + value + 32 per field). The compressed cap bounds what is
# buffered per connection before a block can be judged (the frames, their
# HPACK bytes and a frame still arriving: under 200 KiB), and ends CONTINUATION
# floods; the decoded cap ends HPACK bombs (a short block that repeats a large
# table entry). 64 KiB is nghttp2's limit on a header block, which nginx, curl
# and h2load use, so no request a server behind them accepts is refused here.
MAX_HEADER_BLOCK: Final = 64 * 1024
MAX_HEADER_LIST_SIZE: Final = 64 * 1024

# The largest HPACK dynamic table the client may use. Its size is the server's
# SETTINGS_HEADER_TABLE_SIZE (4096 unless the server says otherwise), which the
# inspector reads in the server's SETTINGS; a server asking for more than this
# gets this, and a client using more is closed. Real servers use 4 KiB to 64 KiB.
MAX_TABLE_SIZE: Final = 64 * 1024

# A server's SETTINGS frame holds a few 6-byte entries; this bounds what is
# buffered of one.
MAX_SETTINGS_SIZE: Final = 16 * 1024

# Streams refused on one connection. Their ids are kept to drop whatever the
# client still sends on them, so they are capped; a browser that gets a 421
# retries elsewhere, so a connection that reaches this is hostile and is closed.
MAX_REFUSED_STREAMS: Final = 256

# The answer's header block, built by hand so that it touches neither side's
# dynamic table: ":status: 421" and "content-length: 0", each a literal
# without indexing whose name is a static-table index (RFC 7541 §6.2.2):
# 0000 1000 = name index 8 (":status"), then the 3-byte value; 0000 1111 +
# 13 = name index 28 ("content-length"), then the 1-byte value.
_MISDIRECTED_BLOCK: Final = b"\x08\x03421" + b"\x0f\x0d\x010"


class H2Error(RemoteProtocolError):
    """A peer broke HTTP/2, or sent more headers than the relay will read."""


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return (
        len(payload).to_bytes(3, "big")
        + bytes((kind, flags))
        + stream_id.to_bytes(4, "big")
        + payload
    )


def misdirected(stream_id: int, *, reset: bool) -> bytes:
    """``421`` for ``stream_id``; with ``reset``, then ``RST_STREAM(NO_ERROR)``.

    The reset tells a client still sending a request body to stop (RFC 9113
    §8.1: a complete response may come before the request is complete), as
    nginx does when it answers early. Without it such a client would wait for
    the stream to end: curl 7.88 stops sending once it has an error status,
    and then waits. (That curl reports the reset as a framing error, with
    nginx as here; nghttp2, h2load and Chromium take the 421.)
    """
    out = frame(HEADERS, FLAG_END_HEADERS | FLAG_END_STREAM, stream_id, _MISDIRECTED_BLOCK)
    if reset:
        out += frame(RST_STREAM, 0, stream_id, NO_ERROR.to_bytes(4, "big"))
    return out


def window_update(increment: int) -> bytes:
    """Connection-level ``WINDOW_UPDATE`` frames giving back ``increment`` bytes."""
    out = b""
    while increment > 0:
        step = min(increment, MAX_WINDOW_INCREMENT)
        out += frame(WINDOW_UPDATE, 0, 0, step.to_bytes(4, "big"))
        increment -= step
    return out


# The server's frames whose header the inspector reads: header blocks (no
# reply may go between their frames) and SETTINGS (the HPACK table size).
_TRACKED: Final = frozenset({HEADERS, PUSH_PROMISE, CONTINUATION, SETTINGS})

# The frame size every HTTP/2 peer accepts (RFC 9113 §4.2): re-encoded header
# blocks are cut into frames of this size, whatever the server allows.
MIN_MAX_FRAME_SIZE: Final = 16_384


def _header_frames(stream_id: int, block: bytes, *, end_stream: bool, priority: bytes) -> bytes:
    """A header block as HEADERS (with ``priority`` fields, if any) and CONTINUATION frames."""
    first = MIN_MAX_FRAME_SIZE - len(priority)
    chunks = [block[:first]] + [
        block[at : at + MIN_MAX_FRAME_SIZE] for at in range(first, len(block), MIN_MAX_FRAME_SIZE)
    ]
    flags = (FLAG_END_STREAM if end_stream else 0) | (FLAG_PRIORITY if priority else 0)
    out = b""
    for index, chunk in enumerate(chunks):
        last = FLAG_END_HEADERS if index == len(chunks) - 1 else 0
        if index == 0:
            out += frame(HEADERS, flags | last, stream_id, priority + chunk)
        else:
            out += frame(CONTINUATION, last, stream_id, chunk)
    return out


@dataclass
class _Block:
    """A header block being collected: its HEADERS and CONTINUATION frames."""

    stream_id: int
    end_stream: bool
    priority: bytes = b""  # the HEADERS frame's priority fields, if it had them
    raw: bytearray = field(default_factory=bytearray)  # the frames, as received
    fragment: bytearray = field(default_factory=bytearray)  # the HPACK bytes


class Inspector:
    """One visitor's HTTP/2 connection, seen by the relay.

    ``server_name`` is the connection's TLS server name; ``ports`` are the
    ports a request's authority may name (the relay's public port).
    """

    def __init__(self, server_name: str, ports: frozenset[int] = frozenset()) -> None:
        self.server_name = names.server_name(server_name) or ""
        self.ports = ports
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)
        self._decoder.max_allowed_table_size = 4096  # RFC 9113 §6.5.2 default
        # Set once a dropped block has put the server's HPACK table out of step
        # with the client's (see _dropped_block).
        self._encoder: hpack.Encoder | None = None
        self.refused: set[int] = set()
        self.refusals = 0
        # visitor -> server
        self._in = bytearray()
        self._preface_seen = False
        self._pass_left = 0  # payload bytes of the current streamed frame still to come
        self._pass_forward = True  # whether they are forwarded or dropped
        self._block: _Block | None = None
        self._last_stream = 0  # the highest stream id the client has opened
        # server -> visitor
        self._s_head = bytearray()  # a frame header not yet complete
        self._s_left = 0
        self._s_started = False  # the server's first frame (its SETTINGS) is through
        self._s_in_block = False  # between HEADERS/PUSH_PROMISE and END_HEADERS
        self._s_settings: bytearray | None = None  # a SETTINGS payload being read
        # waiting for a frame boundary in the server's direction
        self._replies: list[int] = []  # streams refused, their 421 not yet sent
        self._window = 0  # connection-level window to give back (dropped DATA)
        self._sending: set[int] = set()  # refused streams whose request is not all here

    # -- visitor -> server ----------------------------------------------------

    def from_visitor(self, data: bytes | memoryview) -> bytes | memoryview:
        """Take the visitor's bytes; return those to forward to the server.

        Whole frames go through unchanged or not at all; a frame that is not
        complete yet is held, except for the payload of one that is not a
        header block, which streams through. Raises :class:`H2Error`.
        """
        if self._pass_left >= len(data) and not self._in and self._preface_seen:
            # The middle of a DATA frame (an upload): no copy, no parsing.
            self._pass_left -= len(data)
            return data if self._pass_forward else b""
        self._in += data
        out = bytearray()
        buf = self._in
        pos = 0
        end = len(buf)
        if not self._preface_seen:
            got = bytes(buf[: len(PREFACE)])
            if not PREFACE.startswith(got):
                raise H2Error("not the HTTP/2 client preface")
            if len(got) < len(PREFACE):
                return b""
            self._preface_seen = True
            out += got
            pos = len(PREFACE)
        while True:
            if self._pass_left:
                take = min(self._pass_left, end - pos)
                if take == 0:
                    break
                if self._pass_forward:
                    out += buf[pos : pos + take]
                pos += take
                self._pass_left -= take
                continue
            if end - pos < FRAME_HEADER_SIZE:
                break
            length = int.from_bytes(buf[pos : pos + 3], "big")
            kind = buf[pos + 3]
            flags = buf[pos + 4]
            stream_id = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFF_FFFF
            if kind in (HEADERS, CONTINUATION):
                if not self._header_frame(buf, pos, end, length, kind, flags, stream_id, out):
                    break
                pos += FRAME_HEADER_SIZE + length
                continue
            if self._block is not None:
                raise H2Error("a frame inside a header block (RFC 9113 §6.10)")
            # Any other frame streams through, or is dropped with its stream.
            forward = stream_id not in self.refused
            if kind == DATA:
                if stream_id == 0:
                    raise H2Error("DATA on stream 0")
                if not forward:
                    # The client spent connection window on it, which the
                    # server will never give back: the relay does.
                    self._window += length
            if not forward and (kind == RST_STREAM or (kind == DATA and flags & FLAG_END_STREAM)):
                self._sending.discard(stream_id)
            if forward:
                out += buf[pos : pos + FRAME_HEADER_SIZE]
            pos += FRAME_HEADER_SIZE
            self._pass_left, self._pass_forward = length, forward
        del buf[:pos]
        return memoryview(out)

    def _header_frame(
        self,
        buf: bytearray,
        pos: int,
        end: int,
        length: int,
        kind: int,
        flags: int,
        stream_id: int,
        out: bytearray,
    ) -> bool:
        """A HEADERS or CONTINUATION frame; False while it is not all here."""
        block = self._block
        held = len(block.raw) if block is not None else 0
        if held + FRAME_HEADER_SIZE + length > MAX_HEADER_BLOCK:
            raise H2Error(f"a header block over {MAX_HEADER_BLOCK} bytes")
        if kind == HEADERS:
            if block is not None:
                raise H2Error("HEADERS inside a header block")
            if stream_id == 0 or stream_id % 2 == 0:
                raise H2Error(f"HEADERS on stream {stream_id} from the client")
        elif block is None or stream_id != block.stream_id:
            raise H2Error("CONTINUATION outside its header block")
        if end - pos < FRAME_HEADER_SIZE + length:
            return False
        payload = bytes(buf[pos + FRAME_HEADER_SIZE : pos + FRAME_HEADER_SIZE + length])
        if kind == HEADERS:
            start, stop = 0, length
            if flags & FLAG_PADDED:
                if length < 1:
                    raise H2Error("padded HEADERS without a pad length")
                start, stop = 1, length - payload[0]
            if flags & FLAG_PRIORITY:
                start += 5
            if stop < start:
                raise H2Error("HEADERS padding longer than its payload")
            priority = payload[start - 5 : start] if flags & FLAG_PRIORITY else b""
            block = self._block = _Block(stream_id, bool(flags & FLAG_END_STREAM), priority)
            block.fragment += payload[start:stop]
        else:
            assert block is not None
            block.fragment += payload
        block.raw += buf[pos : pos + FRAME_HEADER_SIZE + length]
        if flags & FLAG_END_HEADERS:
            self._block = None
            self._judge(block, out)
        return True

    def _judge(self, block: _Block, out: bytearray) -> None:
        """A whole header block: decode it (always, to keep HPACK in step), then decide."""
        table = self._decoder.header_table
        entries, size, first = len(table.dynamic_entries), table.maxsize, self._first_entry()
        try:
            headers = self._decoder.decode(bytes(block.fragment), raw=True)
        except hpack.HPACKError as exc:
            raise H2Error(f"bad header block: {exc}") from exc
        changed = (
            len(table.dynamic_entries) != entries
            or table.maxsize != size
            or self._first_entry() is not first
        )
        stream_id = block.stream_id
        if stream_id in self.refused:
            # Trailers of a refused request: dropped with it.
            if block.end_stream:
                self._sending.discard(stream_id)
            self._dropped_block(changed)
            return
        authorities = [
            bytes(value) for name, value in headers if bytes(name) in (b":authority", b"host")
        ]
        ours = all(self._is_ours(value) for value in authorities)
        if stream_id > self._last_stream:
            self._last_stream = stream_id
            if not authorities or not ours:
                self._refuse(stream_id, sending=not block.end_stream)
                self._dropped_block(changed)
                return
        elif not ours:
            # A second header block (trailers) naming another host: no request
            # can carry that, and the stream's answer may be under way already.
            raise H2Error("a header block naming another host on an open stream")
        if self._encoder is None:
            out += block.raw  # the server's table is the client's: bytes as they came
            return
        if table.maxsize != size:
            self._encoder.header_table_size = table.maxsize  # pass the client's resize on
        fields = [hpack.NeverIndexedHeaderTuple(bytes(n), bytes(v)) for n, v in headers]
        out += _header_frames(
            stream_id,
            self._encoder.encode(fields, huffman=False),
            end_stream=block.end_stream,
            priority=block.priority,
        )

    def _first_entry(self) -> object:
        entries = self._decoder.header_table.dynamic_entries
        return entries[0] if entries else None

    def _dropped_block(self, changed_table: bool) -> None:
        """A header block the server will not see: if it changed HPACK state, re-encode.

        The client's encoder and the server's decoder share one dynamic table,
        kept in step by the blocks both see in order. A dropped block that
        added entries (a coalesced request's ``:authority`` and cookies always
        do) leaves the server's table behind the client's, and the client's
        later blocks would decode to other headers at the server than the ones
        judged here. From then on every forwarded block is re-encoded from what
        was decoded, as literals that never use or change the server's table.
        """
        if changed_table and self._encoder is None:
            self._encoder = hpack.Encoder()

    def _is_ours(self, value: bytes) -> bool:
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            return False
        host, colon, port = text.rpartition(":")
        if not colon or "]" in port:
            host, port = text, ""
        elif not (port.isdigit() and int(port) in self.ports):
            return False
        return names.server_name(host) == self.server_name

    def _refuse(self, stream_id: int, *, sending: bool) -> None:
        self.refusals += 1
        if len(self.refused) >= MAX_REFUSED_STREAMS:
            raise H2Error(f"over {MAX_REFUSED_STREAMS} misdirected requests on one connection")
        self.refused.add(stream_id)
        self._replies.append(stream_id)
        if sending:
            self._sending.add(stream_id)

    def replies(self) -> bytes:
        """What the relay may write to the visitor now, between two server frames.

        Refusals and window updates wait while the server is in the middle of a
        frame or a header block, and until its preface (SETTINGS) has gone by.
        """
        if not self._at_boundary() or not (self._replies or self._window):
            return b""
        return self._take_replies()

    def _at_boundary(self) -> bool:
        return self._s_started and not self._s_left and not self._s_head and not self._s_in_block

    def _take_replies(self) -> bytes:
        # A request whose end has come by now needs no reset (see misdirected).
        out = window_update(self._window) + b"".join(
            misdirected(stream_id, reset=stream_id in self._sending) for stream_id in self._replies
        )
        self._window = 0
        self._replies.clear()
        return out

    # -- server -> visitor ----------------------------------------------------

    def to_visitor(self, data: bytes | memoryview) -> bytes | memoryview:
        """Take the server's bytes; return them, with waiting replies at frame boundaries.

        The server's bytes are never held or changed: only their frame
        boundaries are tracked. Raises :class:`H2Error`.
        """
        end = len(data)
        if self._s_left >= end and self._s_settings is None:
            self._s_left -= end
            return data
        pos = 0
        if (
            self._s_started
            and not (self._s_head or self._s_in_block or self._s_settings is not None)
            and not (self._replies or self._window)
        ):
            # Nothing waits to go in: hop from frame header to frame header
            # until one that matters (downloads are mostly DATA frames of 8 or
            # 16 KiB, dozens per read, and this is the loop they cost).
            pos, self._s_left = self._s_left, 0
            while pos + FRAME_HEADER_SIZE <= end and data[pos + 3] not in _TRACKED:
                pos += FRAME_HEADER_SIZE + int.from_bytes(data[pos : pos + 3], "big")
            if pos >= end:
                self._s_left = pos - end
                return data
        pieces: list[bytes | memoryview] = []
        start = 0
        view = memoryview(data)
        while pos < end:
            if self._s_left:
                take = min(self._s_left, end - pos)
                if self._s_settings is not None:
                    self._s_settings += view[pos : pos + take]
                pos += take
                self._s_left -= take
                if not self._s_left and self._s_settings is not None:
                    self._read_settings(bytes(self._s_settings))
                    self._s_settings = None
                continue
            if self._at_boundary() and (self._replies or self._window):
                pieces += (view[start:pos], self._take_replies())
                start = pos
            need = FRAME_HEADER_SIZE - len(self._s_head)
            self._s_head += view[pos : pos + need]
            pos = min(end, pos + need)
            if len(self._s_head) < FRAME_HEADER_SIZE:
                break
            self._server_frame(bytes(self._s_head))
            self._s_head.clear()
            if not self._s_left and self._s_settings is not None:
                self._read_settings(b"")
                self._s_settings = None
        if self._at_boundary() and (self._replies or self._window):
            pieces += (view[start:], self._take_replies())
            return b"".join(pieces)
        if not pieces:
            return data
        pieces.append(view[start:])
        return b"".join(pieces)

    def _server_frame(self, header: bytes) -> None:
        length = int.from_bytes(header[:3], "big")
        kind, flags = header[3], header[4]
        stream_id = int.from_bytes(header[5:9], "big") & 0x7FFF_FFFF
        if not self._s_started:
            if kind != SETTINGS:
                raise H2Error("the server's preface is not a SETTINGS frame")
            self._s_started = True
        if kind in (HEADERS, PUSH_PROMISE):
            self._s_in_block = not flags & FLAG_END_HEADERS
        elif kind == CONTINUATION:
            if not self._s_in_block:
                raise H2Error("CONTINUATION from the server outside a header block")
            self._s_in_block = not flags & FLAG_END_HEADERS
        elif self._s_in_block:
            raise H2Error("a frame inside the server's header block")
        if kind == SETTINGS and stream_id == 0 and not flags & FLAG_ACK:
            if length > MAX_SETTINGS_SIZE:
                raise H2Error(f"a SETTINGS frame over {MAX_SETTINGS_SIZE} bytes")
            self._s_settings = bytearray()
        self._s_left = length

    def _read_settings(self, payload: bytes) -> None:
        # The server's SETTINGS_HEADER_TABLE_SIZE bounds the table the client's
        # encoder may use, so the decoder has to allow it. A value takes effect
        # only once the client acknowledges it, so until then the client may
        # still use the larger of the old and the new: the decoder allows the
        # largest it has seen (the server itself enforces the exact value).
        for at in range(0, len(payload) - len(payload) % 6, 6):
            ident = int.from_bytes(payload[at : at + 2], "big")
            value = int.from_bytes(payload[at + 2 : at + 6], "big")
            if ident == SETTINGS_HEADER_TABLE_SIZE:
                allowed = max(self._decoder.max_allowed_table_size, min(value, MAX_TABLE_SIZE))
                self._decoder.max_allowed_table_size = allowed
