"""The operator's listener of a real relay: routes, the token, and peers who misbehave."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backends import http_server
from harness import RelayHarness, run_relay, wait_until

import burrow
from burrow.exception import AuthError, InvalidError, RelayError
from burrow.relay import admin
from burrow.relay.admin import check_listen, read_admin_token

TOKEN = "admin-token-0123456789abcdef"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayHarness]:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("")
    with run_relay(
        tmp_path / "relay",
        metrics_listen=("127.0.0.1", 0),
        admin_token=TOKEN,
        revoked_tokens=revoked,
    ) as harness:
        yield harness


def _address(relay: RelayHarness) -> tuple[str, int]:
    assert relay.thread.admin is not None
    return relay.thread.admin.address


def call(
    relay: RelayHarness, method: str, path: str, token: str | None = TOKEN, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    host, port = _address(relay)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    data = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=data, headers=headers)
    response = conn.getresponse()
    result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    conn.close()
    return result


def api(relay: RelayHarness, method: str, path: str, body: Any = None) -> Any:
    status, _, data = call(relay, method, path, body=body)
    assert status == 200, data
    return json.loads(data)


def unauthorized(relay: RelayHarness) -> float:
    _, _, text = call(relay, "GET", "/metrics", token=None)
    for line in text.decode().splitlines():
        if line.startswith("burrow_relay_admin_unauthorized_total "):
            return float(line.split()[1])
    raise AssertionError("no admin_unauthorized_total")


# -- routes -----------------------------------------------------------------------


def test_health_readiness_and_metrics_need_no_token(relay: RelayHarness) -> None:
    assert call(relay, "GET", "/healthz", token=None)[::2] == (200, b"ok\n")
    assert call(relay, "GET", "/readyz", token=None)[::2] == (200, b"ready\n")
    status, headers, text = call(relay, "GET", "/metrics", token=None)
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b'burrow_relay_build_info{domain="r1.localhost"' in text


def test_not_ready_while_draining(relay: RelayHarness) -> None:
    async def drain_flag() -> None:
        relay.relay.admission.shutting_down = True

    relay.call(drain_flag())
    assert call(relay, "GET", "/readyz", token=None)[::2] == (503, b"not ready: draining\n")
    assert call(relay, "GET", "/healthz", token=None)[0] == 200
    assert api(relay, "GET", "/api/status")["relay"]["draining"] is True


def test_the_api_wants_the_token_and_counts_who_lacks_it(relay: RelayHarness) -> None:
    before = unauthorized(relay)
    for token in (None, "wrong", TOKEN + "x", TOKEN[:-1]):
        status, headers, body = call(relay, "GET", "/api/status", token=token)
        assert status == 401
        assert headers["www-authenticate"] == "Bearer"
        assert "token" in json.loads(body)["error"]
    status, _, _ = call(relay, "DELETE", "/api/sessions/abc", token="wrong")
    assert status == 401
    assert unauthorized(relay) == before + 5
    assert api(relay, "GET", "/api/status")["relay"]["auth"] is True


def test_status_sessions_and_tunnels_describe_the_relay(relay: RelayHarness) -> None:
    with (
        http_server(files={"id": b"hello\n"}) as server,
        burrow.forward(server.port, client=relay.client(), unencrypted=True) as tunnel,
    ):
        status = api(relay, "GET", "/api/status")
        assert status["relay"]["domain"] == "r1.localhost"
        assert status["relay"]["ready"] is True
        assert status["certificate"]["valid"] is True
        assert status["counts"]["sessions"] == 1
        assert status["counts"]["tunnels_by_kind"] == {"https": 0, "tcp": 1, "h2": 0}
        assert status["limits"]["pool_size"] == relay.relay.config.pool_size
        (session,) = api(relay, "GET", "/api/sessions")["sessions"]
        assert session["subject"] == "test"
        assert session["token_id"] == burrow.tokens.token_id_of(relay.token)
        assert session["agent"].startswith("burrow/")
        assert session["peer"].startswith("127.0.0.1:")
        assert session["tunnels"] == 1
        (listed,) = api(relay, "GET", "/api/tunnels")["tunnels"]
        label = tunnel.host.split(".")[0]
        assert listed["name"] == label[:4] + "…"
        assert listed["kind"] == "tcp"
        assert listed["session"] == session["id"]
        assert listed["tcp_port"] == tunnel.tcp_socket[1]
        # No answer of the listener holds a whole tunnel name.
        for path in ("/api/status", "/api/sessions", "/api/tunnels", "/api/history", "/metrics"):
            assert label.encode() not in call(relay, "GET", path)[2], path


def test_history_has_a_first_sample_at_once(relay: RelayHarness) -> None:
    history = api(relay, "GET", "/api/history")
    assert history["interval"] == admin.HISTORY_INTERVAL
    assert len(history["samples"]) >= 1
    assert set(history["samples"][0]) == {
        "time", "sessions", "tunnels", "visitors", "bytes_to_agent", "bytes_to_visitor",
    }  # fmt: skip


def test_ending_a_session_closes_its_tunnels_and_tells_the_agent(relay: RelayHarness) -> None:
    ended: list[BaseException] = []
    with http_server(files={"id": b"hello\n"}) as server:
        forwarding = burrow.forward(server.port, client=relay.client())
        with forwarding:
            forwarding.when_ended(ended.append)
            (session,) = api(relay, "GET", "/api/sessions")["sessions"]
            assert api(relay, "DELETE", f"/api/sessions/{session['id']}") == {
                "ended": session["id"]
            }
            wait_until(lambda: ended, "the agent to hear of it")
            assert api(relay, "GET", "/api/sessions")["sessions"] == []
            assert api(relay, "GET", "/api/tunnels")["tunnels"] == []
    (error,) = ended
    assert isinstance(error, RelayError)
    assert error.code == "ended-by-operator"
    assert "the relay's operator ended this session" in str(error)
    assert call(relay, "DELETE", f"/api/sessions/{session['id']}")[0] == 404
    assert call(relay, "DELETE", "/api/sessions/..%2f..%2fetc")[0] == 404


def test_revoking_through_the_api_ends_the_tokens_sessions_at_once(relay: RelayHarness) -> None:
    token = relay.mint("revoked-one")
    token_id = burrow.tokens.token_id_of(token)
    ended: list[BaseException] = []
    with http_server(files={"id": b"hello\n"}) as server:
        forwarding = burrow.forward(server.port, client=relay.client(token))
        with forwarding:
            forwarding.when_ended(ended.append)
            answer = api(relay, "POST", "/api/revoke", {"token_id": token_id})
            assert answer == {"revoked": token_id, "sessions_ended": 1}
            wait_until(lambda: ended, "the agent to hear of it")
        assert token_id in (relay.state_dir.parent / "revoked.txt").read_text()
        assert isinstance(ended[0], AuthError)
        with (
            pytest.raises(AuthError, match="revoked"),
            burrow.forward(server.port, client=relay.client(token)),
        ):
            pass
    assert api(relay, "GET", "/api/status")["counts"]["revoked_tokens"] == 1
    for body in ({"token_id": 5}, {"id": token_id}, [token_id], {"token_id": "a b\nc"}):
        assert call(relay, "POST", "/api/revoke", body=body)[0] == 400


def test_revoking_needs_a_revocation_list(tmp_path: Path) -> None:
    with run_relay(tmp_path, metrics_listen=("127.0.0.1", 0), admin_token=TOKEN) as relay:
        status, _, body = call(relay, "POST", "/api/revoke", body={"token_id": "abc"})
        assert status == 409
        assert "--revoked-tokens" in json.loads(body)["error"]


def test_without_a_token_the_api_reads_but_changes_nothing(tmp_path: Path) -> None:
    with run_relay(tmp_path, metrics_listen=("127.0.0.1", 0)) as relay:
        status, _, body = call(relay, "GET", "/api/status", token=None)
        assert status == 200
        assert json.loads(body)["relay"]["auth"] is False
        status, _, body = call(relay, "DELETE", "/api/sessions/abc", token=None)
        assert status == 403
        assert "--admin-token-file" in json.loads(body)["error"]
        assert call(relay, "POST", "/api/revoke", token=None, body={"token_id": "a"})[0] == 403


def test_wrong_methods_and_paths(relay: RelayHarness) -> None:
    assert call(relay, "GET", "/nothing")[0] == 404
    assert call(relay, "GET", "/api/nothing")[0] == 404
    assert call(relay, "POST", "/metrics")[0] == 405
    assert call(relay, "POST", "/api/status")[0] == 405
    assert call(relay, "GET", "/api/sessions/abc")[0] == 405
    assert call(relay, "GET", "/api/revoke")[0] == 405


def test_the_dashboard_page_is_served_with_a_strict_policy(relay: RelayHarness) -> None:
    status, headers, page = call(relay, "GET", "/", token=None)
    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in headers["content-security-policy"]
    assert b"dashboard.js" in page
    for path in ("/dashboard.js", "/dashboard.css"):
        assert call(relay, "GET", path, token=None)[0] == 200


# -- settings -----------------------------------------------------------------------


def test_beyond_loopback_the_listener_needs_a_token() -> None:
    with pytest.raises(InvalidError, match="--admin-token-file"):
        check_listen("0.0.0.0", None)
    with pytest.raises(InvalidError):
        check_listen("192.0.2.7", None)
    check_listen("0.0.0.0", TOKEN)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.9"):
        check_listen(host, None)


def test_admin_token_files(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert read_admin_token(path) == TOKEN
    for bad in ("", "short\n", "\n\n", "é" * 20):
        path.write_text(bad)
        with pytest.raises(InvalidError, match="at least 16"):
            read_admin_token(path)
    with pytest.raises(InvalidError, match="cannot read"):
        read_admin_token(tmp_path / "missing")


# -- hostile peers --------------------------------------------------------------------


def _raw(relay: RelayHarness, data: bytes, *, shut: bool = True) -> bytes:
    with socket.create_connection(_address(relay), timeout=10) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_garbage_gets_a_400_and_a_close(relay: RelayHarness) -> None:
    for junk in (
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"\x00" * 100 + b"\r\n\r\n",
    ):
        assert _raw(relay, junk).startswith(b"HTTP/1.1 400 ")
    # Cut short: a head never finished.
    assert _raw(relay, b"GET /metrics HTTP/1.1\r\nHost: x\r\n").startswith(b"HTTP/1.1 400 ")
    assert call(relay, "GET", "/healthz")[0] == 200


def test_oversized_heads_and_bodies_are_refused(relay: RelayHarness) -> None:
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    assert _raw(relay, head).startswith(b"HTTP/1.1 431 ")
    body = b"x" * (admin.MAX_BODY_BYTES + 1)
    request = (
        b"POST /api/revoke HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN.encode()
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip
    assert _raw(relay, request).startswith(b"HTTP/1.1 413 ")


def test_head_requests_get_the_head_alone(relay: RelayHarness) -> None:
    host, port = _address(relay)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    for path in ("/metrics", "/", "/healthz", "/nothing"):
        conn.request("HEAD", path)
        response = conn.getresponse()
        assert response.read() == b""
        assert int(response.headers["content-length"]) > 0, path
    conn.request("GET", "/healthz")  # the connection is still good
    assert conn.getresponse().read() == b"ok\n"
    conn.close()


def test_kept_alive_requests_on_one_connection(relay: RelayHarness) -> None:
    host, port = _address(relay)
    conn = http.client.HTTPConnection(host, port, timeout=10)
    for _ in range(20):
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200
        assert response.read() == b"ok\n"
    conn.close()


def test_a_silent_or_slow_peer_is_closed(
    relay: RelayHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "REQUEST_TIMEOUT", 0.5)
    with socket.create_connection(_address(relay), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        assert sock.recv(100) == b""  # closed by the listener, not by our timeout
    assert call(relay, "GET", "/healthz")[0] == 200


def test_a_flood_of_connections_keeps_at_most_the_cap(relay: RelayHarness) -> None:
    socks = [socket.create_connection(_address(relay), timeout=10) for _ in range(200)]
    try:
        # The newest get answers; the oldest were closed to make room for them.
        status, _, _ = call(relay, "GET", "/healthz")
        assert status == 200

        async def held() -> int:
            server = relay.thread.admin
            assert server is not None
            return len(server._connections)

        wait_until(lambda: relay.call(held()) <= admin.MAX_CONNECTIONS, "the cap")
        socks[0].settimeout(5)
        assert socks[0].recv(10) == b""  # the oldest: closed
    finally:
        for sock in socks:
            sock.close()
    assert call(relay, "GET", "/healthz")[0] == 200


def test_peers_resetting_mid_request_leave_nothing_behind(relay: RelayHarness) -> None:
    import struct

    for _ in range(50):
        sock = socket.create_connection(_address(relay), timeout=10)
        sock.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    async def held() -> int:
        server = relay.thread.admin
        assert server is not None
        return len(server._connections)

    wait_until(lambda: relay.call(held()) == 0, "every connection gone")
    time.sleep(0.1)
    assert call(relay, "GET", "/healthz")[0] == 200


def test_the_command_line_refuses_an_open_listener_without_a_token(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from burrow.cli import main

    runner = CliRunner()
    state = ["--state-dir", str(tmp_path / "state"), "--port", "0"]
    result = runner.invoke(main, ["dev", *state, "--metrics", "0.0.0.0:0"])
    assert result.exit_code == 2
    assert "--admin-token-file" in result.output
    token = tmp_path / "token"
    token.write_text("short\n")
    result = runner.invoke(
        main, ["dev", *state, "--metrics", "0.0.0.0:0", "--admin-token-file", str(token)]
    )
    assert result.exit_code == 2
    assert "at least 16" in result.output
    result = runner.invoke(main, ["dev", *state, "--admin-token-file", str(token)])
    assert result.exit_code == 2
    assert "add --metrics" in result.output
