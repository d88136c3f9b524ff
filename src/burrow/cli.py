"""The ``burrow`` command: relay, dev, forward, token, demo."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import click

from burrow import configfile
from burrow.admincli import admin as admin_command
from burrow.env import DEV_PORT
from burrow.exception import Error
from burrow.fleetcli import fleet as fleet_command
from burrow.launch.cli import launch
from burrow.net.limits import raise_open_file_limit
from burrow.relay.config import (
    ACME_DIRECTORY,
    ACME_TIMEOUT,
    DNS_RATE_PER_SOURCE,
    DRAIN_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    HEARTBEAT_INTERVAL,
    MAX_PENDING_HANDSHAKES,
    MAX_PENDING_HANDSHAKES_PER_SOURCE,
    MAX_SESSIONS,
    MAX_SESSIONS_PER_TOKEN,
    MAX_TUNNELS_PER_TOKEN,
    TUNNEL_CREATION_BURST,
    TUNNEL_CREATIONS_PER_SECOND,
    RelayConfig,
)
from burrow.sandbox.cli import sandbox_command
from burrow.stop import StopFlag
from burrow.wire import names


def _lazy(name: str) -> ModuleType:
    """Module ``name``, run on first use of one of its names.

    `burrow forward` and `burrow run` need neither the relay's code nor JWT
    and its cryptography, which would take longer to import than the
    forward takes to set up.
    """
    if name in sys.modules:  # imported already: there must be one module object
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.loader is not None, name
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:
    from burrow import tokens
    from burrow.relay import dev, process
    from burrow.tunnel import Tunnel
else:
    tokens = _lazy("burrow.tokens")
    dev = _lazy("burrow.relay.dev")
    process = _lazy("burrow.relay.process")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    raise_open_file_limit()


def _parse_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        lo, hi = int(low), int(high if sep else low)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a port range like 20000-29999") from None
    if not 1 <= lo <= hi <= 65535:
        raise click.BadParameter(f"{text!r} is not a port range within 1-65535")
    return lo, hi


class _Range(click.ParamType):  # type: ignore[type-arg]
    name = "LOW-HIGH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        return _parse_range(str(value))

    def to_text(self, value: tuple[int, int]) -> str:  # configfile.Formats
        return f"{value[0]}-{value[1]}"


_log_level_option = click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
_heartbeat_option = click.option(
    "--heartbeat",
    type=click.IntRange(1, 3600),
    default=HEARTBEAT_INTERVAL,
    show_default=True,
    help="Seconds between heartbeats; a session silent for three is dead (half-open).",
)
_drain_option = click.option(
    "--drain-timeout",
    type=click.FloatRange(0, 3600),
    default=DRAIN_TIMEOUT,
    show_default=True,
    help="Seconds connections in flight may go on after SIGTERM.",
)

_Command = TypeVar("_Command", bound=Callable[..., Any])


def _handshake_options(command: _Command) -> _Command:
    """The limits of unfinished TLS handshakes: what one silent socket may cost."""
    for option in (
        click.option(
            "--max-pending-handshakes-per-source",
            type=click.IntRange(1),
            default=MAX_PENDING_HANDSHAKES_PER_SOURCE,
            show_default=True,
            help="Unfinished TLS handshakes kept per source address (IPv6: per /64); "
            "past it that source's oldest is dropped.",
        ),
        click.option(
            "--max-pending-handshakes",
            type=click.IntRange(1),
            default=MAX_PENDING_HANDSHAKES,
            show_default=True,
            help="Unfinished TLS handshakes kept in all; past it the oldest is dropped.",
        ),
        click.option(
            "--handshake-timeout",
            type=click.FloatRange(min=0, min_open=True),
            default=HANDSHAKE_TIMEOUT,
            show_default=True,
            help="Seconds a TLS handshake may take.",
        ),
    ):
        command = option(command)
    return command


_max_sessions_option = click.option(
    "--max-sessions-per-token",
    type=click.IntRange(1),
    default=MAX_SESSIONS_PER_TOKEN,
    show_default=True,
    help="Sessions (agent processes) one token may hold at once.",
)
_max_tunnels_option = click.option(
    "--max-tunnels-per-token",
    type=click.IntRange(1),
    default=MAX_TUNNELS_PER_TOKEN,
    show_default=True,
    help="Tunnels one token may hold at once across its sessions.",
)
_tunnel_rate_option = click.option(
    "--tunnel-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=TUNNEL_CREATIONS_PER_SECOND,
    show_default=True,
    help=f"New tunnels a token may open per second (after a burst of {TUNNEL_CREATION_BURST}).",
)
_workers_option = click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Relay processes sharing the port; one per core uses every core.",
)
# Where Prometheus, the admin API and the dashboard are served (burrow.relay.admin).
METRICS_PORT: Final = 9100


def _metrics_options(command: _Command) -> _Command:
    """The operator's listener: metrics, health checks, the admin API and the dashboard."""
    for option in (
        click.option(
            "--admin-token-file",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="File holding the bearer token the admin API asks for (one line, 16 "
            "characters or more). Needed for --metrics beyond loopback.",
        ),
        click.option(
            "--metrics",
            "metrics",
            metavar="HOST:PORT",
            default=None,
            help=f"Serve /metrics (Prometheus), /healthz, /readyz, the admin API and a "
            f"dashboard on this address (port {METRICS_PORT} if left out). Off by default.",
        ),
    ):
        command = option(command)
    return command


