"""``burrow admin`` against a real relay's admin listener (``--metrics``).

Each test starts a relay on loopback with its admin listener, real agents
(``burrow.forward``) and real visitors, and drives the command through
click's runner, reading back what a person or a script would read.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import free_port, http_server, tcp_echo_server
from click.testing import CliRunner, Result
from harness import RelayHarness, run_relay, wait_until

import burrow
from burrow import Tunnel, admincli, tokens
from burrow.agent.session import AgentSession
from burrow.exception import AuthError, RelayError
from burrow.wire import protocol

ADMIN_TOKEN = "s3cret-admin-token"

# Only a hung test waits this long.
TIMEOUT = 10.0


# -- relays and the command ---------------------------------------------------------


@contextlib.contextmanager
def admin_relay(tmp_path: Path, **overrides: Any) -> Iterator[RelayHarness]:
    """A relay with its admin listener on 127.0.0.1, an admin token and a revocation file."""
    revoked = tmp_path / "revoked-tokens"
    revoked.write_text("# revoked burrow tokens\n")
    settings: dict[str, Any] = {
        "metrics_listen": ("127.0.0.1", 0),
        "admin_token": ADMIN_TOKEN,
        "revoked_tokens": revoked,
    }
    settings.update(overrides)
    with run_relay(tmp_path / "relay", **settings) as relay:
        yield relay


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayHarness]:
    with admin_relay(tmp_path) as relay:
        yield relay


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-token"
    path.write_text(ADMIN_TOKEN + "\n")  # as `openssl rand -hex 32 > file` leaves it
    path.chmod(0o600)
    return path


def url_of(relay: RelayHarness) -> str:
    url: str = relay.thread.admin.url
    return url


def admin(url: str, *args: str, token_file: Path | None = None) -> Result:
    """``burrow admin ARGS --url URL [--token-file FILE]``, with neither set in the environment."""
    options = ["--url", url]
    if token_file is not None:
        options += ["--token-file", str(token_file)]
    return CliRunner().invoke(
        admincli.admin,
        [*args, *options],
        env={admincli.ENV_URL: None, admincli.ENV_TOKEN_FILE: None},
        catch_exceptions=False,
    )


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.output)
    assert result.stderr == ""
    return result.stdout


def failed(result: Result) -> str:
    """The one line of a failure (exit 1, nothing on stdout)."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def api(relay: RelayHarness, token_file: Path, command: str) -> Any:
    return json.loads(ok(admin(url_of(relay), command, "--json", token_file=token_file)))


def live_session_ids(relay: RelayHarness, token_file: Path) -> set[str]:
    return {row["id"] for row in api(relay, token_file, "sessions")["sessions"]}


def label_of(tunnel: Tunnel) -> str:
    return tunnel.host.split(".", 1)[0]


def fetch(relay: RelayHarness, tunnel: Tunnel) -> bytes:
    """One HTTPS request to ``tunnel`` on a fresh connection; the whole reply."""
    context = ssl.create_default_context(cafile=str(relay.ca))
    with (
        socket.create_connection(("127.0.0.1", relay.port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=tunnel.host) as sock,
    ):
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {tunnel.host}\r\nConnection: close\r\n\r\n".encode())
        reply = bytearray()
        while chunk := sock.recv(65536):
            reply += chunk
        return bytes(reply)


def serves(relay: RelayHarness, tunnel: Tunnel, marker: str) -> bool:
    reply = fetch(relay, tunnel)
    return reply.startswith(b"HTTP/1.1 200 ") and marker.encode() in reply


def agent_of(opening: burrow.forward) -> AgentSession:
    agent = opening._session
    assert isinstance(agent, AgentSession)
    return agent


# -- reading ------------------------------------------------------------------------


def test_status_shows_the_relay_its_certificate_and_counts(
    relay: RelayHarness, token_file: Path
) -> None:
    with (
        http_server(marker="status-page") as server,
        tcp_echo_server() as echo,
        burrow.forward(server.port, client=relay.client()),
        burrow.forward(echo.port, unencrypted=True, client=relay.client()),
    ):
        status = api(relay, token_file, "status")
        text = ok(admin(url_of(relay), "status", token_file=token_file))

    assert status["relay"]["domain"] == "r1.localhost"
    assert status["relay"]["auth"] is True
    assert status["counts"]["sessions"] == 1
    assert status["counts"]["tunnels"] == 2
    assert status["counts"]["tunnels_by_kind"] == {"https": 1, "tcp": 1, "h2": 0}

    fields = status_fields(text)
    assert fields["relay"].startswith(f"r1.localhost (burrow {burrow.__version__}), ")
    assert fields["relay"].endswith(", ready")
    assert fields["admin token"] == "required"
    assert fields["certificate"].startswith("expires ")
    assert fields["certificate"].endswith(f"serial {status['certificate']['serial']}")
    assert fields["sessions"] == "1"
    assert fields["tunnels"] == "2 (https 1, tcp 1, h2 0)"
    assert fields["visitors"] == "0 now"
    assert text.endswith("\nno refusals\n")


def status_fields(text: str) -> dict[str, str]:
    """``name  value`` lines up to the first blank one; names line up in one column."""
    head = text.split("\n\n", 1)[0].splitlines()
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in head)
    starts = {line.index(value) for line, value in zip(head, fields.values(), strict=True)}
    assert len(starts) == 1, text  # aligned
    return fields


