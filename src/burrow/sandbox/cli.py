"""``burrow sandbox``: run a command in a sandbox from the shell, its ports published."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import click

from burrow.exception import Error, SandboxTimeoutError
from burrow.sandbox import DEFAULT_TIMEOUT, EXIT_TIMEOUT, MAX_TIMEOUT, IsolationLevel, Sandbox
from burrow.stop import StopFlag

_PORT = click.IntRange(1, 65535)


def _parse_env(items: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="'-e'")
        env[key] = value
    return env


@click.command(
    "sandbox", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.option(
    "-p", "--port", "ports", multiple=True, type=_PORT, help="Publish PORT at an https:// URL."
)
@click.option(
    "--tcp-port", multiple=True, type=_PORT, help="Publish PORT at https:// and a raw TCP port."
)
@click.option("--h2-port", multiple=True, type=_PORT, help="Publish PORT with HTTP/2 (h2c).")
@click.option(
    "--allow", multiple=True, metavar="CIDR", help="Let only this network visit; repeatable."
)
@click.option(
    "--timeout",
    type=click.FloatRange(0, MAX_TIMEOUT, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds until the sandbox is killed.",
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Its writable working directory [default: a fresh temporary one].",
)
@click.option(
    "-e", "--env", "env_items", multiple=True, metavar="KEY=VALUE", help="Set a variable."
)
@click.option(
    "--isolation",
    type=click.Choice(["auto", *(level.value for level in IsolationLevel)]),
    default="auto",
    show_default=True,
    help="Require this isolation level (auto: the best that works here).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def sandbox_command(
    ports: tuple[int, ...],
    tcp_port: tuple[int, ...],
    h2_port: tuple[int, ...],
    allow: tuple[str, ...],
    timeout: float,
    workdir: Path | None,
    env_items: tuple[str, ...],
    isolation: str,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a sandbox and publish its ports while it lives.

    Prints each port's URL (and TCP socket) once published, then the
    command's own output; exits with its code (124 after --timeout).
    Ctrl-C or SIGTERM ends the sandbox.
    """
    env = _parse_env(env_items)
    try:
        sb = Sandbox.create(
            *command,
            encrypted_ports=ports,
            unencrypted_ports=tcp_port,
            h2_ports=h2_port,
            inbound_cidr_allowlist=list(allow) or None,
            timeout=timeout,
            workdir=workdir,
            env=env,
            isolation=isolation,
            capture_output=False,
        )
    except Error as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc

    stop = StopFlag()
    stop.install()
    click.echo(f"sandbox {sb.object_id}: isolation {sb.isolation}", err=True)
    try:
        for port, tunnel in sorted(sb.tunnels().items()):
            click.echo(f"port {port}: {tunnel.url}")
            if tunnel.unencrypted_port is not None:
                host, tcp = tunnel.tcp_socket
                click.echo(f"port {port}: tcp://{host}:{tcp}")
        sys.stdout.flush()
    except Error as exc:
        sb.terminate()
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc

    def waiter() -> None:
        try:
            sb.wait(raise_on_termination=False)
        except SandboxTimeoutError:
            pass
        finally:
            stop.set()

    threading.Thread(target=waiter, name="sandbox-wait", daemon=True).start()
    stop.wait()
    if stop.signal is not None:
        sb.terminate()
        sys.exit(128 + stop.signal)
    code = sb.returncode
    if code == EXIT_TIMEOUT:
        click.echo(f"burrow: sandbox {sb.object_id} ran past {timeout:g}s and was killed", err=True)
    assert code is not None
    sys.exit(128 - code if code < 0 else code)