def _metrics_settings(metrics: str | None, admin_token_file: Path | None) -> dict[str, Any]:
    """RelayConfig's ``metrics_listen`` and ``admin_token`` from the two options."""
    if admin_token_file is not None and metrics is None:
        raise click.UsageError("--admin-token-file is for the --metrics listener: add --metrics")
    if metrics is None:
        return {}
    from burrow.relay.admin import check_listen, read_admin_token

    try:
        listen = names.parse_address(metrics, METRICS_PORT)
        token = read_admin_token(admin_token_file) if admin_token_file is not None else None
        check_listen(listen[0], token)
    except Error as exc:  # a setting that cannot work: as for a wrong option, status 2
        raise click.UsageError(str(exc)) from exc
    return {"metrics_listen": listen, "admin_token": token}


def _print_metrics_url(url: str) -> None:
    click.echo(f"metrics, admin API and dashboard on {url}")


_tcp_ports_option = click.option(
    "--tcp-ports",
    type=_Range(),
    default="20000-29999",
    show_default=True,
    help="Range that raw TCP tunnels get a random port from.",
)


@click.group()
@click.version_option(package_name="burrow")
def main() -> None:
    """burrow: publish a local port through your own relay."""


main.add_command(launch)  # burrow launch jupyter|shell: src/burrow/launch/


# -- relay --------------------------------------------------------------------


