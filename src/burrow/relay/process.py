"""A relay's life as a process: start, serve until a signal, drain or close.

``burrow relay`` and ``burrow dev`` run a relay with :func:`run_relay`;
``burrow demo`` and the tests run one in a thread with :class:`RelayThread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from burrow.net.loopthread import LoopThread
from burrow.relay import claimsecret
from burrow.relay.config import RelayConfig
from burrow.relay.dnsserver import DnsServer, bind_dns, dns_zone, start_dns
from burrow.relay.server import LISTEN_BACKLOG, Relay
from burrow.relay.workers import Worker, bind_listeners, run_workers

if TYPE_CHECKING:  # the ACME client loads only for --auto-cert, the listener for --metrics
    from burrow.relay.acme import CaaSink, CertificateManager, ChallengeSink
    from burrow.relay.admin import AdminServer
    from burrow.relay.dns import Zone

log = logging.getLogger("burrow.relay")

T = TypeVar("T")

# Called once the relay listens, with its public port and every (host, port) it listens on.
OnStarted = Callable[[int, list[tuple[str, int]]], None]


def quiet_bad_server_names() -> None:
    """Log, rather than print, the server names CPython's ssl cannot decode.

    A ClientHello whose server name is not ASCII is refused by ssl before
    our SNI callback runs, but CPython reports the decode error as an
    "unraisable" exception on stderr: any visitor could fill the relay's
    logs with them.
    """
    default = sys.unraisablehook
    if getattr(default, "burrow_quiet", False):
        return

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, UnicodeError):
            log.debug("refused a TLS server name that is not ASCII")
            return
        default(unraisable)

    hook.burrow_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` on a uvloop event loop (asyncio's own where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(main())
    return uvloop.run(main())


async def serve(relay: Relay, on_started: Callable[[], None] | None = None) -> None:
    """Run until a signal: SIGTERM drains connections in flight first, SIGINT does not.

    A second signal while draining closes at once: Ctrl-C always ends a relay.
    """
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[signal.Signals] = loop.create_future()
    again: asyncio.Future[signal.Signals] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        for future in (stop, again):
            if not future.done():
                future.set_result(sig)
                return

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    if on_started is not None:
        on_started()
    if await stop == signal.SIGTERM:
        log.info("SIGTERM: draining for up to %gs", relay.config.drain_timeout)
        drain = loop.create_task(relay.drain())
        either: list[asyncio.Future[Any]] = [drain, again]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if drain.done():
            drain.result()
            return
        log.info("%s: closing without waiting for the drain", again.result().name)
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
        await relay.close()
    else:
        await relay.close()


async def start_loopback(config: RelayConfig) -> Relay:
    """Listen on 127.0.0.1, and on ::1 at the same port when this machine has IPv6.

    ``config.listen`` gives the IPv4 address and port (0 picks one); the
    IPv6 listener follows whatever port that got.
    """
    relay = await Relay.start(dataclasses.replace(config, listen=config.listen[:1]))
    try:
        await relay.add_listener("::1", relay.bound_port)
    except OSError as exc:
        log.info("not listening on [::1]: %s", exc)
    return relay


def bind_loopback(config: RelayConfig) -> list[socket.socket]:
    """:func:`start_loopback`'s sockets, bound ahead for worker processes."""
    sockets = bind_listeners(list(config.listen[:1]), LISTEN_BACKLOG)
    try:
        sockets += bind_listeners([("::1", sockets[0].getsockname()[1])], LISTEN_BACKLOG)
    except OSError as exc:
        log.info("not listening on [::1]: %s", exc)
    return sockets


class UnservedChallenge:
    """Where ACME's TXT values go when the relay runs no DNS server: the log, so that an
    operator can publish ``_acme-challenge.<domain>`` by other means."""

    def __init__(self, domain: str) -> None:
        self.domain = domain

    def set_challenge(self, values: list[str]) -> None:
        log.warning(
            "no DNS server in this relay: the CA will look up TXT _acme-challenge.%s = %s",
            self.domain,
            " and ".join(repr(value) for value in values),
        )

    def clear_challenge(self) -> None:
        pass


async def obtain_certificate(
    config: RelayConfig, challenges: ChallengeSink | None = None, caa: CaaSink | None = None
) -> CertificateManager:
    """``--auto-cert``: the stored certificate while it is good, else a new one from the CA.

    With ``--dns-caa``, ``caa`` (the relay's zone) gets the CAA record bound to the
    relay's ACME account.

    Raises :class:`~burrow.relay.acme.AcmeError` (one line: what to fix) when
    none comes within ``config.acme_timeout``. The relay serves TLS only after.
    """
    from burrow.relay import acme

    settings = acme.AcmeSettings.of(config)
    sink = challenges if challenges is not None else UnservedChallenge(settings.domain)
    manager = acme.CertificateManager(settings, sink, caa=caa)
    await manager.ensure()
    return manager


