"""Worker processes, so that one relay serves from every core.

A relay started with N workers forks N processes that share its listening
sockets. Each label and session id has one owner, picked by hashing it
(:func:`burrow.wire.names.worker_of`), and each worker hands out only names it
owns. A worker that accepts a connection meant for another reads the
ClientHello's server name (before any TLS) and passes the socket, with the
bytes it read, to the owner over a Unix socket. Workers share no other
state, so a worker that dies takes only its own sessions with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

log = logging.getLogger("burrow.relay")

# A hand-off message: the bytes read so far (a ClientHello, capped by
# burrow.wire.clienthello) and one descriptor. Room for the largest hello and more.
HANDOFF_MAX_BYTES: Final = 64 * 1024

# Queue of hand-offs one worker's inbox holds while that worker is busy;
# beyond it a connection is closed rather than block the sender's loop.
INBOX_BUFFER_BYTES: Final = 4 * 1024 * 1024

# A worker that exits on its own is started again after this pause, so that
# one that crashes at start-up cannot spin the machine.
RESTART_DELAY: Final = 1.0


@dataclass
class Worker:
    """What one worker process knows of the others."""

    index: int
    count: int
    inbox: socket.socket
    """This worker's end of its Unix socket: connections handed to it arrive here."""
    peers: dict[int, socket.socket] = field(default_factory=dict)
    """Sending ends of the other workers' inboxes, by worker index."""

    def hand_off(self, owner: int, sock: socket.socket, prelude: bytes) -> bool:
        """Pass ``sock`` and the bytes already read from it to worker ``owner``.

        The socket is closed here either way; False means the owner's inbox
        was full or gone, and the peer sees its connection close.
        """
        try:
            socket.send_fds(self.peers[owner], [prelude], [sock.fileno()])
            log.debug("handed a connection to worker %d", owner)
            return True
        except OSError as exc:
            log.warning("could not hand a connection to worker %d: %s", owner, exc)
            return False
        finally:
            sock.close()

    def receive(self) -> list[tuple[socket.socket, bytes]]:
        """Connections handed to this worker since the last call, with their bytes."""
        received: list[tuple[socket.socket, bytes]] = []
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.inbox, HANDOFF_MAX_BYTES, 1)
            except (BlockingIOError, InterruptedError):
                return received
            except OSError as exc:
                log.warning("worker %d: inbox: %s", self.index, exc)
                return received
            if not fds:
                if not data:  # every sender is gone: nothing more will come
                    return received
                continue
            sock = socket.socket(fileno=fds[0])
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                sock.close()
                continue
            sock.setblocking(False)
            received.append((sock, data))


def _links(count: int) -> list[tuple[socket.socket, socket.socket]]:
    links = []
    for _ in range(count):
        send, inbox = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (send, inbox):
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, INBOX_BUFFER_BYTES)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, INBOX_BUFFER_BYTES)
        links.append((send, inbox))
    return links


def run_workers(count: int, serve: Callable[[Worker], None]) -> None:
    """Fork ``count`` workers that each run ``serve(worker)``; supervise until a signal.

    Call it before any event loop or thread exists in this process. SIGTERM
    or SIGINT is passed on to the workers, whose relays close cleanly; a
    worker that exits on its own is started again.
    """
    links = _links(count)
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which never returns here
            code = 0
            try:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                peers = {j: links[j][0] for j in range(count) if j != index}
                serve(Worker(index=index, count=count, inbox=links[index][1], peers=peers))
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
        log.info("worker %d started (pid %d)", index, pid)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(count):
            spawn(index)
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            index = children.pop(pid, -1)
            if index < 0 or stopping:
                continue
            log.error(
                "worker %d (pid %d) exited (%s); starting it again",
                index,
                pid,
                _describe(status),
            )
            time.sleep(RESTART_DELAY)
            if not stopping:
                spawn(index)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for send, inbox in links:
            send.close()
            inbox.close()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def bind_listeners(addresses: list[tuple[str, int]], backlog: int) -> list[socket.socket]:
    """Listening TCP sockets for ``addresses``, made before the workers fork.

    A port of 0 on the first address picks a free port, which the rest
    with port 0 then share (as the dev relay listens on 127.0.0.1 and ::1).
    """
    sockets: list[socket.socket] = []
    chosen = 0
    try:
        for host, port in addresses:
            port = port or chosen
            family, kind, proto, _, addr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(backlog)
            sock.setblocking(False)
            chosen = chosen or sock.getsockname()[1]
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets
