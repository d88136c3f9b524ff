"""Read the TLS ClientHello a visitor sends first, before any TLS is done.

The relay peeks at a new connection's first bytes and hands them to
:func:`parse_client_hello` to learn the SNI name and ALPN ids it routes by.
Nothing here touches a socket, a clock or a TLS library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from burrow.exception import RemoteProtocolError

# RFC 8446 §5.1 (and RFC 5246 §6.2.1 before it): a plaintext record carries at
# most 2**14 bytes, and a ClientHello is always plaintext. A longer record is
# not TLS, and the TLS stack behind the relay would refuse it anyway.
MAX_RECORD_SIZE: Final = 2**14

# Real ClientHellos, even with post-quantum key shares (an X25519MLKEM768 share
# is 1216 bytes), are under 2 KiB. This cap bounds what the relay buffers per
# unauthenticated socket before it may reject it: the message itself, plus 5
# bytes of record header per fragment (every fragment carries at least one
# byte), plus the rest of the record the hello ends in.
MAX_CLIENT_HELLO_SIZE: Final = 32 * 1024

_RECORD_HEADER_SIZE: Final = 5  # content type (1), legacy version (2), length (2)
_HANDSHAKE_HEADER_SIZE: Final = 4  # message type (1), length (3)

_CONTENT_HANDSHAKE: Final = 22
_CONTENT_TYPE_NAMES: Final = {
    20: "change_cipher_spec",
    21: "alert",
    22: "handshake",
    23: "application_data",
    24: "heartbeat",
}
_TLS_MAJOR_VERSION: Final = 3  # SSL 3.0 is 0x0300, TLS 1.0 to 1.3 are 0x0301 to 0x0304
_HANDSHAKE_CLIENT_HELLO: Final = 1

_RANDOM_SIZE: Final = 32
_MAX_SESSION_ID_SIZE: Final = 32  # RFC 8446 §4.1.2: opaque legacy_session_id<0..32>

_EXTENSION_SERVER_NAME: Final = 0  # RFC 6066 §3
_EXTENSION_ALPN: Final = 16  # RFC 7301 §3.1
_NAME_TYPE_HOST_NAME: Final = 0


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the relay routes a visitor by, read from its ClientHello."""

    server_name: str | None
    """The SNI host_name, as sent (ASCII); None if the extension is absent."""
    alpn: tuple[str, ...]
    """ALPN protocol names offered, in order; () if absent."""


def parse_client_hello(data: bytes | memoryview) -> ClientHello | None:
    """The ClientHello at the start of ``data``; None while more bytes are needed.

    ``data`` is everything received so far on the connection, from its first
    byte. Only the hello is read: bytes after it are left alone.
    Raises burrow.exception.RemoteProtocolError if the bytes are not a TLS ClientHello.
    """
    data = bytes(data)
    message = bytearray()  # the handshake message, reassembled from its fragments
    pos = 0
    while True:
        # Look at each header byte as soon as it arrives, so that a visitor who
        # is not speaking TLS is turned away on its first bytes.
        if pos >= len(data):
            return None
        content_type = data[pos]
        if content_type != _CONTENT_HANDSHAKE:
            name = _CONTENT_TYPE_NAMES.get(content_type)
            if name is None:
                raise RemoteProtocolError(
                    f"not a TLS handshake record: content type {content_type} at byte {pos}"
                )
            raise RemoteProtocolError(f"{name} record before the end of the ClientHello")
        if pos + 1 < len(data) and data[pos + 1] != _TLS_MAJOR_VERSION:
            raise RemoteProtocolError(
                f"not a TLS record: version major byte {data[pos + 1]} at byte {pos + 1}"
            )
        if pos + _RECORD_HEADER_SIZE > len(data):
            return None
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length > MAX_RECORD_SIZE:
            raise RemoteProtocolError(
                f"TLS record of {length} bytes, more than the {MAX_RECORD_SIZE} allowed"
            )
        if length == 0:
            # RFC 8446 §5.1: zero-length handshake fragments MUST NOT be sent.
            raise RemoteProtocolError("empty TLS handshake record")
        start = pos + _RECORD_HEADER_SIZE
        message += data[start : start + length]
        body_size = _check_handshake_header(message)
        if body_size is not None and len(message) >= _HANDSHAKE_HEADER_SIZE + body_size:
            body = bytes(message[_HANDSHAKE_HEADER_SIZE : _HANDSHAKE_HEADER_SIZE + body_size])
            return _parse_body(body)
        pos = start + length


def _check_handshake_header(message: bytearray) -> int | None:
    """The ClientHello body's size once its header is in; raises if it is not one."""
    if not message:
        return None
    if message[0] != _HANDSHAKE_CLIENT_HELLO:
        raise RemoteProtocolError(
            f"handshake message of type {message[0]}, expected a ClientHello "
            f"({_HANDSHAKE_CLIENT_HELLO})"
        )
    if len(message) < _HANDSHAKE_HEADER_SIZE:
        return None
    size = int.from_bytes(message[1:_HANDSHAKE_HEADER_SIZE], "big")
    if size > MAX_CLIENT_HELLO_SIZE:
        raise RemoteProtocolError(
            f"ClientHello of {size} bytes, more than the {MAX_CLIENT_HELLO_SIZE} allowed"
        )
    return size


