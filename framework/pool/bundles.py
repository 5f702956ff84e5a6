"""A pool's bundles: ``DIR/<tenant>/`` (``mtp assemble`` output), read lazily.

Nothing is parsed at start: with 10,000 registered tenants, most idle, a tenant's
tenant.toml is read on its first request and cached under a stamp of its bundle
(the directory it resolves to, its inode, tenant.toml's inode, size and mtime). A
bundle replaced by an atomic rename (or a symlink swap) has a new stamp: the next
look-up reloads it. A removed bundle is no longer served.

:class:`Placement` is the registry's hook: "is tenant T placed in this pool?". Until a
registry is plugged in, :class:`EveryBundle` answers yes for every bundle present.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from framework.tenant_config import TENANT_ID_RE, ConfigError, TenantConfig, load_tenant

REFRESH_SECONDS = 1.0  # an unknown API key re-reads changed bundles at most this often
CACHE_SIZE = 2048  # parsed configs kept (the active tenants); others are re-read on demand


class Placement(Protocol):
    """The registry's answer to "does this pool serve tenant T?"."""

    def placed_here(self, tenant_id: str) -> bool: ...


class EveryBundle:
    """No registry: every bundle present is served."""

    def placed_here(self, tenant_id: str) -> bool:
        return True


@dataclass(frozen=True)
class Bundle:
    """One loaded bundle: where it is, its stamp, its checked config."""

    tenant_id: str
    path: Path  # the resolved directory: a running process stays on this version
    stamp: tuple[object, ...]
    config: TenantConfig


def stamp_of(directory: Path) -> tuple[object, ...] | None:
    """What changes when the bundle is replaced; None when there is no bundle."""
    try:
        real = directory.resolve(strict=True)
        top = os.stat(real)
        toml = os.stat(real / "tenant.toml")
    except OSError:
        return None
    return (str(real), top.st_ino, toml.st_ino, toml.st_size, toml.st_mtime_ns)


class BundleDir:
    """The bundle directory, with an LRU cache of parsed configs and an API key index."""

    def __init__(self, root: Path, placement: Placement | None = None,
                 cache_size: int = CACHE_SIZE) -> None:
        self.root = root
        self.placement = placement or EveryBundle()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Bundle] = OrderedDict()
        # sha256 digest (hex) -> tenant; and per tenant the stamp its keys were read at.
        self._keys: dict[str, str] = {}
        self._key_stamps: dict[str, tuple[object, ...]] = {}
        self._refreshed = float("-inf")

    def names(self) -> list[str]:
        """The tenant ids of the bundles present (one directory listing)."""
        try:
            entries = os.listdir(self.root)
        except OSError:
            return []
        return sorted(e for e in entries if TENANT_ID_RE.match(e))

    def get(self, tenant_id: str) -> Bundle | None:
        """The tenant's bundle when it is present and placed here, else None.

        A bundle whose tenant.toml is wrong, or names another tenant, is refused
        (ConfigError): the pool answers 503 for that tenant and keeps serving the others.
        """
        if not TENANT_ID_RE.match(tenant_id) or not self.placement.placed_here(tenant_id):
            return None
        stamp = stamp_of(self.root / tenant_id)
        cached = self._cache.get(tenant_id)
        if stamp is None:
            self._cache.pop(tenant_id, None)
            return None
        if cached is not None and cached.stamp == stamp:
            self._cache.move_to_end(tenant_id)
            return cached
        path = Path(str(stamp[0]))
        config = load_tenant(path / "tenant.toml")
        if config.tenant_id != tenant_id:
            raise ConfigError(str(path / "tenant.toml"), "tenant.id",
                              f"bundle {tenant_id!r} holds tenant {config.tenant_id!r}")
        bundle = Bundle(tenant_id, path, stamp, config)
        self._cache[tenant_id] = bundle
        self._cache.move_to_end(tenant_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        self._index(bundle)
        return bundle

    def cached_stamp(self, tenant_id: str) -> tuple[object, ...] | None:
        """The stamp of the cached config (None when not cached)."""
        cached = self._cache.get(tenant_id)
        return cached.stamp if cached is not None else None

    def _index(self, bundle: Bundle) -> None:
        for digest in [d for d, t in self._keys.items() if t == bundle.tenant_id]:
            del self._keys[digest]
        for key in bundle.config.api_keys:
            # A digest configured by two tenants names neither: it is dropped for both.
            owner = self._keys.setdefault(key.digest, bundle.tenant_id)
            if owner != bundle.tenant_id:
                self._keys[key.digest] = ""
        self._key_stamps[bundle.tenant_id] = bundle.stamp

    def tenant_of_key(self, presented: str, *, refresh: bool = True) -> str | None:
        """The tenant an API key belongs to, or None.

        The index is filled as bundles are read; with ``refresh``, a miss reads the
        bundles not indexed yet (or changed since), once each and at most once per
        REFRESH_SECONDS, so the first key look-up of a large pool costs one pass over
        the bundles, later ones a dict look-up, and unknown keys cannot make the pool
        re-read its bundles on every request.
        """
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).hexdigest()
        found = self._keys.get(digest)
        now = time.monotonic()
        if found is None and refresh and now - self._refreshed >= REFRESH_SECONDS:
            self._refreshed = now
            self._refresh_keys()
            found = self._keys.get(digest)
        if not found or self.get(found) is None:
            return None
        return found

    def _refresh_keys(self) -> None:
        present = set(self.names())
        for gone in set(self._key_stamps) - present:
            del self._key_stamps[gone]
            for digest in [d for d, t in self._keys.items() if t == gone]:
                del self._keys[digest]
        for tenant_id in present:
            stamp = stamp_of(self.root / tenant_id)
            if stamp is None or self._key_stamps.get(tenant_id) == stamp:
                continue
            try:
                config = load_tenant(Path(str(stamp[0])) / "tenant.toml")
            except ConfigError:
                continue
            if config.tenant_id == tenant_id:
                self._index(Bundle(tenant_id, Path(str(stamp[0])), stamp, config))
