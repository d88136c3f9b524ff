"""Process limits that a relay or an agent needs raised.

Every visitor costs two file descriptors at the relay and two at the
agent; the usual soft limit of 1024 would cap a tunnel at a few hundred
concurrent visitors, with resets and no log line. Raising the soft limit
to the hard limit is harmless (the hard limit is the administrator's
choice) and is what Go programs do by default.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Final

log = logging.getLogger("burrow")

# Below this many descriptors, a busy relay or agent runs out: say so.
FEW_FILES: Final = 4096


def raise_open_file_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; returns the soft limit in force."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if 0 <= soft < FEW_FILES:
        log.warning(
            "only %d open files allowed (ulimit -n): about %d concurrent visitors",
            soft,
            soft // 2,
        )
    return int(soft)
