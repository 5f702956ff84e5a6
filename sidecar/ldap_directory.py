"""LDAP users and groups for the sidecar: Basic logins by bind, group lookups, a TTL cache.

ldap3 is blocking, so every directory call runs on a small bounded thread pool, each thread
borrowing a service-account connection from a pool of at most ``pool_size``. A connection that
fails is thrown away and the call is retried once on a fresh one, which is how the directory
recovers after an outage without a restart. Only successes are cached (``cache_ttl`` seconds);
a cache hit is served while the directory is down, a miss raises ``DirectoryUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import queue
import re
import secrets
import ssl
from collections.abc import Awaitable, Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import ldap3
from cachetools import TTLCache
from ldap3.core.exceptions import LDAPException, LDAPSASLPrepError
from ldap3.utils.conv import escape_filter_chars

from framework import depstate
from framework.tenant_config import LdapSettings

log = logging.getLogger("mtp.sidecar.ldap")

T = TypeVar("T")

# Result codes (RFC 4511) that mean "the directory cannot answer now" rather than "no".
_UNAVAILABLE_CODES = frozenset({51, 52, 80})  # busy, unavailable, other
_SIZE_LIMIT_EXCEEDED = 4
_NO_SUCH_OBJECT = 32
_CACHE_SIZE = 10_000
# The attribute a user filter compares with the username, e.g. uid in "(uid={username})".
_USER_ATTR = re.compile(r"\(\s*([A-Za-z][A-Za-z0-9-]*)\s*=\s*\{username\}\s*\)")


class DirectoryUnavailable(Exception):
    """The directory could not be reached or answered with an error (the sidecar answers 503)."""


class _Ambiguous(Exception):
    """More than one entry matched a username: never a valid principal."""


class LdapClient:
    """The blocking half: pooled service-account connections, user search, user bind."""

    def __init__(self, cfg: LdapSettings, bind_password: str) -> None:
        self._cfg = cfg
        self._bind_password = bind_password
        # Unbounded on purpose: the executor's pool_size threads bound how many exist at once.
        self._pool: queue.LifoQueue[ldap3.Connection] = queue.LifoQueue()
        self._tls = _tls(cfg)
        # Only a filter with one {username} names "the" attribute: "(|(uid=…)(mail=…))" does not.
        named = _USER_ATTR.search(cfg.user_filter)
        one = cfg.user_filter.count("{username}") == 1
        self._user_attr = named.group(1) if named and one else None

    def _server(self) -> ldap3.Server:
        # get_info=NONE: no schema download on every connect.
        return ldap3.Server(self._cfg.url, use_ssl=self._cfg.url.startswith("ldaps://"),
                            tls=self._tls, connect_timeout=self._cfg.timeout,
                            get_info=ldap3.NONE)

    def _open(self, user: str | None, password: str | None) -> ldap3.Connection:
        """A connection, TLS upgraded when configured, not bound yet."""
        # ldap3 packs the receive timeout into SO_RCVTIMEO as whole seconds.
        conn = ldap3.Connection(self._server(), user=user or None, password=password,
                                receive_timeout=max(1, math.ceil(self._cfg.timeout)),
                                auto_bind=ldap3.AUTO_BIND_NONE,
                                raise_exceptions=False, read_only=True)
        conn.open()
        if self._cfg.start_tls and not conn.start_tls():
            _quietly_unbind(conn)
            raise DirectoryUnavailable(f"StartTLS refused: {conn.result.get('description')}")
        return conn

    def _reader(self) -> ldap3.Connection:
        """A new service-account connection, bound."""
        conn = self._open(self._cfg.bind_dn, self._bind_password)
        if not conn.bind():
            desc = conn.result.get("description")
            _quietly_unbind(conn)
            # Logged once per outage by the dependency state (LdapDirectory._ask).
            raise DirectoryUnavailable(f"service account bind failed: {desc}")
        return conn

    def _with_reader(self, work: Callable[[ldap3.Connection], T]) -> T:
        """Run ``work`` on a pooled connection; a broken one is replaced and retried once."""
        for attempt in (1, 2):
            try:
                conn = self._pool.get_nowait()
            except queue.Empty:
                conn = None
            try:
                if conn is None:
                    conn = self._reader()
                result = work(conn)
            except (LDAPException, OSError) as exc:
                if conn is not None:
                    _quietly_unbind(conn)
                if attempt == 2:
                    raise DirectoryUnavailable(str(exc)) from exc
                continue
            except BaseException:
                if conn is not None:
                    _quietly_unbind(conn)
                raise
            self._pool.put_nowait(conn)
            return result
        raise AssertionError("unreachable")

    def _search(self, conn: ldap3.Connection, base: str, flt: str, attrs: Any,
                size_limit: int = 0) -> list[dict[str, Any]]:
        # ldap3's return value is False for "no entries" and True for a size limit hit:
        # only the result code tells success from failure.
        conn.search(base, flt, search_scope=ldap3.SUBTREE, attributes=attrs,
                    size_limit=size_limit)
        code = conn.result.get("result", 0)
        if code == _SIZE_LIMIT_EXCEEDED and size_limit:
            raise _Ambiguous  # more entries than the caller allowed for
        if code not in (0, _NO_SUCH_OBJECT):
            # Including a server size limit hit by a group search: partial groups would
            # silently drop permissions, so fail closed.
            raise DirectoryUnavailable(f"search under {base} failed: "
                                       f"{conn.result.get('description')}")
        return [e for e in (conn.response or []) if e.get("type") == "searchResEntry"]

    def find_user(self, username: str) -> str | None:
        """The DN of the one entry matching ``user_filter``; None for none or several.

        When the filter names the attribute (``(uid={username})``), the entry must also hold
        ``username`` exactly: the directory matches ``ALICE`` or `` alice`` to alice, and
        accepting those would let one person appear as several user ids (own rate limits,
        jobs, audit trail).
        """
        flt = self._cfg.user_filter.replace("{username}", escape_filter_chars(username))
        attr = self._user_attr

        def work(conn: ldap3.Connection) -> str | None:
            try:
                entries = self._search(conn, self._cfg.user_base, flt,
                                       [attr] if attr else ldap3.NO_ATTRIBUTES, size_limit=2)
            except _Ambiguous:
                return None
            if len(entries) != 1:
                return None
            if attr and username not in _values(entries[0], attr):
                return None
            return entries[0]["dn"]

        return self._with_reader(work)

    def groups_of(self, username: str, user_dn: str) -> tuple[str, ...]:
        """The ``group_attr`` values of every group matching ``group_filter`` for this user."""
        if not (self._cfg.group_base and self._cfg.group_filter):
            return ()
        flt = (self._cfg.group_filter.replace("{user_dn}", escape_filter_chars(user_dn))
               .replace("{username}", escape_filter_chars(username)))
        attr = self._cfg.group_attr

        def work(conn: ldap3.Connection) -> tuple[str, ...]:
            found: set[str] = set()
            for entry in self._search(conn, self._cfg.group_base, flt, [attr]):
                found.update(v for v in _values(entry, attr) if v)
            return tuple(sorted(found))

        return self._with_reader(work)

    def check_password(self, user_dn: str, password: str) -> bool:
        """Bind as the user on a fresh connection: True on success, False on refusal."""
        if not password:  # an empty password would be an unauthenticated bind that "succeeds"
            return False
        try:
            conn = self._open(user_dn, password)
            try:
                ok = conn.bind()
                code = conn.result.get("result")
            finally:
                _quietly_unbind(conn)
        except LDAPSASLPrepError:
            # RFC 4013 prohibits the password (a control character, ...): ldap3 refuses to
            # send it. That is the client's password, not the directory being down.
            return False
        except (LDAPException, OSError) as exc:
            raise DirectoryUnavailable(str(exc)) from exc
        if ok:
            return True
        if code in _UNAVAILABLE_CODES:
            raise DirectoryUnavailable(f"user bind failed with result {code}")
        return False

    def close(self) -> None:
        """Unbind every pooled connection."""
        while True:
            try:
                _quietly_unbind(self._pool.get_nowait())
            except queue.Empty:
                return


def _values(entry: dict[str, Any], attr: str) -> list[str]:
    """The values of one attribute of a search entry (attribute names are case-insensitive)."""
    for name, value in entry.get("attributes", {}).items():
        if name.lower() == attr.lower():
            return [str(v) for v in (value if isinstance(value, list) else [value])]
    return []


def _quietly_unbind(conn: ldap3.Connection) -> None:
    """Unbind; a connection that is already broken may fail to, which changes nothing."""
    with contextlib.suppress(LDAPException, OSError):
        conn.unbind()


def _tls(cfg: LdapSettings) -> ldap3.Tls | None:
    """Certificate-checking TLS settings for ldaps:// and StartTLS (CA from ``ca_file``)."""
    if not (cfg.start_tls or cfg.url.startswith("ldaps://")):
        return None
    return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=cfg.ca_file or None)