def keep_renewed(manager: CertificateManager, relay: Relay) -> asyncio.Task[None]:
    """Renew the relay's certificate for ever, each new one swapped in as it comes."""
    settings = manager.settings

    def installed(_: object) -> None:
        # Other workers see the new files through their own watch of them.
        relay.use_certificate(settings.cert, settings.key)

    return asyncio.get_running_loop().create_task(
        manager.run(installed, relay.metrics.renewals), name="acme-renewal"
    )


def _acme_config(config: RelayConfig) -> RelayConfig:
    """With ``--auto-cert``, the relay serves the files the ACME client keeps."""
    if not config.auto_cert:
        return config
    from burrow.relay import acme

    settings = acme.AcmeSettings.of(config)
    return dataclasses.replace(config, cert=settings.cert, key=settings.key)


def bind_metrics(config: RelayConfig) -> socket.socket | None:
    """The operator's listener socket (``config.metrics_listen``), bound and listening.

    Refuses (InvalidError) an address beyond loopback without an admin token.
    """
    if config.metrics_listen is None:
        return None
    from burrow.relay.admin import check_listen

    host, port = config.metrics_listen
    check_listen(host, config.admin_token)
    return bind_listeners([(host, port)], 128)[0]


async def start_admin(
    config: RelayConfig,
    relay: Relay,
    sock: socket.socket | None,
    zone: Zone | None,
    *,
    worker: Worker | None = None,
    directory: Path | None = None,
) -> AdminServer | None:
    """Count the zone's queries among the relay's metrics; serve the listener on ``sock``.

    As worker 0 of several (``worker``), it sums every worker's figures, asked
    over their sockets in ``directory``.
    """
    if zone is not None:
        relay.metrics.dns = zone.queries
    if sock is None:
        return None
    from burrow.relay import admin

    processes: admin.Processes
    if worker is not None and directory is not None:
        processes = admin.WorkerProcesses(relay, worker.index, worker.count, directory)
    else:
        processes = admin.LocalProcess(relay)
    return await admin.AdminServer.start(processes, config.admin_token, sock=sock)


