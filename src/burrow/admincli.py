"""``burrow admin``: a relay's admin API (``burrow relay --metrics``) from a terminal.

Plain HTTP with the standard library and no relay code, so the command is as
quick to start as ``burrow --help``; JWT is loaded only to read a whole
token's id. Every failure is one line that says what to do about it.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from burrow._version import __version__

if TYPE_CHECKING:
    import urllib.request

ENV_URL = "BURROW_ADMIN_URL"
ENV_TOKEN_FILE = "BURROW_ADMIN_TOKEN_FILE"
DEFAULT_URL = "http://127.0.0.1:9100"

# The relay answers from memory; a listener that says nothing for this long is
# stuck or is not a relay, and a terminal should not hang on it.
TIMEOUT_SECONDS = 10.0

# An admin token is a line of hex; a file far larger is the wrong file.
MAX_TOKEN_FILE_BYTES = 4096

F = TypeVar("F", bound=Callable[..., Any])


class AdminError(click.ClickException):
    """A call to the admin API failed; the message is the one line to show."""


@dataclass(frozen=True)
class AdminClient:
    """Calls to one relay's admin listener."""

    url: str
    """``http://HOST:PORT`` of the listener, without a trailing slash."""

    token: str | None
    """The bearer token (``--admin-token-file`` on the relay), if any."""

    def get(self, path: str) -> tuple[dict[str, Any], str]:
        return self.call("GET", path)

    def call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], str]:
        """The answer to ``method path`` as parsed JSON, and its text as sent."""
        import urllib.error
        import urllib.request

        headers = {"Accept": "application/json", "User-Agent": f"burrow-admin/{__version__}"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with _opener().open(request, timeout=TIMEOUT_SECONDS) as response:
                text = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as exc:
            with exc:
                try:
                    text = exc.read().decode("utf-8", errors="replace")
                except OSError:
                    text = ""
            raise self._refusal(exc.code, text) from None
        except urllib.error.URLError as exc:
            raise self._unreachable(exc.reason) from None
        except OSError as exc:  # a timeout or a reset while reading the answer
            raise self._unreachable(exc) from None
        return self._parse(text), text

    def _parse(self, text: str) -> dict[str, Any]:
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise AdminError(
                f"{self.url} did not answer with a JSON object: is it a burrow relay's "
                "admin listener (--metrics)?"
            )
        return answer

    def _unreachable(self, reason: object) -> AdminError:
        if isinstance(reason, ConnectionRefusedError):
            return AdminError(
                f"nothing listens at {self.url} (connection refused): start the relay with "
                "--metrics HOST:PORT, or give its address with --url or "
                f"{ENV_URL}"
            )
        if isinstance(reason, TimeoutError):
            return AdminError(f"{self.url} did not answer within {TIMEOUT_SECONDS:g} s")
        what = getattr(reason, "strerror", None) or reason
        return AdminError(f"cannot reach {self.url}: {what}")

    def _refusal(self, status: int, text: str) -> AdminError:
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        said = answer.get("error") if isinstance(answer, dict) else None
        said = _printable(said) if isinstance(said, str) and said else None
        if status == 401:
            if self.token is None:
                return AdminError(
                    "the relay wants an admin token: pass --token-file with the file "
                    f"given to its --admin-token-file (or set {ENV_TOKEN_FILE})"
                )
            return AdminError(
                "the relay refused the admin token: pass --token-file with the file "
                "given to its --admin-token-file"
            )
        if said is None:
            return AdminError(f"{self.url} answered HTTP {status} without an error message")
        if status >= 500:
            return AdminError(f"the relay failed: {said} (HTTP {status})")
        return AdminError(f"the relay refused: {said} (HTTP {status})")


def _opener() -> urllib.request.OpenerDirector:
    """urllib without proxies or redirects: the bearer token goes to ``--url`` alone."""
    import urllib.request

    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None  # the 3xx is then an HTTPError, with its status

    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


# -- options ------------------------------------------------------------------


def _check_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter(f"{value!r} is not a URL like {DEFAULT_URL}")
    if parts.query or parts.fragment:
        raise click.BadParameter(f"{value!r}: give the listener's address without ? or #")
    return value.rstrip("/")


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise AdminError(f"cannot read the admin token file {path}: {exc.strerror}") from None
    if len(raw) > MAX_TOKEN_FILE_BYTES:
        raise AdminError(f"the admin token file {path} is over {MAX_TOKEN_FILE_BYTES} bytes")
    # Its first line, as the relay reads it (burrow.relay.admin.read_admin_token).
    text = raw.decode("utf-8", errors="replace").strip()
    token = text.splitlines()[0].strip() if text else ""
    if not token:
        raise AdminError(f"the admin token file {path} is empty")
    return token


def _api_options(command: F) -> F:
    """--url, --token-file and --json, on each command (``burrow admin sessions --json``)."""
    options = (
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print the relay's JSON answer as it came.",
        ),
        click.option(
            "--token-file",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar=ENV_TOKEN_FILE,
            show_envvar=True,
            help="File holding the admin token (the relay's --admin-token-file).",
        ),
        click.option(
            "--url",
            default=DEFAULT_URL,
            envvar=ENV_URL,
            show_envvar=True,
            show_default=True,
            callback=_check_url,
            help="The relay's admin listener (its --metrics address).",
        ),
    )
    for option in options:
        command = option(command)
    return command