class LdapDirectory:
    """The async face the sidecar uses: ``login`` and ``groups_for``, cached, off the event loop."""

    def __init__(self, cfg: LdapSettings, bind_password: str) -> None:
        self._cfg = cfg
        self._client = LdapClient(cfg, bind_password)
        self._executor = ThreadPoolExecutor(max_workers=cfg.pool_size,
                                            thread_name_prefix="mtp-ldap")
        ttl = max(cfg.cache_ttl, 0.0)
        self._logins: TTLCache[Hashable, tuple[str, tuple[str, ...]]] | None = (
            TTLCache(_CACHE_SIZE, ttl) if ttl else None)
        self._groups: TTLCache[Hashable, tuple[str, ...]] | None = (
            TTLCache(_CACHE_SIZE, ttl) if ttl else None)
        # Per-process key: cached login keys never hold a plain, unsalted password hash.
        self._pepper = secrets.token_bytes(32)
        self._inflight: dict[Hashable, asyncio.Future[Any]] = {}
        self._state = depstate.dependency("ldap", log, fresh=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _ask(self, fn: Callable[..., T], *args: Any) -> T:
        """A directory call whose outcome moves the dependency state (one line per outage)."""
        try:
            answer = await self._run(fn, *args)
        except DirectoryUnavailable as exc:
            self._state.failed(f"{self._cfg.url}: {exc}")
            raise
        self._state.ok()
        return answer

    async def _refusing(self, key: Hashable, make: Callable[[], Awaitable[T]]) -> T:
        """:meth:`_once`, counting each caller the outage refuses."""
        try:
            return await self._once(key, make)
        except DirectoryUnavailable:
            self._state.refused()
            raise

    async def _once(self, key: Hashable, make: Callable[[], Awaitable[T]]) -> T:
        """Concurrent callers asking the same question share one directory round trip.

        The lookup runs as its own task, so a caller that goes away (client disconnect) does
        not cancel the answer the others wait for.
        """
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(make())
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._settled(key, t))
        return await asyncio.shield(task)

    def _settled(self, key: Hashable, task: asyncio.Future[Any]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here, so an answer nobody awaited is not logged as lost

    async def login(self, username: str, password: str) -> tuple[str, tuple[str, ...]] | None:
        """(user DN, groups) when the password binds as the one entry for ``username``."""
        if not username or not password:
            return None
        digest = hmac.new(self._pepper, password.encode(), hashlib.sha256).digest()
        key = ("login", username, digest)
        if self._logins is not None and key in self._logins:
            return self._logins[key]

        async def lookup() -> tuple[str, tuple[str, ...]] | None:
            user_dn = await self._ask(self._client.find_user, username)
            if user_dn is None:
                return None
            if not await self._ask(self._client.check_password, user_dn, password):
                log.info("LDAP login refused for %r", username)
                return None
            groups = await self._ask(self._client.groups_of, username, user_dn)
            return user_dn, groups

        answer = await self._refusing(key, lookup)
        if answer is not None and self._logins is not None:
            self._logins[key] = answer
            if self._groups is not None:
                self._groups[username] = answer[1]
        return answer

    async def groups_for(self, user_id: str) -> tuple[str, ...] | None:
        """The groups of the one directory entry for ``user_id``; None when there is no entry."""
        if not user_id:
            return None
        if self._groups is not None and user_id in self._groups:
            return self._groups[user_id]

        async def lookup() -> tuple[str, ...] | None:
            user_dn = await self._ask(self._client.find_user, user_id)
            if user_dn is None:
                return None
            return await self._ask(self._client.groups_of, user_id, user_dn)

        groups = await self._refusing(("groups", user_id), lookup)
        # "No entry" is a successful answer too: cached, so a principal that lives only
        # in tokens or API keys costs no search per request and survives an outage.
        if self._groups is not None:
            self._groups[user_id] = groups
        return groups

    async def close(self) -> None:
        """Unbind pooled connections and stop the worker threads."""
        await self._run(self._client.close)
        self._executor.shutdown(wait=False, cancel_futures=True)
