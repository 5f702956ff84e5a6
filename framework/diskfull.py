"""A full (or failing) data disk, told apart from other store errors.

The data disk holds the SQLite stores (jobs, usage, config versions). When it is
full, SQLite says "database or disk is full" (or "disk I/O error" when it cannot
grow its shared-memory file) and the OS says ENOSPC. The platform degrades
instead of stopping: async calls are 503, usage is kept in memory (then counted
as lost), and a worker process still boots against stores whose schema an
earlier process made.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path

_MESSAGES = ("disk is full", "disk I/O error")
_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})


def disk_trouble(exc: BaseException) -> bool:
    """True when ``exc`` says the disk is full or cannot be written."""
    if isinstance(exc, OSError) and exc.errno in _ERRNOS:
        return True
    return isinstance(exc, sqlite3.Error) and any(m in str(exc) for m in _MESSAGES)


def schema_failed(path: Path, exc: BaseException, log: logging.Logger) -> None:
    """A store's schema could not be made at open: go on when the file is there already
    and the disk is the trouble (an earlier process made the schema); else raise."""
    try:
        made = path.stat().st_size > 0  # SQLite creates the file at connect: empty is new
    except OSError:
        made = False
    if not (disk_trouble(exc) and made):
        raise exc
    log.warning("%s: the data disk refuses writes (%s); working with the existing file",
                path.name, exc)
