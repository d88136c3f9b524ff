"""The relay's fleet document (``--fleet FILE``), re-read when the file changes.

The relay enforces the document's revoked token ids as it does its
revocation list, and hands the document to agents whose copy is older. A
document that fails verification, is not newer than the one in force, or has
expired is refused with one log line, and the last good one stays.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from burrow import fleet
from burrow.exception import InvalidError
from burrow.relay.revocation import FileSignature, file_signature
from burrow.tokens import KeyRing

log = logging.getLogger("burrow.relay")


class FleetFile:
    """The fleet document in one file, kept up to date by :meth:`refresh`.

    ``clock`` is wall-clock time, for the document's expiry.
    """

    def __init__(
        self, path: Path, keys: KeyRing, *, clock: Callable[[], float] = time.time
    ) -> None:
        """Read ``path``; a file that cannot be read, or holds no valid document,
        is an :class:`InvalidError`: a relay starts with a good one or not at all."""
        self.path = path
        self.keys = keys
        self.clock = clock
        self._signature: FileSignature | None = None
        self._gone = False
        self._expiry_logged = False
        try:
            stat = os.stat(path)
            text = self._read_text()
        except OSError as exc:
            raise InvalidError(f"cannot read the fleet document {path}: {exc.strerror}") from exc
        try:
            self.fleet = fleet.verify(text, keys, now=clock())
        except fleet.FleetError as exc:
            raise InvalidError(f"the fleet document {path} is refused: {exc}") from None
        self.text = text.strip()
        self._signature = file_signature(stat)
        log.info(
            "fleet document %s: serial %d, %d relays, %d revoked token ids",
            path,
            self.fleet.serial,
            len(self.fleet.relays),
            len(self.fleet.revoked),
        )

    @property
    def revoked(self) -> frozenset[str]:
        return self.fleet.revoked

    def __contains__(self, token_id: object) -> bool:
        return token_id in self.fleet.revoked

    def _read_text(self) -> str:
        # One byte more than a document may hold: enough to tell it is too long.
        with self.path.open("rb") as file:
            data = file.read(fleet.MAX_FLEET_SIZE + 1)
        return data.decode("utf-8", errors="replace")

    def offer(self, agent_serial: int | None) -> str | None:
        """The document for an agent that holds ``agent_serial`` (None: one that
        takes none), or None when it has this one or newer, or ours has expired."""
        if agent_serial is None or agent_serial >= self.fleet.serial:
            return None
        if self.fleet.expired(self.clock()):
            return None
        return self.text

    def refresh(self) -> frozenset[str]:
        """Re-read the file if it changed; the token ids revoked since the last document.

        A file that has gone away keeps the document in force (logged once); so
        does a refused one. One that expires while in force keeps its
        revocations (never "nothing is revoked") but is no longer handed out.
        """
        self._check_expiry()
        try:
            stat = os.stat(self.path)
            if file_signature(stat) == self._signature:
                return frozenset()
            text = self._read_text()
        except OSError as exc:
            if not self._gone:
                self._gone = True
                log.warning(
                    "fleet document %s cannot be read (%s); keeping serial %d",
                    self.path,
                    exc.strerror,
                    self.fleet.serial,
                )
            return frozenset()
        self._gone = False
        # Judged once per change of the file: a refusal is one line, not one every check.
        self._signature = file_signature(stat)
        if text.strip() == self.text:
            return frozenset()
        try:
            new = fleet.verify(text, self.keys, now=self.clock())
        except fleet.FleetError as exc:
            log.warning(
                "fleet document %s refused (%s); keeping serial %d",
                self.path,
                exc,
                self.fleet.serial,
            )
            return frozenset()
        if new.serial <= self.fleet.serial:
            log.warning(
                "fleet document %s refused: serial %d is not newer than the one in force; "
                "keeping serial %d",
                self.path,
                new.serial,
                self.fleet.serial,
            )
            return frozenset()
        added = new.revoked - self.fleet.revoked
        self.fleet, self.text = new, text.strip()
        self._expiry_logged = False
        log.info(
            "fleet document %s: serial %d now in force, %d relays, %d revoked token ids, "
            "%d newly revoked",
            self.path,
            new.serial,
            len(new.relays),
            len(new.revoked),
            len(added),
        )
        return added

    def _check_expiry(self) -> None:
        if self._expiry_logged or not self.fleet.expired(self.clock()):
            return
        self._expiry_logged = True
        log.warning(
            "fleet document %s: serial %d has expired; its revocations stay in force, but "
            "agents are not given it: sign a new one (burrow fleet sign)",
            self.path,
            self.fleet.serial,
        )