def test_status_lists_the_last_refusals(relay: RelayHarness, token_file: Path) -> None:
    host = "nosuchtunnel.r1.localhost"
    reply = fetch(relay, Tunnel(host=host, port=relay.port))
    assert reply.startswith(b"HTTP/1.1 404 ")

    refusals = api(relay, token_file, "status")["refusals"]
    assert [r["reason"] for r in refusals] == ["unknown-name"]
    text = ok(admin(url_of(relay), "status", token_file=token_file))
    assert "\nthe last refusal:\n" in text
    (line,) = [line for line in text.splitlines() if "unknown-name" in line]
    assert re.match(r"\s*(\d+[dhms] )+ago  unknown-name  127\.0\.0\.1:\d+  ", line), line
    assert "nosuchtunnel" not in text  # a name someone tried is not printed whole


def test_sessions_are_listed_one_a_line(relay: RelayHarness, token_file: Path) -> None:
    alice, bob = relay.mint("alice"), relay.mint("bob")
    with (
        http_server() as alice_server,
        http_server() as bob_server,
        burrow.forward(alice_server.port, client=relay.client(alice)),
        burrow.forward(bob_server.port, client=relay.client(bob)),
    ):
        rows = api(relay, token_file, "sessions")["sessions"]
        text = ok(admin(url_of(relay), "sessions", token_file=token_file))

    by_subject = {row["subject"]: row for row in rows}
    assert sorted(by_subject) == ["alice", "bob"]
    assert by_subject["alice"]["token_id"] == tokens.token_id_of(alice)
    assert by_subject["alice"]["agent"] == f"burrow/{burrow.__version__}"
    assert by_subject["alice"]["tunnels"] == 1

    header, *lines = text.splitlines()
    assert header.split()[:5] == ["ID", "SUBJECT", "TOKEN", "PEER", "AGENT"]
    assert len(lines) == 2
    for row in rows:
        (line,) = [line for line in lines if line.startswith(row["id"] + " ")]
        assert line.split()[1:5] == [row["subject"], row["token_id"], row["peer"], row["agent"]]
    # Aligned: every line's second column starts where the header's does.
    column = header.index("SUBJECT")
    assert all(line[column - 2 : column] == "  " and line[column] != " " for line in lines)


def test_no_sessions_says_so(relay: RelayHarness, token_file: Path) -> None:
    assert ok(admin(url_of(relay), "sessions", token_file=token_file)) == "no sessions\n"
    assert ok(admin(url_of(relay), "tunnels", token_file=token_file)) == "no tunnels\n"
    assert api(relay, token_file, "sessions") == {"sessions": []}


def test_tunnels_show_a_short_name_and_never_the_whole_label(
    relay: RelayHarness, token_file: Path
) -> None:
    with (
        http_server() as server,
        tcp_echo_server() as echo,
        burrow.forward(server.port, client=relay.client()) as web,
        burrow.forward(echo.port, unencrypted=True, client=relay.client()) as raw,
    ):
        rows = api(relay, token_file, "tunnels")["tunnels"]
        text = ok(admin(url_of(relay), "tunnels", token_file=token_file))
        (session,) = live_session_ids(relay, token_file)

    by_kind = {row["kind"]: row for row in rows}
    assert sorted(by_kind) == ["https", "tcp"]
    assert by_kind["https"]["name"] == label_of(web)[:4] + "…"
    assert by_kind["tcp"]["name"] == label_of(raw)[:4] + "…"
    assert by_kind["tcp"]["tcp_port"] == raw.tcp_socket[1]
    assert {row["session"] for row in rows} == {session}

    for label in (label_of(web), label_of(raw)):
        assert label not in text
    header, *lines = text.splitlines()
    assert header.split()[:4] == ["NAME", "KIND", "PORT", "SESSION"]
    (tcp_line,) = [line for line in lines if line.split()[1] == "tcp"]
    assert tcp_line.split()[:4] == [label_of(raw)[:4] + "…", "tcp", str(raw.tcp_socket[1]), session]


