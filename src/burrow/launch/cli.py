"""``burrow launch``: the launcher commands. Their servers are imported only when they run."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from burrow.exception import Error
from burrow.launch import DEFAULT_MAX_SHELLS, require

_allow_option = click.option(
    "--allow",
    multiple=True,
    metavar="CIDR",
    help="Let only visitors from this network in (10.0.0.0/8, 2001:db8::/32); repeat "
    "for several. Default: everyone with the URL.",
)


def _print_url(url: str) -> None:
    click.echo(url)
    sys.stdout.flush()
    click.echo("Anyone with this URL gets in; press Ctrl-C to stop.", err=True)


@click.group()
def launch() -> None:
    """Start a server behind a tunnel, guarded by a fresh token: Jupyter, a browser shell."""


@launch.command(
    "jupyter", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.option(
    "--app",
    type=click.Choice(["lab", "notebook", "server"]),
    default="lab",
    show_default=True,
    help="JupyterLab, Notebook 7, or a bare Jupyter Server (REST API and kernels only).",
)
@click.option(
    "--notebook-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Directory Jupyter works in [default: the current one].",
)
@_allow_option
@click.argument("jupyter_args", nargs=-1, type=click.UNPROCESSED)
def launch_jupyter(
    app: str, notebook_dir: Path | None, allow: tuple[str, ...], jupyter_args: tuple[str, ...]
) -> None:
    """Run Jupyter behind a tunnel until Ctrl-C; prints its URL with the token.

    Arguments after -- go to Jupyter, for example:

    \b
      burrow launch jupyter -- --ServerApp.log_level=WARN
    """
    from burrow.launch.jupyter import JupyterOptions, run_jupyter

    options = JupyterOptions(
        app=app,
        notebook_dir=notebook_dir,
        allow=list(allow) or None,
        extra_args=jupyter_args,
    )
    try:
        code = run_jupyter(options, _print_url)
    except Error as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    sys.exit(code)


@launch.command("shell")
@click.option(
    "--command",
    default=None,
    metavar="COMMAND",
    help="Run this in each tab instead of your shell, e.g. 'tmux new -A -s main' "
    "to share one session between tabs.",
)
@click.option(
    "--cwd",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Directory the shells start in [default: the current one].",
)
@click.option(
    "--max-shells",
    type=click.IntRange(1, 1000),
    default=DEFAULT_MAX_SHELLS,
    show_default=True,
    help="Shells (browser tabs) open at once.",
)
@_allow_option
def launch_shell(
    command: str | None, cwd: Path | None, max_shells: int, allow: tuple[str, ...]
) -> None:
    """A terminal in the browser behind a tunnel until Ctrl-C; prints its URL with the token.

    Each browser tab gets a shell of its own, which is hung up when the tab closes.
    """
    try:
        require("terminado", "burrow[shell]", "The browser shell's server (terminado)")
        from burrow.launch.shell import ShellOptions, run_shell, shell_argv

        options = ShellOptions(
            command=shell_argv(command) if command is not None else None,
            cwd=cwd,
            allow=list(allow) or None,
            max_shells=max_shells,
        )
        code = run_shell(options, _print_url)
    except Error as exc:
        raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc
    sys.exit(code)
