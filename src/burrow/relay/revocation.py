"""The relay's list of revoked tokens: a file of token ids, re-read when it changes.

A relay holds only the token public key, so it cannot un-sign a token; it
refuses the ids listed in this file instead (``burrow token revoke`` appends
to it). The relay looks at the file when an agent says hello and every
:data:`REVOCATION_CHECK_SECONDS`, and reads it again only when it changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Container
from pathlib import Path
from typing import Final

from burrow import tokens
from burrow.exception import InvalidError

log = logging.getLogger("burrow.relay")

# How often the relay looks for a changed revocation list. A revoked token's
# live sessions end within this; the look is one stat() call, so a few
# seconds costs nothing and keeps "revoke" close to immediate.
REVOCATION_CHECK_SECONDS: Final = 2.0

# What tells a changed file: a new modification time, a new size (an append
# always changes it, even within one mtime tick), or a new inode (a file
# replaced by rename, as editors and config tools write).
FileSignature = tuple[int, int, int]


def file_signature(stat: os.stat_result) -> FileSignature:
    """What tells that the file of ``stat`` changed (the fleet document's too)."""
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


class RevocationList:
    """The token ids in one revocation file, kept up to date by :meth:`refresh`."""

    def __init__(self, path: Path) -> None:
        """Read ``path``; a missing or unreadable file is an :class:`InvalidError`."""
        self.path = path
        self.ids: frozenset[str] = frozenset()
        self._signature: FileSignature | None = None
        self._gone = False
        try:
            self._read(os.stat(path))
        except OSError as exc:
            raise InvalidError(
                f"cannot read the revoked-tokens file {path}: {exc.strerror}"
            ) from exc
        log.info("revoked-tokens file %s: %d token ids", path, len(self.ids))

    def __contains__(self, token_id: object) -> bool:
        return token_id in self.ids

    def _read(self, stat: os.stat_result) -> frozenset[str]:
        """Read the file; the ids that were not listed before."""
        text = self.path.read_text(encoding="utf-8", errors="replace")
        ids = tokens.parse_revocation_list(text)
        added = ids - self.ids
        self.ids = ids
        self._signature = file_signature(stat)
        return added

    def refresh(self) -> frozenset[str]:
        """Re-read the file if it changed; the ids revoked since the last read.

        A file that has gone away (or cannot be read) keeps the last list in
        force: it is logged once, never taken as "nothing is revoked".
        """
        try:
            stat = os.stat(self.path)
            if file_signature(stat) == self._signature:
                return frozenset()
            added = self._read(stat)
        except OSError as exc:
            if not self._gone:
                self._gone = True
                log.warning(
                    "revoked-tokens file %s cannot be read (%s); keeping its last %d ids",
                    self.path,
                    exc.strerror,
                    len(self.ids),
                )
            return frozenset()
        if self._gone:
            self._gone = False
            log.info("revoked-tokens file %s can be read again", self.path)
        log.info(
            "revoked-tokens file %s changed: %d token ids, %d newly revoked",
            self.path,
            len(self.ids),
            len(added),
        )
        return added


class AnyOf:
    """Token ids refused by any of several sources: the revocation list, the fleet document."""

    def __init__(self, *sources: Container[str]) -> None:
        self.sources = sources

    def __contains__(self, token_id: object) -> bool:
        return any(token_id in source for source in self.sources)
