"""TLS contexts: the relay's server contexts and the client's contexts for reaching a relay.

The client imports this module on every ``import burrow``, so it needs
nothing but ``ssl``: the dev CA lives in :mod:`burrow.net.devca`, and the
certificate checks that only a relay makes import ``cryptography`` when run.
"""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from burrow.exception import InvalidError

# TLS 1.0 and 1.1 are deprecated (RFC 8996); every client worth serving has 1.2.
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidError(f"cannot read {what} {path}: {exc.strerror}") from exc


def server_context(cert: Path, key: Path, alpn: Sequence[str]) -> ssl.SSLContext:
    """A server context presenting ``cert`` (PEM chain) with ``key``, offering ``alpn``."""
    # Parse both files ourselves first: ssl's error for a bad file does not
    # say which one, and for an encrypted key OpenSSL would prompt on the
    # terminal for a password. Only a relay gets here: cryptography is
    # imported now rather than by every client that imports this module.
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        x509.load_pem_x509_certificates(_read(cert, "certificate"))
    except ValueError:
        raise InvalidError(f"{cert} is not a PEM certificate") from None
    try:
        serialization.load_pem_private_key(_read(key, "private key"), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise InvalidError(f"{key} is not an unencrypted PEM private key") from None
    try:
        return openssl_server_context(cert, key, alpn)
    except (ssl.SSLError, OSError) as exc:
        raise InvalidError(f"cannot use certificate {cert} with key {key}: {exc}") from exc


def openssl_server_context(cert: Path, key: Path, alpn: Sequence[str]) -> ssl.SSLContext:
    """The server context itself, with no checks of our own: OpenSSL's errors
    (``ssl.SSLError``, ``OSError``) are the caller's to explain."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_TLS_VERSION
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(list(alpn))
    return context


def client_context(ca: Path | None, alpn: Sequence[str]) -> ssl.SSLContext:
    """A client context for a relay, offering ``alpn``, checking its certificate and name.

    With ``ca`` (``BURROW_CA``) that CA alone is trusted: the relay is pinned
    to its operator's CA, as ``curl --cacert`` does, and no public CA can
    stand in for it. Without, the system's trust store is (OpenSSL's default
    paths, ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` included).

    Contexts are shared: loading the system trust store takes tens of
    milliseconds, which would otherwise be paid by every new agent session.
    A changed CA file (new modification time) gets a fresh context.
    """
    stamp = None
    if ca is not None:
        with contextlib.suppress(OSError):
            stamp = ca.stat().st_mtime_ns
    return _client_context(ca, tuple(alpn), stamp)


def shared_client_context(ca: Path | None) -> ssl.SSLContext:
    """Like :func:`client_context`, for connections that each pick their ALPN with :func:`offering`.

    An agent's control and data connections differ only in ALPN, and
    loading a trust store is what costs: one context, loaded once, serves
    both. Use it only through :func:`offering`, which sets the ALPN.
    """
    stamp = None
    if ca is not None:
        _preloaded.wait()  # it may be building this very context
        with contextlib.suppress(OSError):
            stamp = ca.stat().st_mtime_ns
    # Its own cache entry: no caller of client_context() gets this context.
    return _client_context(ca, None, stamp)


# Held while a connection is made from a shared context: its ALPN is set
# just before, and no other thread may change it in between.
_alpn_lock = threading.Lock()


@contextlib.contextmanager
def offering(context: ssl.SSLContext, alpn: Sequence[str]) -> Iterator[ssl.SSLContext]:
    """Connections made from ``context`` inside the block offer ``alpn``.

    OpenSSL copies a context's ALPN list into each connection when the
    connection is made (``SSL_new``, called by ``wrap_bio`` and
    ``wrap_socket``), so the list set here stays with the connections made
    in the block whatever the context is given afterwards.
    """
    with _alpn_lock:
        context.set_alpn_protocols(list(alpn))
        yield context


@functools.lru_cache(maxsize=32)
def _client_context(
    ca: Path | None, alpn: tuple[str, ...] | None, stamp: int | None
) -> ssl.SSLContext:
    # PROTOCOL_TLS_CLIENT checks hostnames and requires a certificate; set
    # both anyway so that no default can loosen them.
    context = _preloaded.take() if ca is None else None
    if context is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if ca is None:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    context.minimum_version = MINIMUM_TLS_VERSION
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except OSError as exc:
            raise InvalidError(f"cannot read CA certificate {ca}: {exc.strerror}") from exc
        except ssl.SSLError:
            raise InvalidError(f"{ca} holds no PEM CA certificate") from None
    if alpn is not None:
        context.set_alpn_protocols(list(alpn))
    return context


# -- the system's trust store, loaded ahead --------------------------------------


class _Preload:
    """Client contexts made ahead, on a thread of their own.

    Parsing a trust store of the usual size (some 150 CAs) takes about 15 ms,
    for each context, and even a context for one private CA costs a new
    process over a millisecond (OpenSSL's first context sets OpenSSL up).
    OpenSSL does both without Python's lock, so a thread started early
    overlaps them with the rest of the process's start-up.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._contexts: list[ssl.SSLContext] = []

    def start(self, count: int = 1, ca: Path | None = None) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._load, args=(count, ca), name="burrow-trust", daemon=True
            )
            self._thread.start()

    def _load(self, count: int, ca: Path | None) -> None:
        if ca is not None:
            # The agent's shared context for this CA, into the cache where
            # shared_client_context() finds it; an unreadable file raises there.
            with contextlib.suppress(InvalidError):
                shared_client_context(ca)
            return
        for _ in range(count):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            with self._lock:
                self._contexts.append(context)

    def wait(self) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def take(self) -> ssl.SSLContext | None:
        """A preloaded context, waiting for the loading to end; None if none is left."""
        self.wait()
        with self._lock:
            return self._contexts.pop() if self._contexts else None


_preloaded = _Preload()
# A fork while OpenSSL is half-way through the store could leave its locks
# held in the child: let the loading finish first.
os.register_at_fork(before=_preloaded.wait)


def preload_system_trust(count: int = 1) -> None:
    """Start loading ``count`` client contexts with the system's trust store, in the background.

    For a process that will reach a relay through a public CA: the first
    contexts :func:`client_context` and :func:`shared_client_context` make
    with no ``ca`` take these, already loaded, instead of loading the store
    themselves. Trust is exactly the same.
    """
    _preloaded.start(count)


def preload_pinned_trust(ca: Path) -> None:
    """Start making the agent's shared context for the private CA ``ca``, in the background.

    For a workload given ``BURROW_CA``: :func:`shared_client_context` then
    finds it made. Trust is exactly the same.
    """
    _preloaded.start(ca=ca)
