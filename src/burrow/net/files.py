"""Files burrow keeps: written whole, private, and through no file another user made.

No cryptography here: the client imports it to keep what it learns of relays.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Final

from burrow.exception import InvalidError

PRIVATE_MODE: Final = 0o600


def write_atomically(path: Path, data: bytes, mode: int = PRIVATE_MODE) -> None:
    """Write ``path`` whole with ``mode`` (private by default), through no file anyone else made.

    The temporary file beside the target is a fresh one of this process's own
    (``mkstemp``: a random name, ``O_EXCL``, mode 0600 from creation), so
    another local user cannot pre-create it or point it elsewhere with a
    symlink; the rename then makes it the target, which a reader sees old or
    new, never half written.
    """
    try:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise InvalidError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as exc:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InvalidError(f"cannot write {path}: {exc.strerror}") from exc
        raise
