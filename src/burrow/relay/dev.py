"""The dev relay: ``r1.localhost`` on loopback, with a CA and signing key kept in a state dir.

``burrow dev`` writes the client settings to ``<state dir>/env`` (and to
``--env-file``) and its pid beside them, so that ``burrow forward`` and
``burrow.forward()`` on the same machine find a running dev relay with no
other set-up.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from burrow import tokens

# Clients read the discovery file, so its names and format live in
# burrow.env; code that starts a dev relay finds them here too.
from burrow.env import DEV_PORT as DEV_PORT
from burrow.env import ENV_CA, ENV_PLAIN_DATA, ENV_RELAY, ENV_TOKEN
from burrow.env import ENV_FILE as ENV_FILE
from burrow.env import ENV_STATE_DIR as ENV_STATE_DIR
from burrow.env import PID_FILE as PID_FILE
from burrow.env import default_state_dir as default_state_dir
from burrow.env import format_env as format_env
from burrow.env import parse_env as parse_env
from burrow.net import devca, files
from burrow.relay.config import RelayConfig

DEV_DOMAIN: Final = "r1.localhost"

# Dev tokens outlive any dev session but not a forgotten laptop.
DEV_TOKEN_TTL: Final = 30 * 24 * 3600

SIGNING_KEY_FILE: Final = "token-signing.pem"
PUBLIC_KEY_FILE: Final = "token-public.pem"


@dataclass(frozen=True)
class DevRelay:
    """What ``burrow dev`` runs and what it tells clients."""

    config: RelayConfig
    state_dir: Path
    ca: Path
    token: str

    def env(self, port: int) -> dict[str, str]:
        env = {
            ENV_RELAY: f"{DEV_DOMAIN}:{port}",
            ENV_TOKEN: self.token,
            ENV_CA: str(self.ca),
        }
        if self.config.plain_data_listen is not None:
            env[ENV_PLAIN_DATA] = "1"
        return env


def prepare(
    state_dir: Path, port: int, tcp_ports: tuple[int, int], *, plain_data: bool = False
) -> DevRelay:
    """Create or reuse the dev CA, certificate and signing key; mint a token."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    certs = devca.ensure_dev_certificates(state_dir, DEV_DOMAIN)
    signing_path = state_dir / SIGNING_KEY_FILE
    public_path = state_dir / PUBLIC_KEY_FILE
    if not signing_path.exists():
        key = tokens.generate_signing_key()
        tokens.write_signing_key(key, signing_path)
        with contextlib.suppress(FileNotFoundError):
            public_path.unlink()
    key = tokens.read_signing_key(signing_path)
    if not public_path.exists():
        tokens.write_public_key(key, public_path)
    config = RelayConfig(
        domain=DEV_DOMAIN,
        cert=certs.cert,
        key=certs.key,
        public_key=public_path,
        listen=(("127.0.0.1", port), ("::1", port)),
        tcp_ports=tcp_ports,
        plain_data_listen=("127.0.0.1", 0) if plain_data else None,
        # The claim secret too: the dev certificate's key is replaced when it renews.
        state_dir=state_dir,
    )
    token = tokens.mint(key, subject="dev", ttl_seconds=DEV_TOKEN_TTL)
    return DevRelay(config=config, state_dir=state_dir, ca=certs.ca_cert, token=token)


def write_env_file(path: Path, env: dict[str, str]) -> None:
    """Write atomically with mode 0600: the token is a secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomically(path, format_env(env).encode())


def write_pid(state_dir: Path) -> None:
    (state_dir / PID_FILE).write_text(f"{os.getpid()}\n")


def clear_pid(state_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if (state_dir / PID_FILE).read_text().strip() == str(os.getpid()):
            (state_dir / PID_FILE).unlink()
