"""Live configuration: watch ``MTP_CONFIG_OVERLAY`` and swap the effective config.

A daemon thread polls the file every ``interval`` (50 ms): ``os.stat`` follows
symlinks, so a Kubernetes ConfigMap update (a swap of the ``..data`` symlink)
shows as a new inode; the content hash decides whether anything changed, and
the content is re-read every ``rehash_every`` polls in case an in-place write
kept size and mtime. A valid overlay is merged over tenant.toml and published
by swapping one reference (:class:`ConfigHolder`): a request grabs
``holder.current`` once and keeps that object, so a change never reaches a
request already running. An invalid overlay is logged (file, key, reason) and
the running config is kept. Polling needs no dependency and reacts within one
interval, well under the 100 ms goal.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from framework.tenant_config import ConfigError, TenantConfig, apply_overlay, load_overlay
from framework.versions import VersionStore, rollback_source

log = logging.getLogger("mtp.overlay")

Listener = Callable[[TenantConfig, TenantConfig], None]


class ConfigHolder:
    """The current effective config, replaced whole (an atomic reference swap)."""

    def __init__(self, config: TenantConfig, version_id: int | None = None) -> None:
        self._config = config
        self.version_id = version_id

    @property
    def current(self) -> TenantConfig:
        """Read once per request and keep the object for the whole request."""
        return self._config

    def swap(self, config: TenantConfig, version_id: int | None) -> TenantConfig:
        """Publish ``config``; returns the previous one."""
        old, self._config = self._config, config
        self.version_id = version_id
        return old


def _stat(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a ConfigMap's symlink swap is a new inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: Path) -> bytes | None:
    """The file's bytes; None when there is no file (an unreadable one is refused)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc.strerror}") from None


def _digest(content: bytes | None) -> str:
    return "absent" if content is None else hashlib.sha256(content).hexdigest()


class OverlayWatcher:
    """Applies the overlay file to ``holder`` at start and whenever its content changes."""

    def __init__(self, base: TenantConfig, path: str | Path, holder: ConfigHolder,
                 versions: VersionStore | None = None, *, interval: float = 0.05,
                 rehash_every: int = 20) -> None:
        self.base = base
        self.path = Path(path)
        self.holder = holder
        self.versions = versions
        self.interval = interval
        self.rehash_every = rehash_every
        self._listeners: list[Listener] = []
        self._stat: tuple[int, int, int, int] | None = None
        self._content = ""  # digest of the content last looked at, applied or refused
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    def on_change(self, listener: Listener) -> None:
        """Call ``listener(old, new)`` after each swap (from the watcher thread)."""
        self._listeners.append(listener)

    def load(self) -> TenantConfig:
        """Apply the overlay once, at start. A refused overlay falls back to the overlay
        of the newest recorded version, so a restarted worker runs what the others run."""
        self._stat = _stat(self.path)
        try:
            content = _read(self.path)
            self._content = _digest(content)
            config, text = self._build(content)
        except ConfigError as exc:
            log.error("config overlay refused at start: %s", exc)
            config, text = self._last_good()
        self._publish(config, text)
        return config

    def start(self) -> OverlayWatcher:
        """Start polling in a daemon thread (again in a forked child)."""
        with self._lock:
            if self._thread is None:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="mtp-overlay",
                                                daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def poll(self, force: bool = False) -> bool:
        """Check the file once; True when a new config was published."""
        stat = _stat(self.path)
        if stat == self._stat and not force:
            return False
        self._stat = stat
        try:
            content = _read(self.path)
            digest = _digest(content)
            if digest == self._content:
                return False
            self._content = digest
            config, text = self._build(content)
            changed = _digest(_read(self.path)) != digest
        except ConfigError as exc:
            log.error("config overlay refused, keeping the running config: %s", exc)
            return False
        if changed:
            self._stat = None  # changed while it was parsed: look again next poll
            self._content = ""
            return False
        if config.digest == self.holder.current.digest:
            return False
        self._publish(config, text)
        return True

    def _build(self, content: bytes | None) -> tuple[TenantConfig, str | None]:
        if content is None:
            return self.base, None  # no overlay file: tenant.toml alone
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(str(self.path), "", "not UTF-8 text") from None
        data = load_overlay(self.path)
        return apply_overlay(self.base, data, str(self.path)), text

    def _last_good(self) -> tuple[TenantConfig, str | None]:
        latest = self.versions.latest() if self.versions else None
        if latest is None or latest.overlay is None:
            return self.base, None
        try:
            data: dict[str, Any] = tomllib.loads(latest.overlay)
            return apply_overlay(self.base, data, str(self.path)), latest.overlay
        except (tomllib.TOMLDecodeError, ConfigError) as exc:
            log.error("last recorded overlay does not fit tenant.toml either: %s", exc)
            return self.base, None

    def _publish(self, config: TenantConfig, text: str | None) -> None:
        # Swap first, book-keep after: recording may wait for another process's write.
        seen = self.holder.version_id
        old = self.holder.swap(config, seen)
        if old is not config:
            for listener in self._listeners:
                try:
                    listener(old, config)
                except Exception:
                    log.exception("config listener failed")
        if self.versions is not None:
            version = self.versions.record(config, text, self._source(text), seen=seen)
            self.holder.version_id = version.id
        if old is not config:
            log.info("config applied: version %s hash %s", self.holder.version_id,
                     config.digest[:12])

    def _source(self, text: str | None) -> str:
        if text is None:
            return self.base.source or "tenant.toml"
        target = rollback_source(text)
        return f"{self.path} (rollback to version {target})" if target else str(self.path)

    def _run(self) -> None:
        polls = 0
        while not self._stop.wait(self.interval):
            polls += 1
            try:
                self.poll(force=polls % self.rehash_every == 0)
            except Exception:
                # The watcher must outlive any surprise (a full disk for versions, say).
                log.exception("config overlay watcher error")

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        if self._thread is not None:
            self._thread = None
            self.start()


def live_config(base: TenantConfig, overlay_path: str, versions: VersionStore | None,
                interval: float = 0.05) -> tuple[ConfigHolder, OverlayWatcher | None]:
    """The process's config holder, with the overlay applied and watched when one is set.

    Without an overlay the base config is still recorded as a version, so a new
    image with a changed tenant.toml shows up in the version list.
    """
    holder = ConfigHolder(base)
    if not overlay_path:
        if versions is not None:
            holder.swap(base, versions.record(base, None, base.source or "tenant.toml",
                                              seen=None).id)
        return holder, None
    watcher = OverlayWatcher(base, overlay_path, holder, versions, interval=interval)
    watcher.load()
    return holder, watcher.start()