@main.command()
@configfile.options  # --config FILE (every option below is a key) and --check-config
@click.option("--domain", required=True, help="The relay's name; tunnels are <label>.DOMAIN.")
@click.option(
    "--cert",
    type=click.Path(path_type=Path),
    default=None,
    help="PEM certificate for DOMAIN and *.DOMAIN (required unless --auto-cert); "
    "replacing the file swaps it in.",
)
@click.option(
    "--key",
    type=click.Path(path_type=Path),
    default=None,
    help="PEM private key of --cert (required unless --auto-cert).",
)
@click.option(
    "--auto-cert",
    is_flag=True,
    default=False,
    help="Get and renew the certificate for DOMAIN and *.DOMAIN through ACME DNS-01 "
    "(the relay answers the challenge as DOMAIN's DNS server); kept in --state-dir.",
)
@click.option(
    "--acme-email",
    default=None,
    metavar="ADDRESS",
    help="Contact address of the relay's ACME account (the CA's notices go there).",
)
@click.option(
    "--acme-directory",
    default=ACME_DIRECTORY,
    show_default=True,
    metavar="URL",
    help="Directory URL of the ACME CA (Let's Encrypt's staging one for trials).",
)
@click.option(
    "--acme-ca-bundle",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    default=None,
    metavar="FILE",
    help="PEM certificates to trust for the ACME server, besides the usual ones "
    "(a private CA, pebble).",
)
@click.option(
    "--acme-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=ACME_TIMEOUT,
    show_default=True,
    help="Seconds to wait for the first certificate before exiting with the reason.",
)
@click.option(
    "--token-key",
    cls=configfile.OneOrMore,
    type=click.Path(path_type=Path),
    multiple=True,
    required=True,
    help="Public key that agent tokens and the fleet document are signed with (burrow "
    "token keygen), or a directory of *.pem public keys; repeat for several (a key "
    "rotation). A token's kid names its key.",
)
@click.option(
    "--fleet",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    default=None,
    metavar="FILE",
    help="The fleet document (burrow fleet sign); re-read when it changes. Its revoked "
    "tokens are refused and their sessions end; agents with an older copy are given it.",
)
@click.option(
    "--revoked-tokens",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    default=None,
    metavar="FILE",
    help="File of revoked token ids, one a line (burrow token revoke); re-read when it "
    "changes, and the sessions of a newly revoked token end.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Where the relay keeps what outlives it: the claim secret that brings agents "
    "their names back after a restart or a new TLS key (back it up), and ACME state. "
    "Created (mode 0700) if missing.",
)
@click.option(
    "--listen",
    multiple=True,
    default=["0.0.0.0:443", "[::]:443"],
    show_default=True,
    help="HOST:PORT of the public TLS port; repeat for several.",
)
@click.option(
    "--public-port",
    type=int,
    default=None,
    help="TLS port visitors see, if a load balancer maps it (default: the listen port).",
)
@_tcp_ports_option
@click.option(
    "--tcp-host", default=None, help="Name visitors use for raw TCP tunnels (default: DOMAIN)."
)
@click.option(
    "--plain-data-listen",
    default=None,
    metavar="HOST:PORT",
    help="Also take data connections WITHOUT TLS here. Trusted networks only: "
    "visitor bytes and session keys cross it in the clear.",
)
@click.option(
    "--public-ip",
    multiple=True,
    metavar="ADDR",
    help="The relay's public address (IPv4 or IPv6; repeat for both), which its DNS "
    "zone gives for DOMAIN, ns1.DOMAIN and *.DOMAIN. Turns the DNS server on.",
)
@click.option(
    "--dns-listen",
    multiple=True,
    metavar="HOST:PORT",
    help="Answer DNS for DOMAIN here, over UDP and TCP; repeat for several. Turns the "
    "DNS server on. [default with --public-ip or --dns-only-acme: port 53 on each "
    "--listen host]",
)
@click.option(
    "--dns-only-acme",
    is_flag=True,
    default=False,
    help="Answer only _acme-challenge.DOMAIN (when DOMAIN's zone lives elsewhere and "
    "delegates just that name here); refuse the rest. Turns the DNS server on.",
)
@click.option(
    "--dns-caa",
    default=None,
    metavar="CA-DOMAIN",
    help="Publish CAA at DOMAIN so that only this CA may issue certificates for it "
    "(letsencrypt.org, RFC 8659); with --auto-cert, only to this relay's ACME account "
    "(RFC 8657).",
)
@click.option(
    "--dns-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=DNS_RATE_PER_SOURCE,
    show_default=True,
    help="UDP queries answered per second per source address (IPv6: /64), after a "
    "burst of twice that; beyond it every other query gets an empty truncated answer.",
)
@_handshake_options
@_heartbeat_option
@_drain_option
@_max_tunnels_option
@_max_sessions_option
@click.option(
    "--max-sessions",
    type=click.IntRange(1),
    default=MAX_SESSIONS,
    show_default=True,
    help="Sessions the relay holds at once; past it agents are told it is full and go "
    "to another relay.",
)
@_tunnel_rate_option
@_workers_option
@_metrics_options
@_log_level_option
def relay(
    domain: str,
    cert: Path | None,
    key: Path | None,
    auto_cert: bool,
    acme_email: str | None,
    acme_directory: str,
    acme_ca_bundle: Path | None,
    acme_timeout: float,
    token_key: tuple[Path, ...],
    fleet: Path | None,
    revoked_tokens: Path | None,
    state_dir: Path | None,
    listen: tuple[str, ...],
    public_port: int | None,
    tcp_ports: tuple[int, int],
    tcp_host: str | None,
    plain_data_listen: str | None,
    public_ip: tuple[str, ...],
    dns_listen: tuple[str, ...],
    dns_only_acme: bool,
    dns_caa: str | None,
    dns_rate: float,
    handshake_timeout: float,
    max_pending_handshakes: int,
    max_pending_handshakes_per_source: int,
    heartbeat: int,
    drain_timeout: float,
    max_tunnels_per_token: int,
    max_sessions_per_token: int,
    max_sessions: int,
    tunnel_rate: float,
    workers: int,
    metrics: str | None,
    admin_token_file: Path | None,
    log_level: str,
) -> None:
    """Run a relay: visitors and agents on one TLS port, raw TCP tunnels on a range."""
    _setup_logging(log_level)
    if auto_cert:
        if cert is not None or key is not None:
            raise click.UsageError("--auto-cert gets the certificate: drop --cert and --key")
        if state_dir is None:
            raise click.UsageError(
                "--auto-cert needs --state-dir: the ACME account and certificate live there"
            )
        cert, key = state_dir / "acme" / "cert.pem", state_dir / "acme" / "key.pem"
    elif cert is None or key is None:
        raise click.UsageError("give --cert and --key, or --auto-cert to get them through ACME")
    try:
        config = RelayConfig(
            domain=names.normalize_domain(domain),
            cert=cert,
            key=key,
            auto_cert=auto_cert,
            acme_email=acme_email,
            acme_directory=acme_directory,
            acme_ca_bundle=acme_ca_bundle,
            acme_timeout=acme_timeout,
            public_key=token_key,
            fleet=fleet,
            revoked_tokens=revoked_tokens,
            state_dir=state_dir,
            listen=tuple(names.parse_address(item, 443) for item in listen),
            public_port=public_port,
            tcp_ports=tcp_ports,
            tcp_host=tcp_host,
            plain_data_listen=(
                names.parse_address(plain_data_listen, 0) if plain_data_listen else None
            ),
            **_dns_settings(listen, public_ip, dns_listen, dns_only_acme, dns_caa, dns_rate),
            handshake_timeout=handshake_timeout,
            max_pending_handshakes=max_pending_handshakes,
            max_pending_handshakes_per_source=max_pending_handshakes_per_source,
            heartbeat=heartbeat,
            drain_timeout=drain_timeout,
            max_tunnels_per_token=max_tunnels_per_token,
            max_sessions_per_token=max_sessions_per_token,
            max_sessions=max_sessions,
            tunnel_creations_per_second=tunnel_rate,
            **_metrics_settings(metrics, admin_token_file),
        )
        if configfile.checking():  # --check-config: valid, so show it and start nothing
            click.echo(configfile.effective_settings(click.get_current_context()))
            return
        process.run_relay(config, workers=workers, on_metrics=_print_metrics_url)
    except (Error, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


def _dns_settings(
    listen: tuple[str, ...],
    public_ips: tuple[str, ...],
    dns_listen: tuple[str, ...],
    only_acme: bool,
    caa: str | None,
    rate: float,
) -> dict[str, Any]:
    """The relay's DNS settings: on when --public-ip, --dns-listen or --dns-only-acme
    is given, listening by default on port 53 of each --listen host."""
    import ipaddress

    from burrow.relay.dns import MAX_ADDRESSES_PER_FAMILY, Zone

    versions = []
    for text in public_ips:
        try:
            versions.append(ipaddress.ip_address(text).version)
        except ValueError:
            raise click.BadParameter(
                f"{text!r} is not an IP address", param_hint="--public-ip"
            ) from None
    if max(versions.count(4), versions.count(6)) > MAX_ADDRESSES_PER_FAMILY:
        raise click.BadParameter(
            f"at most {MAX_ADDRESSES_PER_FAMILY} of each family", param_hint="--public-ip"
        )
    if caa is not None:
        try:
            Zone("caa.invalid", caa_issuer=caa)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--dns-caa") from None
    if dns_listen:
        addresses = [names.parse_address(item, 53) for item in dns_listen]
    elif public_ips or only_acme:
        addresses = [(host, 53) for host, _ in (names.parse_address(i, 443) for i in listen)]
    else:
        addresses = []
    return {
        "public_ips": public_ips,
        "dns_listen": tuple(dict.fromkeys(addresses)),
        "dns_only_acme": only_acme,
        "dns_caa": caa,
        "dns_rate": rate,
        "dns_burst": max(1, round(2 * rate)),
    }


# -- dev ----------------------------------------------------------------------


@main.command("dev")
@click.option(
    "--port",
    type=int,
    default=DEV_PORT,
    show_default=True,
    help="Loopback port of the relay (0 picks a free one).",
)
@click.option(
    "--env-file",
    type=click.Path(path_type=Path),
    default=None,
    help="Also write the client settings here as KEY=VALUE lines.",
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Where the dev CA and keys live [default: $BURROW_STATE_DIR or "
    "~/.local/state/burrow/dev].",
)
@_tcp_ports_option
@click.option(
    "--plain-data",
    is_flag=True,
    help="Let agents use plaintext data connections on loopback (faster; same host only).",
)
@_handshake_options
@_heartbeat_option
@_drain_option
@_max_tunnels_option
@_max_sessions_option
@_tunnel_rate_option
@_workers_option
@_metrics_options
@_log_level_option
def dev_command(
    port: int,
    env_file: Path | None,
    state_dir: Path | None,
    tcp_ports: tuple[int, int],
    plain_data: bool,
    handshake_timeout: float,
    max_pending_handshakes: int,
    max_pending_handshakes_per_source: int,
    heartbeat: int,
    drain_timeout: float,
    max_tunnels_per_token: int,
    max_sessions_per_token: int,
    tunnel_rate: float,
    workers: int,
    metrics: str | None,
    admin_token_file: Path | None,
    log_level: str,
) -> None:
    """Run a relay on loopback for r1.localhost, with a CA it generates and keeps."""
    _setup_logging(log_level)
    state = state_dir or dev.default_state_dir()
    try:
        prepared = dev.prepare(state, port, tcp_ports, plain_data=plain_data)
        prepared = dataclasses.replace(
            prepared,
            config=dataclasses.replace(
                prepared.config,
                handshake_timeout=handshake_timeout,
                max_pending_handshakes=max_pending_handshakes,
                max_pending_handshakes_per_source=max_pending_handshakes_per_source,
                heartbeat=heartbeat,
                drain_timeout=drain_timeout,
                max_tunnels_per_token=max_tunnels_per_token,
                max_sessions_per_token=max_sessions_per_token,
                tunnel_creations_per_second=tunnel_rate,
                **_metrics_settings(metrics, admin_token_file),
            ),
        )
    except (Error, OSError) as exc:
        raise click.ClickException(str(exc)) from exc

    def started(env: dict[str, str], listening: list[tuple[str, int]]) -> None:
        dev.write_env_file(state / dev.ENV_FILE, env)
        if env_file is not None:
            dev.write_env_file(env_file, env)
        dev.write_pid(state)
        hosts = ", ".join(_show(host, p) for host, p in listening)
        click.echo(f"burrow dev relay for {dev.DEV_DOMAIN} on {hosts}")
        click.echo("Client settings (already picked up by `burrow forward` on this machine):")
        for key, value in env.items():
            click.echo(f"  export {key}={value}")
        if env_file is not None:
            click.echo(f"Wrote them to {env_file}")
        click.echo("Press Ctrl-C to stop.", err=True)

    try:
        process.run_relay(
            prepared.config,
            workers=workers,
            loopback=True,
            on_started=lambda port, listening: started(prepared.env(port), listening),
            on_metrics=_print_metrics_url,
        )
    except (Error, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        dev.clear_pid(state)


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- forward ------------------------------------------------------------------


@main.command("forward")
@click.argument("port", type=int)
@click.option("--tcp", is_flag=True, help="Also publish a raw TCP port (unencrypted).")
@click.option("--h2", is_flag=True, help="Offer HTTP/2 to visitors (the local server speaks h2c).")
@click.option(
    "--allow",
    multiple=True,
    metavar="CIDR",
    help="Let only visitors from this network in (10.0.0.0/8, 2001:db8::/32); repeat "
    "for several. Default: everyone.",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="What the agent logs to stderr.",
)
def forward_command(port: int, tcp: bool, h2: bool, allow: tuple[str, ...], log_level: str) -> None:
    """Publish a local PORT until Ctrl-C; prints its URL (and TCP socket)."""
    import burrow

    _setup_logging(log_level)

    # Installed once the tunnel is up: until then a signal ends forward() as it always does.
    stop = StopFlag()
    ended: list[BaseException] = []

    def on_end(reason: BaseException) -> None:
        ended.append(reason)
        stop.set()

    try:
        forwarding = burrow.forward(
            port, unencrypted=tcp, h2_enabled=h2, inbound_cidr_allowlist=list(allow) or None
        )
        with forwarding as tunnel:
            click.echo(tunnel.url)
            if tcp:
                host, tcp_port = tunnel.tcp_socket
                click.echo(f"tcp://{host}:{tcp_port}")
            sys.stdout.flush()
            stop.install()
            forwarding.when_ended(on_end)
            forwarding.on_move(_print_move)
            stop.wait()
            if ended:  # the relay ended the session for good (revoked, an operator)
                raise ended[0] if isinstance(ended[0], Error) else Error(str(ended[0]))
    except Error as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


def _print_move(old: Tunnel, new: Tunnel) -> None:
    """A forward's tunnel moved to another relay (its own gone): its new addresses."""
    click.echo(f"the relay went away; moved to {new.url}")
    if new.unencrypted_port is not None:
        host, port = new.tcp_socket
        click.echo(f"the relay went away; raw TCP moved to tcp://{host}:{port}")
    sys.stdout.flush()


# -- run ----------------------------------------------------------------------


@main.command(
    "run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_command(command: tuple[str, ...]) -> None:
    """Run COMMAND as a workload: burrow.forward() works inside it, and each port is
    forwarded once across all of its processes. Its exit code is burrow's."""
    from burrow.agent import client
    from burrow.agent.session import pin_relay

    try:
        config = client.Client().config()
    except Error as exc:
        raise click.ClickException(str(exc)) from exc
    # A `burrow run` inside a workload stays part of it. Its processes share one relay.
    workload = config.workload or secrets.token_urlsafe(16)
    try:
        config = client.runtime.run(pin_relay(config))
    except Error as exc:
        raise click.ClickException(str(exc)) from exc
    env = client.workload_env(dataclasses.replace(config, workload=workload))
    try:
        proc = subprocess.Popen(list(command), env=env)
    except OSError as exc:
        raise click.ClickException(f"cannot run {command[0]}: {exc}") from exc
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    code = proc.wait()
    sys.exit(128 - code if code < 0 else code)


# -- sandbox ------------------------------------------------------------------

main.add_command(sandbox_command)


# -- token --------------------------------------------------------------------


@main.group()
def token() -> None:
    """Signing keys and agent tokens."""


@token.command("keygen")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Directory for token-signing.pem (secret) and token-public.pem (for relays).",
)
def token_keygen(out: Path) -> None:
    """Create a signing key pair; relays need only the public half."""
    out.mkdir(parents=True, exist_ok=True)
    key = tokens.generate_signing_key()
    try:
        tokens.write_signing_key(key, out / dev.SIGNING_KEY_FILE)
        tokens.write_public_key(key, out / dev.PUBLIC_KEY_FILE)
    except Error as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"signing key (keep secret): {out / dev.SIGNING_KEY_FILE}")
    click.echo(f"public key (give to relays as --token-key): {out / dev.PUBLIC_KEY_FILE}")


@token.command("mint")
@click.option("--key", type=click.Path(path_type=Path), required=True, help="The signing key.")
@click.option("--subject", default="agent", show_default=True, help="Who the token is for.")
@click.option(
    "--ttl", default="30d", show_default=True, help="Lifetime: 90s, 15m, 12h, 30d, 1w, or 'never'."
)
@click.option("--max-tunnels", type=int, default=None, help="Tunnels the token may hold at once.")
@click.option(
    "--relay",
    "relays",
    multiple=True,
    metavar="DOMAIN",
    help="A relay (its domain) that accepts the token; repeat for more. Default: every relay.",
)
def token_mint(
    key: Path, subject: str, ttl: str, max_tunnels: int | None, relays: tuple[str, ...]
) -> None:
    """Print a new agent token (the value of BURROW_TOKEN)."""
    try:
        signing_key = tokens.read_signing_key(key)
        click.echo(
            tokens.mint(
                signing_key,
                subject=subject,
                ttl_seconds=tokens.parse_duration(ttl),
                max_tunnels=max_tunnels,
                relays=relays or None,
            )
        )
    except Error as exc:
        raise click.ClickException(str(exc)) from exc


@token.command("revoke")
@click.option(
    "--list",
    "list_file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The revocation file relays read (--revoked-tokens); created if missing.",
)
@click.argument("token_or_id")
def token_revoke(list_file: Path, token_or_id: str) -> None:
    """Revoke a token: add its id to a revocation list. TOKEN_OR_ID is a whole token or its id.

    Relays that read the list refuse the token from then on and end its live
    sessions within seconds. No key is needed: a token's id is not secret.
    """
    value = token_or_id.strip()
    try:
        if "." in value:
            token_id = tokens.token_id_of(value)
            note = _revocation_note(value)
        else:
            token_id, note = value, ""
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        note = f"{note}, revoked {stamp}" if note else f"revoked {stamp}"
        added = tokens.append_revocation(list_file, token_id, note)
    except Error as exc:
        raise click.ClickException(str(exc)) from exc
    if added:
        click.echo(f"revoked token {token_id} in {list_file}")
    else:
        click.echo(f"token {token_id} was already revoked in {list_file}")


def _revocation_note(token: str) -> str:
    """``subject <name>`` from an unverified token, for the comment beside its id."""
    subject = tokens.unverified_subject(token)
    return f"subject {subject}" if subject else ""


@token.command("verify")
@click.option("--token-key", type=click.Path(path_type=Path), required=True, help="The public key.")
@click.argument("value")
def token_verify(token_key: Path, value: str) -> None:
    """Check a token the way a relay does and show what it grants."""
    try:
        grant = tokens.verify(value, tokens.read_public_key(token_key))
    except Error as exc:
        raise click.ClickException(str(exc)) from exc
    for field, item in dataclasses.asdict(grant).items():
        click.echo(f"{field}: {item}")


# -- demo ---------------------------------------------------------------------


@main.command()
@click.option("--keep", is_flag=True, help="Keep the tunnel up until Ctrl-C.")
def demo(keep: bool) -> None:
    """Start a dev relay and a web page, forward it, and fetch it through its public URL."""
    from burrow.demo import run_demo

    try:
        run_demo(keep=keep)
    except Error as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc


# -- admin --------------------------------------------------------------------

# burrow admin status|sessions|tunnels|kick|revoke: a relay's admin API (burrow/admincli.py).
main.add_command(admin_command)

# burrow fleet sign|verify: the signed fleet document (burrow/fleetcli.py).
main.add_command(fleet_command)
