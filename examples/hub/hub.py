"""A notebook hub: one authenticated POST starts your own Jupyter in a sandbox.

    HUB_TOKENS_FILE=tokens.txt python hub.py     # tokens.txt: one "user:token" a line

``POST /start`` with ``Authorization: Bearer <token>`` starts (or finds) the
user's sandbox running Jupyter, waits until the notebook answers, and
answers ``303 See Other`` to the notebook's tunnel URL with its login token.
Without a valid token: ``401``. The hub publishes itself through a tunnel
as well and prints ``hub: <url>``.
"""

from __future__ import annotations

import hmac
import http.server
import importlib.util
import os
import secrets
import shutil
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import burrow

PORT = int(os.environ.get("HUB_PORT", "0"))  # 0: any free port
DATA = Path(os.environ.get("HUB_DATA", "hub-data")).resolve()  # one workdir per user
SANDBOX_TIMEOUT = float(os.environ.get("HUB_SANDBOX_TIMEOUT", "3600"))
READY_TIMEOUT = float(os.environ.get("HUB_READY_TIMEOUT", "120"))


def load_tokens() -> dict[str, str]:
    """token -> user, from HUB_TOKENS_FILE ("user:token" lines) or HUB_TOKEN (user "default")."""
    tokens: dict[str, str] = {}
    if path := os.environ.get("HUB_TOKENS_FILE"):
        for line in Path(path).read_text().splitlines():
            user, sep, token = line.strip().partition(":")
            if sep and user and not user.startswith("#") and len(token) >= 16:
                tokens[token] = user
    elif token := os.environ.get("HUB_TOKEN"):
        tokens[token] = "default"
    if not tokens:
        sys.exit("hub: no tokens; set HUB_TOKENS_FILE (user:token lines, tokens >= 16 chars)")
    return tokens


def authenticate(header: str | None, tokens: dict[str, str]) -> str | None:
    """The user a ``Bearer`` header belongs to, or None. Compares in constant time."""
    scheme, _, presented = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    user = None
    for token, owner in tokens.items():
        if hmac.compare_digest(token.encode(), presented.strip().encode()):
            user = owner
    return user


def free_port() -> int:
    # Sandboxes share the machine's network: each notebook needs a port of its own.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Notebook:
    sandbox: burrow.Sandbox
    url: str  # the tunnel URL with the notebook's login token


class Hub:
    def __init__(self) -> None:
        self.tokens = load_tokens()
        self.notebooks: dict[str, Notebook] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()
        if importlib.util.find_spec("jupyterlab") is not None:
            self.app, self.path = "lab", "/lab"
        elif importlib.util.find_spec("jupyter_server") is not None:
            self.app, self.path = "server", "/api/status"
        else:
            sys.exit("hub: Jupyter is not installed; pip install 'burrow[jupyter]'")

    def notebook_for(self, user: str) -> Notebook:
        """The user's running notebook, started if there is none."""
        with self.lock:
            user_lock = self.locks.setdefault(user, threading.Lock())
        with user_lock:  # two POSTs of one user start one notebook
            notebook = self.notebooks.get(user)
            if notebook is not None and notebook.sandbox.poll() is None:
                return notebook
            notebook = self.start(user)
            self.notebooks[user] = notebook
            return notebook

    def start(self, user: str) -> Notebook:
        workdir = DATA / user
        workdir.mkdir(parents=True, exist_ok=True)
        if os.getuid() == 0:
            # A sandbox started by root runs as nobody, who must own its workdir.
            shutil.chown(workdir, "nobody")
        port, token = free_port(), secrets.token_urlsafe(24)
        sb = burrow.Sandbox.create(
            sys.executable, "-m", "jupyter", self.app,
            "--no-browser", "--ip=127.0.0.1", f"--port={port}", "--ServerApp.port_retries=0",
            # Visitors come through the tunnel, with its name in the Host header.
            "--ServerApp.allow_remote_access=True",
            encrypted_ports=[port],
            timeout=SANDBOX_TIMEOUT,
            workdir=workdir,
            env={"JUPYTER_TOKEN": token},  # not on the command line, where ps shows it
        )  # fmt: skip
        try:
            tunnel = sb.tunnels()[port]
            # Programmable start-up: answer only once the notebook does.
            sb.wait_ready(port, timeout=READY_TIMEOUT, http_path="/api")
        except burrow.exception.Error:
            sb.terminate()
            raise
        level = sb.isolation.level
        print(f"hub: {user}: sandbox {sb.object_id} ({level}) at {tunnel.url}", flush=True)
        return Notebook(sb, f"{tunnel.url}{self.path}?token={token}")

    def stop_all(self) -> None:
        for notebook in self.notebooks.values():
            notebook.sandbox.terminate()


class Handler(http.server.BaseHTTPRequestHandler):
    hub: Hub

    def do_POST(self) -> None:
        if self.path != "/start":
            self.answer(404, "POST /start to get your notebook\n")
            return
        user = authenticate(self.headers.get("Authorization"), self.hub.tokens)
        if user is None:
            self.answer(401, "a valid bearer token is needed\n", {"WWW-Authenticate": "Bearer"})
            return
        try:
            notebook = self.hub.notebook_for(user)
        except burrow.exception.Error as exc:
            self.answer(503, f"could not start your notebook: {exc}\n")
            return
        self.answer(303, f"your notebook: {notebook.url}\n", {"Location": notebook.url})

    def do_GET(self) -> None:
        self.answer(200, "POST /start with 'Authorization: Bearer <token>'\n")

    def answer(self, status: int, body: str, headers: dict[str, str] | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write(f"hub: {self.address_string()} {format % args}\n")


def main() -> None:
    hub = Hub()
    Handler.hub = hub
    server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    port = server.server_address[1]
    try:
        with burrow.forward(port) as tunnel:
            print(f"hub: http://127.0.0.1:{port}", flush=True)
            print(f"hub: {tunnel.url}", flush=True)
            server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop_all()
        server.server_close()


if __name__ == "__main__":
    main()