# -- refusals -------------------------------------------------------------------------


def test_a_wrong_token_is_refused_and_says_what_to_pass(
    relay: RelayHarness, tmp_path: Path, token_file: Path
) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    with http_server() as server, burrow.forward(server.port, client=relay.client()):
        (session,) = live_session_ids(relay, token_file)
        for command in (["status"], ["sessions", "--json"], ["kick", session]):
            line = failed(admin(url_of(relay), *command, token_file=wrong))
            assert "the relay refused the admin token" in line and "--token-file" in line
        line = failed(admin(url_of(relay), "tunnels"))  # no token at all
        assert "admin token" in line and "--token-file" in line
        assert live_session_ids(relay, token_file) == {session}  # the kick did nothing


def test_a_refused_connection_names_the_url_and_metrics() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    line = failed(admin(url, "status"))
    assert url in line and "connection refused" in line and "--metrics" in line


def test_something_else_at_the_url_is_named(relay: RelayHarness, token_file: Path) -> None:
    with http_server() as server:
        line = failed(admin(f"http://127.0.0.1:{server.port}", "status", token_file=token_file))
    assert "HTTP 404" in line


def test_a_token_file_that_cannot_be_used_is_a_clear_error(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "is empty" in failed(admin(url, "status", token_file=empty))
    missing = tmp_path / "missing"
    assert f"cannot read the admin token file {missing}" in failed(
        admin(url, "status", token_file=missing)
    )


def test_a_url_that_is_not_http_is_a_usage_error() -> None:
    result = admin("ftp://127.0.0.1:9100", "status")
    assert result.exit_code == 2
    assert "--url" in result.stderr


def test_the_environment_gives_url_and_token_file(relay: RelayHarness, token_file: Path) -> None:
    result = CliRunner().invoke(
        admincli.admin,
        ["status", "--json"],
        env={admincli.ENV_URL: url_of(relay), admincli.ENV_TOKEN_FILE: str(token_file)},
    )
    assert json.loads(ok(result))["relay"]["domain"] == "r1.localhost"


# -- kick ---------------------------------------------------------------------------------


def test_kick_ends_a_session_and_its_agent_stops_with_the_reason(
    relay: RelayHarness, token_file: Path
) -> None:
    other = relay.mint("other")
    with (
        http_server(marker="kicked-page") as server,
        http_server(marker="other-page") as other_server,
        burrow.forward(other_server.port, client=relay.client(other)) as other_tunnel,
    ):
        opening = burrow.forward(server.port, client=relay.client())
        with opening as tunnel:
            assert serves(relay, tunnel, "kicked-page")
            agent = agent_of(opening)
            session = agent.session_id
            assert session is not None and session in live_session_ids(relay, token_file)

            out = ok(admin(url_of(relay), "kick", session, token_file=token_file))
            assert out == f"ended session {session}\n"

            wait_until(lambda: agent.closed, "the agent to see its session end")
            assert isinstance(agent._fatal, RelayError), agent._fatal
            assert agent._fatal.code == protocol.CODE_ENDED_BY_OPERATOR
            assert not agent._fatal.retryable
            assert session not in live_session_ids(relay, token_file)
            assert fetch(relay, tunnel).startswith(b"HTTP/1.1 404 ")
            assert serves(relay, other_tunnel, "other-page")

        line = failed(admin(url_of(relay), "kick", session, token_file=token_file))
        assert f"no session {session}" in line and "404" in line


def test_kick_json_prints_the_answer(relay: RelayHarness, token_file: Path) -> None:
    with http_server() as server:
        opening = burrow.forward(server.port, client=relay.client())
        with opening:
            session = agent_of(opening).session_id
            assert session is not None
            out = ok(admin(url_of(relay), "kick", session, "--json", token_file=token_file))
            assert json.loads(out) == {"ended": session}
            wait_until(lambda: agent_of(opening).closed, "the agent to see its session end")


# -- revoke ---------------------------------------------------------------------------------


def revoked_ids(relay: RelayHarness) -> frozenset[str]:
    path = relay.relay.config.revoked_tokens
    assert path is not None
    return tokens.parse_revocation_list(path.read_text())


def test_revoke_by_id_ends_the_tokens_sessions_and_refuses_it(
    relay: RelayHarness, token_file: Path
) -> None:
    alice, bob = relay.mint("alice"), relay.mint("bob")
    alice_id = tokens.token_id_of(alice)
    with (
        http_server(marker="alice-page") as alice_server,
        http_server(marker="bob-page") as bob_server,
        burrow.forward(bob_server.port, client=relay.client(bob)) as bob_tunnel,
    ):
        opening = burrow.forward(alice_server.port, client=relay.client(alice))
        with opening as alice_tunnel:
            assert serves(relay, alice_tunnel, "alice-page")
            agent = agent_of(opening)

            out = ok(admin(url_of(relay), "revoke", alice_id, token_file=token_file))
            assert out == f"revoked token {alice_id} (1 session ended)\n"

            assert alice_id in revoked_ids(relay)
            subjects = {row["subject"] for row in api(relay, token_file, "sessions")["sessions"]}
            assert subjects == {"bob"}
            wait_until(lambda: agent.closed, "the agent to see its session end")
            assert isinstance(agent._fatal, AuthError), agent._fatal
            assert fetch(relay, alice_tunnel).startswith(b"HTTP/1.1 404 ")
            assert serves(relay, bob_tunnel, "bob-page")

    with pytest.raises(AuthError, match=f"token {alice_id} was revoked"):  # noqa: SIM117
        with burrow.forward(8000, client=relay.client(alice)):
            pass


def test_revoke_takes_a_whole_token(relay: RelayHarness, token_file: Path) -> None:
    carol = relay.mint("carol")
    carol_id = tokens.token_id_of(carol)
    with http_server() as server, burrow.forward(server.port, client=relay.client(carol)):
        out = ok(admin(url_of(relay), "revoke", carol, "--json", token_file=token_file))
    assert json.loads(out) == {"revoked": carol_id, "sessions_ended": 1}
    assert carol_id in revoked_ids(relay)
    with pytest.raises(AuthError, match="was revoked"):  # noqa: SIM117
        with burrow.forward(8000, client=relay.client(carol)):
            pass

    # A token without sessions: none ended, and the plural reads right.
    dave_id = tokens.token_id_of(relay.mint("dave"))
    out = ok(admin(url_of(relay), "revoke", dave_id, token_file=token_file))
    assert out == f"revoked token {dave_id} (0 sessions ended)\n"


def test_revoke_of_something_that_is_not_a_token_is_refused_here(
    relay: RelayHarness, token_file: Path
) -> None:
    line = failed(admin(url_of(relay), "revoke", "not.a-token", token_file=token_file))
    assert "not a burrow token" in line
    assert revoked_ids(relay) == frozenset()


def test_revoke_without_a_revocation_file_says_so(tmp_path: Path, token_file: Path) -> None:
    with admin_relay(tmp_path, revoked_tokens=None) as relay:
        line = failed(admin(url_of(relay), "revoke", "some-id", token_file=token_file))
    assert "409" in line and "--revoked-tokens" in line


# -- a loopback listener without an admin token -------------------------------------------


def test_without_an_admin_token_reads_work_and_changes_are_refused(tmp_path: Path) -> None:
    with (
        admin_relay(tmp_path, admin_token=None) as relay,
        http_server() as server,
        burrow.forward(server.port, client=relay.client()),
    ):
        url = url_of(relay)
        status = json.loads(ok(admin(url, "status", "--json")))
        assert status["relay"]["auth"] is False
        assert status_fields(ok(admin(url, "status")))["admin token"].startswith("none")
        (row,) = json.loads(ok(admin(url, "sessions", "--json")))["sessions"]

        for command in (["kick", row["id"]], ["revoke", row["token_id"]]):
            line = failed(admin(url, *command))
            assert "403" in line and "--admin-token-file" in line
        assert [r["id"] for r in json.loads(ok(admin(url, "sessions", "--json")))["sessions"]] == [
            row["id"]
        ]


# -- the module ---------------------------------------------------------------------------


def test_the_command_loads_no_relay_or_jwt_code() -> None:
    probe = "import sys, burrow.admincli\nprint('\\n'.join(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = out.stdout.split()
    assert not [m for m in loaded if m.startswith(("burrow.relay", "burrow.tokens", "jwt"))]
    assert "urllib.request" not in loaded  # only once a command calls the relay