class _Reader:
    """Reads fields off one TLS structure; every length must fit inside it."""

    __slots__ = ("_data", "_name", "_pos")

    def __init__(self, data: bytes, name: str) -> None:
        self._data = data
        self._name = name
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, size: int, what: str) -> bytes:
        if size > self.remaining:
            raise RemoteProtocolError(
                f"{what} ({size} bytes) runs past the end of the {self._name} "
                f"({self.remaining} bytes left)"
            )
        field = self._data[self._pos : self._pos + size]
        self._pos += size
        return field

    def integer(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> bytes:
        """A ``<length><bytes>`` field, as TLS's ``opaque x<..>`` vectors are sent."""
        return self.take(self.integer(length_size, f"length of {what}"), what)

    def expect_end(self) -> None:
        if self.remaining:
            raise RemoteProtocolError(f"{self.remaining} trailing bytes after the {self._name}")


def _parse_body(body: bytes) -> ClientHello:
    """RFC 8446 §4.1.2 ClientHello, which also reads the hellos of TLS 1.0 to 1.2."""
    hello = _Reader(body, "ClientHello")
    version = hello.integer(2, "legacy_version")
    if version >> 8 != _TLS_MAJOR_VERSION:
        raise RemoteProtocolError(f"ClientHello legacy_version 0x{version:04x} is not TLS")
    hello.take(_RANDOM_SIZE, "random")
    session_id = hello.vector(1, "legacy_session_id")
    if len(session_id) > _MAX_SESSION_ID_SIZE:
        raise RemoteProtocolError(
            f"legacy_session_id of {len(session_id)} bytes, more than {_MAX_SESSION_ID_SIZE}"
        )
    cipher_suites = hello.vector(2, "cipher_suites")
    if not cipher_suites or len(cipher_suites) % 2:
        raise RemoteProtocolError(
            f"cipher_suites of {len(cipher_suites)} bytes: not a non-empty list of 2-byte ids"
        )
    if not hello.vector(1, "legacy_compression_methods"):
        raise RemoteProtocolError("empty legacy_compression_methods")
    if not hello.remaining:
        # Hellos of TLS 1.0 and older may end here, without extensions.
        return ClientHello(server_name=None, alpn=())
    extensions = _Reader(hello.vector(2, "extensions"), "extensions")
    hello.expect_end()

    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while extensions.remaining:
        kind = extensions.integer(2, "extension type")
        extension_data = extensions.vector(2, f"extension {kind}")
        # RFC 8446 §4.2: no two extensions of the same type in one block.
        if kind in seen:
            raise RemoteProtocolError(f"duplicate extension {kind} in the ClientHello")
        seen.add(kind)
        if kind == _EXTENSION_SERVER_NAME:
            server_name = _parse_server_name(extension_data)
        elif kind == _EXTENSION_ALPN:
            alpn = _parse_alpn(extension_data)
    return ClientHello(server_name=server_name, alpn=alpn)


def _parse_server_name(data: bytes) -> str | None:
    """RFC 6066 §3 ServerNameList: the first host_name in it, or None if it has none."""
    extension = _Reader(data, "server_name extension")
    names = _Reader(extension.vector(2, "server_name_list"), "server_name_list")
    extension.expect_end()
    if not names.remaining:
        raise RemoteProtocolError("empty server_name_list")
    host_name: str | None = None
    while names.remaining:
        name_type = names.integer(1, "name_type")
        # Every name type known, host_name included, is an opaque<1..2^16-1>.
        name = names.vector(2, f"server name of type {name_type}")
        if not name:
            raise RemoteProtocolError(f"empty server name of type {name_type}")
        if name_type == _NAME_TYPE_HOST_NAME and host_name is None:
            if not name.isascii():
                raise RemoteProtocolError(f"SNI host_name is not ASCII: {name!r}")
            host_name = name.decode("ascii")
    return host_name


def _parse_alpn(data: bytes) -> tuple[str, ...]:
    """RFC 7301 §3.1 ProtocolNameList, each name decoded as Latin-1.

    ALPN ids are bytes, not text. Latin-1 maps each byte to one code point and
    never fails, so a non-ASCII id stays distinct from every ASCII id the relay
    compares against ("h2", "http/1.1", "burrow/1"), round-trips with
    ``.encode("latin-1")``, and, unlike surrogateescape, can still be written to
    a UTF-8 log.
    """
    extension = _Reader(data, "ALPN extension")
    names = _Reader(extension.vector(2, "protocol_name_list"), "protocol_name_list")
    extension.expect_end()
    if not names.remaining:
        raise RemoteProtocolError("empty ALPN protocol_name_list")
    protocols: list[str] = []
    while names.remaining:
        name = names.vector(1, "ALPN protocol name")
        if not name:
            raise RemoteProtocolError("empty ALPN protocol name")
        protocols.append(name.decode("latin-1"))
    return tuple(protocols)
