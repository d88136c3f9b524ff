"""The tools the benchmark drives (installed with apt-get when missing), their versions,
and a description of the machine."""

from __future__ import annotations

import os
import platform
import re
import shutil
import ssl
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Tool -> the Debian package that provides it.
REQUIRED = {
    "iperf3": "iperf3",
    "socat": "socat",
    "h2load": "nghttp2-client",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "curl": "curl",
    "nginx": "nginx",
}
PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


class MissingTools(Exception):
    pass


def _missing() -> list[str]:
    return [tool for tool in REQUIRED if shutil.which(tool, path=PATH) is None]


def ensure_tools() -> None:
    """Install missing tools with apt-get when root; otherwise say what to install."""
    missing = _missing()
    if not missing:
        return
    packages = sorted({REQUIRED[tool] for tool in missing})
    if os.geteuid() != 0:
        raise MissingTools(
            f"missing {', '.join(missing)}: run `sudo apt-get install -y {' '.join(packages)}`"
        )
    print(f"installing {' '.join(packages)} with apt-get", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    if subprocess.run(install, env=env, check=False).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=False)
        subprocess.run(install, env=env, check=False)
    if still := _missing():
        raise MissingTools(f"apt-get could not install {', '.join(still)}")


def _output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def _first(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    return found.group(1) if found else "not found"


def versions(repo: Path) -> dict[str, str]:
    commit = _output(["git", "-C", str(repo), "describe", "--always", "--dirty"])
    try:
        burrow = metadata.version("burrow")
    except metadata.PackageNotFoundError:
        burrow = "not installed"
    try:
        uvloop = metadata.version("uvloop")
    except metadata.PackageNotFoundError:
        uvloop = "not installed"
    return {
        "burrow": f"{burrow} ({commit})" if commit else burrow,
        "Python": f"{platform.python_version()} (uvloop {uvloop}, {ssl.OPENSSL_VERSION})",
        "OpenSSL": _first(r"(OpenSSL \S+)", _output(["openssl", "version"])),
        "OpenSSH": _first(r"(OpenSSH_\S+)", _output(["ssh", "-V"])).rstrip(","),
        "nginx": _first(
            r"nginx/(\S+)", _output([shutil.which("nginx", path=PATH) or "nginx", "-v"])
        ),
        "iperf3": _first(r"iperf (\S+)", _output(["iperf3", "--version"])),
        "curl": _first(r"curl (\S+)", _output(["curl", "--version"])),
        "h2load": _first(r"nghttp2/(\S+)", _output(["h2load", "--version"])),
        "socat": _first(r"socat version (\S+)", _output(["socat", "-V"])),
        "wrk": "not used (h2load measures the request rate)",
    }


def _cpuinfo_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    return _first(r"model name\s*:\s*(.+)", text)


def _memory() -> str:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return "unknown"
    kib = int(_first(r"MemTotal:\s*(\d+)", text) or 0)
    return f"{kib / 1024**2:.1f} GiB"


def _os() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return platform.system()
    return _first(r'PRETTY_NAME="?([^"\n]+)', text)


def description() -> dict[str, str]:
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "unknown"
    return {
        "CPUs": str(os.cpu_count()),
        "CPU model": _cpuinfo_model(),
        "RAM": _memory(),
        "OS": _os(),
        "kernel": platform.release(),
        "load average at start (1, 5, 15 min)": load,
    }
