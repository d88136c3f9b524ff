"""A TCP echo server, published on a raw TCP port of the relay.

    python echo.py           # prints: tcp://<relay host>:<relay port>

PORT (default 8000) is the local port, read from the environment.
"""

import contextlib
import os
import socketserver

import burrow


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        # Echo until the visitor half-closes (recv gives b""), then close our side.
        while data := self.request.recv(65536):
            self.request.sendall(data)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    with (
        Server(("127.0.0.1", port), Echo) as server,
        burrow.forward(port, unencrypted=True) as tunnel,
    ):
        host, tcp_port = tunnel.tcp_socket
        print(f"tcp://{host}:{tcp_port}", flush=True)
        print(f"Try it: nc {host} {tcp_port}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends it quietly
            server.serve_forever()