def _client(url: str, token_file: Path | None) -> AdminClient:
    return AdminClient(url=url, token=_read_token(token_file))


def _print_json(text: str) -> None:
    click.echo(text if text.endswith("\n") else text + "\n", nl=False)


# -- the commands ---------------------------------------------------------------


@click.group()
def admin() -> None:
    """See into a running relay and steer it, over its admin listener (--metrics)."""


@admin.command()
@_api_options
def status(url: str, token_file: Path | None, as_json: bool) -> None:
    """The relay, its certificate, its counts and its last refusals."""
    answer, text = _client(url, token_file).get("/api/status")
    if as_json:
        _print_json(text)
    else:
        click.echo(format_status(answer, now=time.time()), nl=False)


@admin.command()
@_api_options
def sessions(url: str, token_file: Path | None, as_json: bool) -> None:
    """The agents connected now, one a line."""
    answer, text = _client(url, token_file).get("/api/sessions")
    if as_json:
        _print_json(text)
    else:
        click.echo(format_sessions(_rows(answer, "sessions"), now=time.time()), nl=False)


@admin.command()
@_api_options
def tunnels(url: str, token_file: Path | None, as_json: bool) -> None:
    """The tunnels open now (their names shortened), one a line."""
    answer, text = _client(url, token_file).get("/api/tunnels")
    if as_json:
        _print_json(text)
    else:
        click.echo(format_tunnels(_rows(answer, "tunnels")), nl=False)


@admin.command()
@_api_options
@click.argument("session_id")
def kick(url: str, token_file: Path | None, as_json: bool, session_id: str) -> None:
    """End one session: its tunnels close and its agent stops with an error."""
    path = "/api/sessions/" + urllib.parse.quote(session_id, safe="")
    answer, text = _client(url, token_file).call("DELETE", path)
    if as_json:
        _print_json(text)
    else:
        click.echo(f"ended session {_printable(answer.get('ended', session_id))}")


@admin.command()
@_api_options
@click.argument("token_or_id")
def revoke(url: str, token_file: Path | None, as_json: bool, token_or_id: str) -> None:
    """Revoke a token at once: TOKEN_OR_ID is a whole token or its id.

    The relay adds the id to its --revoked-tokens file and ends the token's
    sessions; other relays of a fleet need the id in their own files.
    """
    client = _client(url, token_file)
    token_id = _token_id(token_or_id)
    answer, text = client.call("POST", "/api/revoke", {"token_id": token_id})
    if as_json:
        _print_json(text)
        return
    ended = answer.get("sessions_ended", 0)
    noun = "session" if ended == 1 else "sessions"
    revoked = _printable(answer.get("revoked", token_id))
    click.echo(f"revoked token {revoked} ({ended} {noun} ended)")


def _token_id(token_or_id: str) -> str:
    """The id of a whole token (read as ``burrow token revoke`` does), or the id given."""
    value = token_or_id.strip()
    if "." not in value:
        return value
    from burrow import tokens  # JWT and its cryptography: only for a whole token
    from burrow.exception import Error

    try:
        return tokens.token_id_of(value)
    except Error as exc:
        raise AdminError(str(exc)) from exc


# -- what a person reads -----------------------------------------------------------


def _rows(answer: dict[str, Any], key: str) -> list[dict[str, Any]]:
    rows = answer.get(key)
    if not isinstance(rows, list):
        raise AdminError(f"the relay's answer has no list of {key}")
    return [row for row in rows if isinstance(row, dict)]


def _printable(value: object) -> str:
    """``value`` as one line a terminal shows as is.

    Subjects come from tokens and agent versions from agents: neither may move
    the cursor or start an escape sequence.
    """
    text = "-" if value is None else str(value)
    return "".join(c if c.isprintable() else "?" for c in text)


def _bytes(value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    amount = float(value)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if amount < 1000 or unit == "TB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1000
    raise AssertionError("unreachable")


def _duration(seconds: object) -> str:
    """``3d 4h``, ``2h 5m``, ``7m 12s``, ``9s``: the two largest units."""
    if not isinstance(seconds, int | float):
        return "-"
    left = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size or (unit == "s" and not parts):
            parts.append(f"{left // size}{unit}")
            left %= size
        if len(parts) == 2:
            break
    return " ".join(parts)


def _age(since: object, now: float) -> str:
    if not isinstance(since, int | float):
        return "-"
    return _duration(now - since)


def _utc(timestamp: object) -> str:
    if not isinstance(timestamp, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int]) -> str:
    """Aligned columns, the ``right`` ones (numbers) flush right; one line a row."""
    cells = [list(headers), *([_printable(cell) for cell in row] for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]
    lines = []
    for line in cells:
        padded = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines) + "\n"