def run_relay(
    config: RelayConfig,
    *,
    workers: int = 1,
    loopback: bool = False,
    on_started: OnStarted | None = None,
    challenges: ChallengeSink | None = None,
    on_metrics: Callable[[str], None] | None = None,
) -> None:
    """Run a relay in this process until SIGINT or SIGTERM (SIGTERM drains first).

    With ``workers`` above 1, that many forked processes share the listening
    sockets. ``loopback`` listens as :func:`start_loopback` does (``burrow dev``).
    With ``config.auto_cert`` the relay first gets its certificate (ACME runs in
    one process only: this one, then worker 0 for renewals) and ``challenges``
    publishes the DNS-01 TXT records. With ``config.metrics_listen`` the
    operator's listener is bound first and ``on_metrics`` told its URL.
    """
    quiet_bad_server_names()
    config = _acme_config(config)
    admin_sock = bind_metrics(config)
    if admin_sock is not None and on_metrics is not None:
        host, port = admin_sock.getsockname()[:2]
        on_metrics(f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/")
    # One zone per relay, made here: the ACME client publishes its challenges in it.
    zone = dns_zone(config)
    if challenges is None:
        challenges = zone
    if workers == 1:

        async def main() -> None:
            dns = await start_dns(config, zone=zone)  # first: ACME needs it
            renewals = admin = None
            try:
                manager = (
                    await obtain_certificate(config, challenges, zone) if config.auto_cert else None
                )
                relay = await (start_loopback(config) if loopback else Relay.start(config))
                renewals = keep_renewed(manager, relay) if manager is not None else None
                admin = await start_admin(config, relay, admin_sock, zone)

                def started() -> None:
                    if on_started is not None:
                        on_started(relay.public_port, relay.listening)

                await serve(relay, started)
            finally:
                if admin is not None:
                    await admin.close()
                if renewals is not None:
                    renewals.cancel()
                if dns is not None:
                    await dns.close()

        run(main)
        return
    # DNS runs once, in worker 0, on sockets bound here: a zone and its rate
    # limits are one per relay, and the supervisor runs no event loop while
    # it forks workers again when they exit. A restarted worker 0 finds them open.
    dns_sockets = bind_dns(config.dns_listen) if zone is not None else []
    if config.auto_cert:
        # Before the fork, so that every worker starts with a certificate; DNS
        # answers the CA meanwhile on copies of the sockets worker 0 gets.

        async def first_certificate() -> None:
            dns = await start_dns(config, [sock.dup() for sock in dns_sockets], zone)
            try:
                await obtain_certificate(config, challenges, zone)
            finally:
                if dns is not None:
                    await dns.close()

        run(first_certificate)
    # Made once, before the fork: every worker must sign and check claims alike.
    claimsecret.load_or_create(config.state_dir, config.key)
    if loopback:
        sockets = bind_loopback(config)
    else:
        sockets = bind_listeners(list(config.listen), LISTEN_BACKLOG)
    public_port = config.public_port or sockets[0].getsockname()[1]
    config = dataclasses.replace(config, public_port=public_port)
    # Where each worker answers worker 0's questions for the listener.
    directory = Path(tempfile.mkdtemp(prefix="burrow-workers-"))

    def serve_worker(worker: Worker) -> None:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(
                logging.Formatter(
                    f"%(asctime)s %(levelname)s %(name)s[{worker.index}]: %(message)s"
                )
            )

        first = worker.index == 0
        if not first:
            for sock in [*dns_sockets, *([admin_sock] if admin_sock else [])]:
                sock.close()

        async def main() -> None:
            dns = await start_dns(config, dns_sockets, zone) if first else None
            renewals = admin = questions = None
            try:
                relay = await Relay.start(config, worker=worker, sockets=sockets)
                if config.auto_cert and first:  # one process renews
                    renewals = keep_renewed(
                        await obtain_certificate(config, challenges, zone), relay
                    )
                if admin_sock is not None:
                    from burrow.relay.admin import serve_worker_questions

                    questions = await serve_worker_questions(relay, worker.index, directory)
                admin = await start_admin(
                    config,
                    relay,
                    admin_sock if first else None,
                    zone if first else None,
                    worker=worker,
                    directory=directory,
                )
                await serve(relay)
            finally:
                if admin is not None:
                    await admin.close()
                if questions is not None:
                    questions.close()
                if renewals is not None:
                    renewals.cancel()
                if dns is not None:
                    await dns.close()

        run(main)

    if on_started is not None:
        # The sockets already listen: connections queue until a worker takes them.
        on_started(public_port, [sock.getsockname()[:2] for sock in sockets])
    try:
        run_workers(workers, serve_worker)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class RelayThread:
    """A relay on an event loop of its own thread, for code that is not async
    (``burrow demo``, the tests' harness)."""

    def __init__(self, config: RelayConfig, *, name: str = "burrow-relay") -> None:
        self.config = config
        self._thread = LoopThread(name)
        self._relay: Relay | None = None
        self._dns: DnsServer | None = None
        self._admin: AdminServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, timeout: float = 30) -> Relay:
        """Start the loop and the relay on it; the relay's start-up errors are raised here."""
        self._loop = self._thread.loop
        try:
            self._dns = self._thread.run(start_dns(self.config), timeout)
            self._relay = self._thread.run(Relay.start(self.config), timeout)
            zone = self._dns.zone if self._dns is not None else None
            sock = bind_metrics(self.config)
            self._admin = self._thread.run(start_admin(self.config, self._relay, sock, zone))
        except BaseException:
            if self._relay is not None:
                self._thread.run(self._relay.close(), timeout)
                self._relay = None
            if self._dns is not None:
                self._thread.run(self._dns.close(), timeout)
                self._dns = None
            self._thread.stop(timeout)
            raise
        return self._relay

    @property
    def admin(self) -> AdminServer | None:
        """The operator's listener (``config.metrics_listen``); its URL is ``admin.url``."""
        return self._admin

    @property
    def dns(self) -> DnsServer | None:
        """The relay's DNS server (``config.dns_listen``); its zone is ``dns.zone``."""
        return self._dns

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The relay's event loop (it stays this one after :meth:`stop`, closed)."""
        assert self._loop is not None, "RelayThread.start() first"
        return self._loop

    @property
    def relay(self) -> Relay:
        assert self._relay is not None, "RelayThread.start() first"
        return self._relay

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run ``coro`` on the relay's loop and wait for its result."""
        return self._thread.run(coro, timeout)

    def stop(self, timeout: float = 10) -> None:
        """Close the relay, then stop its loop and thread."""
        if self._admin is not None:
            self._thread.run(self._admin.close(), timeout)
            self._admin = None
        if self._relay is not None:
            self._thread.run(self._relay.close(), timeout)
            self._relay = None
        if self._dns is not None:
            self._thread.run(self._dns.close(), timeout)
            self._dns = None
        self._thread.stop(timeout)
