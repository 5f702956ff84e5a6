"""The development JWT secret shared by `mtp run` (template mode) and `mtp token`."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

FILENAME = "dev-jwt-secret"


def dev_jwt_secret(data_dir: Path) -> str:
    """Read the development secret from ``data_dir``, creating it (mode 0600) on first use.

    Only used when the bundled template is served without MTP_JWT_SECRET, so that
    ``TOKEN=$(mtp token --user alice)`` works against ``mtp run`` with no setup.
    """
    path = data_dir / FILENAME
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    # O_EXCL: two processes racing here agree on whichever file was written first.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(value)
    return value
