"""Relay certificates for tests of certificate changes: fresh leaves from one dev CA."""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path

from burrow.net import devca


def new_leaf(
    ca_dir: Path, into: Path, domain: str, *, now: datetime | None = None
) -> devca.DevCertificates:
    """A new certificate and key for ``domain`` in ``into``, signed by the dev CA of ``ca_dir``."""
    into.mkdir(parents=True, exist_ok=True)
    for name in (devca.CA_CERT_FILE, devca.CA_KEY_FILE):
        shutil.copy2(ca_dir / name, into / name)
    for name in (devca.LEAF_CERT_FILE, devca.LEAF_KEY_FILE):
        (into / name).unlink(missing_ok=True)
    return devca.ensure_dev_certificates(into, domain, now=now)