SESSION_COLUMNS = (
    "ID",
    "SUBJECT",
    "TOKEN",
    "PEER",
    "AGENT",
    "UP",
    "TUNNELS",
    "VISITORS",
    "TO-AGENT",
    "TO-VISITOR",
    "WORKER",
)
TUNNEL_COLUMNS = (
    "NAME",
    "KIND",
    "PORT",
    "SESSION",
    "SUBJECT",
    "TOKEN",
    "VISITORS",
    "TO-AGENT",
    "TO-VISITOR",
    "AGE",
    "WORKER",
)


def format_sessions(rows: Sequence[dict[str, Any]], now: float) -> str:
    if not rows:
        return "no sessions\n"
    return table(
        SESSION_COLUMNS,
        [
            (
                row.get("id"),
                row.get("subject"),
                row.get("token_id"),
                row.get("peer"),
                row.get("agent"),
                _age(row.get("connected_since"), now),
                row.get("tunnels"),
                row.get("visitors"),
                _bytes(row.get("bytes_to_agent")),
                _bytes(row.get("bytes_to_visitor")),
                row.get("worker"),
            )
            for row in rows
        ],
        right={5, 6, 7, 8, 9, 10},
    )


def format_tunnels(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "no tunnels\n"
    return table(
        TUNNEL_COLUMNS,
        [
            (
                row.get("name"),
                row.get("kind"),
                row.get("tcp_port"),
                row.get("session"),
                row.get("subject"),
                row.get("token_id"),
                row.get("visitors"),
                _bytes(row.get("bytes_to_agent")),
                _bytes(row.get("bytes_to_visitor")),
                _duration(row.get("age_seconds")),
                row.get("worker"),
            )
            for row in rows
        ],
        right={2, 6, 7, 8, 9, 10},
    )


def format_status(answer: dict[str, Any], now: float) -> str:
    """The status as ``name  value`` lines, then the last refusals as a table."""
    relay = _section(answer, "relay")
    cert = _section(answer, "certificate")
    counts = _section(answer, "counts")

    state = "draining" if relay.get("draining") else "ready" if relay.get("ready") else "not ready"
    workers = relay.get("workers")
    relay_line = (
        f"{_printable(relay.get('domain'))} (burrow {_printable(relay.get('version'))}), "
        f"public port {_printable(relay.get('public_port'))}, "
        f"{_printable(workers)} worker{'' if workers == 1 else 's'}, "
        f"up {_duration(relay.get('uptime_seconds'))}, {state}"
    )
    expires_in = cert.get("expires_in_seconds")
    if isinstance(expires_in, int | float) and expires_in <= 0:
        when = f"expired {_duration(-expires_in)} ago"
    else:
        when = f"in {_duration(expires_in)}"
    cert_line = f"expires {_utc(cert.get('not_after'))} ({when})"
    if cert.get("valid") is False:
        cert_line += ", NOT VALID NOW"
    cert_line += f", serial {_printable(cert.get('serial'))}"

    by_kind = counts.get("tunnels_by_kind")
    kinds = ""
    if isinstance(by_kind, dict) and by_kind:
        kinds = " (" + ", ".join(f"{_printable(k)} {_printable(v)}" for k, v in by_kind.items())
        kinds += ")"
    fields = [
        ("relay", relay_line),
        ("admin token", "required" if relay.get("auth") else "none (loopback, read only)"),
        ("certificate", cert_line),
        ("sessions", _printable(counts.get("sessions"))),
        ("tunnels", _printable(counts.get("tunnels")) + kinds),
        ("visitors", f"{_printable(counts.get('visitors'))} now"),
        (
            "bytes",
            f"{_bytes(counts.get('bytes_to_agent'))} to agents, "
            f"{_bytes(counts.get('bytes_to_visitor'))} to visitors",
        ),
        ("handshakes", f"{_printable(counts.get('handshakes_pending'))} unfinished"),
        ("data pool", f"{_printable(counts.get('pooled_data_connections'))} idle connections"),
        ("revoked", f"{_printable(counts.get('revoked_tokens'))} tokens listed"),
    ]
    width = max(len(name) for name, _ in fields)
    out = "".join(f"{name.ljust(width)}  {value}\n" for name, value in fields)

    refusals = [r for r in answer.get("refusals") or () if isinstance(r, dict)]
    if not refusals:
        return out + "\nno refusals\n"
    # Ages by the relay's clock when it says what that reads: it stamped them.
    started, uptime = relay.get("started"), relay.get("uptime_seconds")
    if isinstance(started, int | float) and isinstance(uptime, int | float):
        now = started + uptime
    rows = [
        (
            _age(r.get("time"), now) + " ago",
            r.get("reason"),
            r.get("peer"),
            r.get("message"),
        )
        for r in refusals
    ]
    if len(refusals) == 1:
        out += "\nthe last refusal:\n"
    else:
        out += f"\nthe last {len(refusals)} refusals, newest last:\n"
    return out + table(("WHEN", "REASON", "PEER", "MESSAGE"), rows, right={0})


def _section(answer: dict[str, Any], key: str) -> dict[str, Any]:
    section = answer.get(key)
    return section if isinstance(section, dict) else {}
