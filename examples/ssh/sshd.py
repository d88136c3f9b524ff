"""Run OpenSSH's sshd for this user, unprivileged, and publish it on a raw TCP port.

    python sshd.py ~/.ssh/id_ed25519.pub     # the public key(s) to let in

PORT (default 2222) is the local port; SSHD_DIR (default
~/.local/state/burrow/sshd) keeps the host key, which is made on the first
run and kept, so clients can pin it.
"""

import contextlib
import getpass
import os
import subprocess
import sys
from pathlib import Path

import burrow

SSHD = "/usr/sbin/sshd"  # Debian's openssh-server

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python sshd.py AUTHORIZED_KEYS_FILE")
    authorized_keys = Path(sys.argv[1]).resolve()
    port = int(os.environ.get("PORT", "2222"))
    state = Path(os.environ.get("SSHD_DIR", "~/.local/state/burrow/sshd")).expanduser().resolve()
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    host_key = state / "ssh_host_ed25519_key"
    if not host_key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", host_key], check=True)
    config = state / "sshd_config"
    # Keys only. StrictModes is off so the key file may live anywhere (under /tmp, say).
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\n"
        f"PidFile {state / 'sshd.pid'}\nAuthorizedKeysFile {authorized_keys}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", config])
    try:
        with burrow.forward(port, unencrypted=True) as tunnel:
            host, tcp_port = tunnel.tcp_socket
            key_type, key, *_ = Path(f"{host_key}.pub").read_text().split()
            print(f"ssh -p {tcp_port} {getpass.getuser()}@{host}", flush=True)
            print(f"known_hosts line: [{host}]:{tcp_port} {key_type} {key}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends it quietly
                sshd.wait()
    finally:
        sshd.terminate()
        sshd.wait()
