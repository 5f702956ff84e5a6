"""Each tenant's Redis user for its processes in a pool, made by the pool.

A tenant process connects to Redis as the tenant's ACL user ``t-<tenant>``
(framework/control/acl.py), limited to that tenant's keys. The operator may give its
URL (``MTP_REDIS_URL__<TENANT>``); otherwise a pool whose own ``MTP_REDIS_URL`` may run
ACL commands adds a password of its own to the tenant's user (creating the user with
the control plane's rules when there is none) and hands that URL to the tenant's
processes alone. Redis refusing ACL commands to the pool (a managed Redis, a user
without ``+acl``) is logged once: tenants then keep jobs and usage in their SQLite,
as without Redis. Redis unreachable is an error: no process starts on the wrong store.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from framework.control.acl import AclUser, rules, user_name
from framework.pool.keys import redis_password

log = logging.getLogger("mtp.pool")


class RedisUsers:
    """The Redis URL of each tenant's processes, its user made or given a password once."""

    def __init__(self, redis_url: str, pool_secret: bytes, pool_name: str,
                 client: Any = None) -> None:
        self.redis_url, self.pool_secret, self.pool_name = redis_url, pool_secret, pool_name
        self._client = client
        self._urls: dict[str, str] = {}
        self._refused = False
        self._lock = threading.Lock()  # the event loop and the CPU watch both ask

    def url(self, tenant_id: str) -> str:
        """The tenant's Redis URL ('' when this Redis refuses the pool ACL commands)."""
        found = self._urls.get(tenant_id)
        if found is not None or self._refused:
            return found or ""
        with self._lock:
            if tenant_id not in self._urls and not self._refused:
                self._urls[tenant_id] = self._make(tenant_id)
            return self._urls.get(tenant_id, "")

    def _make(self, tenant_id: str) -> str:
        from redis.exceptions import ResponseError

        password = redis_password(self.pool_secret, self.pool_name, tenant_id)
        user = user_name(tenant_id)
        client = self._connect()
        try:
            if client.acl_getuser(user) is None:
                # No control plane made it: its rules, without dropping other passwords.
                args = [r for r in rules(tenant_id, password) if r != "reset"]
            else:
                args = [f">{password}"]  # the control plane's rules stay as they are
            client.execute_command("ACL", "SETUSER", user, *args)
        except ResponseError as exc:
            log.warning("this Redis refuses the pool's ACL commands (%s): tenants without "
                        "MTP_REDIS_URL__<TENANT> keep their jobs and usage in SQLite", exc)
            self._refused = True
            return ""
        return AclUser(user, password).url(self.redis_url)

    def _connect(self) -> Any:
        if self._client is None:
            from redis import Redis

            self._client = Redis.from_url(self.redis_url, socket_timeout=2,
                                          socket_connect_timeout=2)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
