"""Config versions: every change of the effective config, recorded in SQLite.

Every process that watches the overlay (each gunicorn worker, the sidecar)
records what it applies; a version already recorded by another process since
the one this process last saw is adopted instead of duplicated, so N processes
applying the same change make one version.

Rollback writes the chosen version's overlay back to the overlay file
(atomically). The file stays the single source of truth: every process, every
worker and every replica sharing the mount converges through the same watcher,
and a restart after a rollback loads the rolled-back overlay. A read-only mount
(a Kubernetes ConfigMap) refuses the write: roll back the ConfigMap there.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from framework.diskfull import disk_trouble, schema_failed
from framework.tenant_config import TenantConfig
from framework.usage import connect

log = logging.getLogger("mtp.framework.versions")

DB_NAME = "config.db"
MAX_ID = 2**63 - 1  # the largest SQLite INTEGER
ROLLBACK_MARK = "# mtp: rollback to version "
_ROLLBACK_RE = re.compile(r"\A# mtp: rollback to version (\d+)\n")

SCHEMA = """
CREATE TABLE IF NOT EXISTS config_versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    hash TEXT NOT NULL,
    time REAL NOT NULL,
    source TEXT NOT NULL,
    diff TEXT NOT NULL,
    overlay TEXT,
    config TEXT NOT NULL
);
"""


class RollbackError(Exception):
    """A rollback that cannot be done (unknown version, no or read-only overlay file)."""


@dataclass(frozen=True)
class Version:
    """One applied effective config."""

    id: int
    hash: str
    time: float
    source: str
    diff: tuple[dict[str, Any], ...] = ()
    overlay: str | None = field(default=None, repr=False)  # the overlay file's text; None: none

    def as_dict(self, with_diff: bool = False) -> dict[str, Any]:
        """The JSON shape of ``GET /config/versions`` (diff on request)."""
        out: dict[str, Any] = {
            "id": self.id, "hash": self.hash,
            "time": datetime.fromtimestamp(self.time, UTC).isoformat().replace("+00:00", "Z"),
            "source": self.source,
        }
        if with_diff:
            out["diff"] = list(self.diff)
        return out


def plain(value: Any) -> Any:
    """A frozen config document (mapping proxies, tuples) as plain JSON data."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def flatten(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (arrays are leaves: an overlay replaces them whole)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def diff(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What changed between two config documents, one entry per dotted key."""
    before, after = flatten(old or {}), flatten(new)
    changes = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key, _MISSING) != after.get(key, _MISSING):
            changes.append({"key": key, "old": before.get(key), "new": after.get(key)})
    return changes


_MISSING = object()


def rollback_source(text: str | None) -> int | None:
    """The version an overlay text was rolled back to, from its first line."""
    match = _ROLLBACK_RE.match(text or "")
    return int(match.group(1)) if match else None


class VersionStore:
    """``config_versions`` in the data dir's SQLite database."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            conn = connect(self.path)
            try:
                conn.executescript(SCHEMA)
            finally:
                conn.close()
        except sqlite3.OperationalError as exc:
            schema_failed(self.path, exc, log)  # a worker booting on a full disk

    def record(self, config: TenantConfig, overlay: str | None, source: str,
               seen: int | None) -> Version:
        """Record ``config`` as the newest version, or adopt the same one recorded by
        another process after version ``seen`` (None: this process has seen none).

        A data disk that refuses the write leaves the version unrecorded (id 0) rather
        than stopping the process: the config applies all the same.
        """
        try:
            return self._record(config, overlay, source, seen)
        except sqlite3.OperationalError as exc:
            if not disk_trouble(exc):
                raise
            log.warning("config version not recorded: the data disk refuses writes (%s)",
                        exc)
            return Version(0, config.digest, time.time(), source, (), overlay)

    def _record(self, config: TenantConfig, overlay: str | None, source: str,
                seen: int | None) -> Version:
        doc = plain(config.raw)
        conn = connect(self.path)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = self._adopt(conn, config.digest, seen)
                if version is None:
                    latest = conn.execute(
                        "SELECT config FROM config_versions ORDER BY id DESC LIMIT 1").fetchone()
                    changes = diff(json.loads(latest[0]) if latest else None, doc)
                    now = time.time()
                    cur = conn.execute(
                        "INSERT INTO config_versions (hash, time, source, diff, overlay, config)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        (config.digest, now, source, json.dumps(changes, default=str), overlay,
                         json.dumps(doc, default=str)))
                    version = Version(int(cur.lastrowid or 0), config.digest, now, source,
                                      tuple(changes), overlay)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()
        return version

    def _adopt(self, conn: sqlite3.Connection, digest: str, seen: int | None) -> Version | None:
        if seen is None:  # at start: the same config as the newest one is not a change
            row = conn.execute(f"{_SELECT} ORDER BY id DESC LIMIT 1").fetchone()
            return _version(row) if row and row[1] == digest else None
        row = conn.execute(f"{_SELECT} WHERE id > ? AND hash = ? ORDER BY id LIMIT 1",
                           (seen, digest)).fetchone()
        return _version(row) if row else None

    def list(self, limit: int = 100) -> list[Version]:
        """Newest first."""
        conn = connect(self.path)
        try:
            rows = conn.execute(f"{_SELECT} ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        finally:
            conn.close()
        return [_version(r) for r in rows]

    def get(self, version_id: int) -> Version | None:
        """One version by id."""
        if not 0 < version_id <= MAX_ID:
            return None  # SQLite cannot even compare a bigger int: it raises OverflowError
        conn = connect(self.path)
        try:
            row = conn.execute(f"{_SELECT} WHERE id = ?", (version_id,)).fetchone()
        finally:
            conn.close()
        return _version(row) if row else None

    def latest(self) -> Version | None:
        """The newest version."""
        found = self.list(limit=1)
        return found[0] if found else None


_SELECT = "SELECT id, hash, time, source, diff, overlay FROM config_versions"


def _version(row: tuple[Any, ...]) -> Version:
    return Version(row[0], row[1], row[2], row[3], tuple(json.loads(row[4])), row[5])


def rollback(store: VersionStore, version_id: int, overlay_path: str | Path | None) -> Version:
    """Write version ``version_id``'s overlay to the overlay file; the watchers apply it."""
    version = store.get(version_id)
    if version is None:
        raise RollbackError(f"no config version {version_id}")
    if not overlay_path:
        raise RollbackError("MTP_CONFIG_OVERLAY is not set: there is no overlay file to roll back")
    body = version.overlay or ""
    if rollback_source(body) is not None:  # rolling back to a rollback: keep one mark
        body = body.split("\n", 1)[1]
    write_atomically(Path(overlay_path), f"{ROLLBACK_MARK}{version_id}\n{body}")
    return version


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` in one step so a watcher never reads half a file."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".mtp-overlay-", dir=path.parent)
    except OSError as exc:
        raise RollbackError(f"cannot write next to {path}: {exc.strerror} "
                            "(a read-only mount such as a ConfigMap: roll back there)") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise RollbackError(f"cannot replace {path}: {exc.strerror}") from None
