"""A :class:`~sidecar.limiter.LimiterBackend` in Redis, shared by every replica.

Each decision is one Lua script (``register_script``: EVALSHA, loaded again by
redis-py after a Redis restart), so it is atomic across replicas:

- GCRA: the same steps as :meth:`MemoryBackend.decide` (same floats, same
  all-or-nothing over the tenant and user limits); a key lives until its TAT
  passes (``PX``), after which it behaves like a fresh key, as in memory.
  The clock is Redis's ``TIME``: replicas' monotonic clocks cannot be compared.
- concurrency: a sorted set of slot tokens scored by their expiry; a replica
  refreshes the tokens it holds, so the slots of a crashed replica expire by
  themselves after ``slot_ttl`` seconds.
- daily quota: one counter per key and UTC day, expiring two days later.

Redis unreachable: every call falls back to a local :class:`MemoryBackend`
(per-replica limits; requests are still served), ``degraded`` turns True, one
log line marks each transition, and a background probe switches back once Redis
has answered for a few seconds (and drops the connections that outlived the outage).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from framework import depstate
from sidecar.limiter import Limit, MemoryBackend, Verdict

log = logging.getLogger("mtp.sidecar.limiter")

PREFIX = "mtp:rl:"
QUOTA_TTL = 2 * 86400  # a day's counter outlives its day, then goes
SLOT_TTL = 30.0  # seconds a crashed replica's concurrency slots stay taken
PROBE_INTERVAL = 1.0
RECOVER_AFTER = 3.0  # seconds Redis must answer before limits are shared again
SOCKET_TIMEOUT = 0.5  # a decision must not hang a request when Redis stalls
POOL_SIZE = 32
POOL_WAIT = 1.0

# ARGV[1]: now in seconds ('' = Redis TIME); then rate, burst for each key.
GCRA_LUA = """
local now = tonumber(ARGV[1])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local n = #KEYS
local tats, new = {}, {}
local delay, binding, remaining, refused_after = 0, 1, nil, -1
for i = 1, n do
  local rate, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local interval = 1.0 / rate
  local tolerance = burst * interval
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  tats[i] = tat
  local start = tat
  if tat < now then start = now end
  local wait = start - now
  if wait > tolerance then
    local after = wait - tolerance
    if after > refused_after then refused_after, binding = after, i end
  else
    new[i] = start + interval
    local left = math.max(0, math.floor(burst - wait * rate + 1e-9))
    if remaining == nil or left < remaining then remaining, binding = left, i end
    if wait > delay then delay = wait end
  end
end
local cap = tonumber(ARGV[2 * binding + 1]) + 1
if refused_after >= 0 then
  return {0, '0', string.format('%.17g', refused_after), cap, 0,
          string.format('%.17g', tats[binding] - now)}
end
for i = 1, n do
  local ms = math.ceil((new[i] - now) * 1000) + 1
  redis.call('SET', KEYS[i], string.format('%.17g', new[i]), 'PX', ms)
end
return {1, string.format('%.17g', delay), '0', cap, remaining or 0,
        string.format('%.17g', new[binding] - now)}
"""

# KEYS[1]: the slot set; ARGV: limit, token, ttl ms.
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local ttl = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# KEYS[1]: the slot set; ARGV: ttl ms, then the tokens this replica still holds.
REFRESH_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
"""

# KEYS[1]: the day's counter; ARGV[1]: its ttl in seconds.
QUOTA_LUA = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1])) end
return n
"""

LOCAL = None  # marks a slot taken from the local fallback


def connect(url: str, *, socket_timeout: float = SOCKET_TIMEOUT,
            pool_size: int = POOL_SIZE) -> Redis:
    """An asyncio client with a bounded pool, short timeouts and no silent retries."""
    pool = BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=POOL_WAIT, socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout, retry=Retry(NoBackoff(), 0))
    return Redis(connection_pool=pool)


class RedisBackend:
    """Shared limiter state in Redis with a local fallback while Redis is away."""

    def __init__(self, client: Redis, *, fallback: MemoryBackend | None = None,
                 server_clock: bool = True, slot_ttl: float = SLOT_TTL,
                 probe_interval: float = PROBE_INTERVAL, recover_after: float = RECOVER_AFTER,
                 prefix: str = PREFIX) -> None:
        self.client = client
        self.local = fallback or MemoryBackend()
        self.server_clock = server_clock
        self.slot_ttl_ms = int(slot_ttl * 1000)
        self.probe_interval = probe_interval
        self.recover_after = recover_after
        self.prefix = prefix
        self.degraded = False
        self._gcra = client.register_script(GCRA_LUA)
        self._acquire = client.register_script(ACQUIRE_LUA)
        self._refresh = client.register_script(REFRESH_LUA)
        self._quota = client.register_script(QUOTA_LUA)
        self._held: dict[str, list[str | None]] = {}
        self._tokens = itertools.count()
        self._me = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        self._probe: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._state = depstate.dependency("redis_limiter", log, fresh=True)

    @property
    def state(self) -> str:
        """``redis``, or ``degraded`` while local limits stand in (for /readyz)."""
        return "degraded" if self.degraded else "redis"

    async def check(self) -> str:
        """:attr:`state`, after a ping when Redis was fine so far (for /readyz)."""
        if not self.degraded:
            try:
                await self.client.ping()
            except (RedisError, OSError) as exc:
                self._degrade(exc)
        return self.state

    # -- the LimiterBackend protocol --------------------------------------------------

    async def admit(self, limits: Sequence[Limit], now: float) -> Verdict:
        if not self.degraded:
            argv: list[Any] = ["" if self.server_clock else repr(now)]
            for limit in limits:
                argv += [repr(float(limit.rate)), limit.burst]
            try:
                raw = await self._gcra(keys=[self.prefix + lim.key for lim in limits],
                                       args=argv)
                return _verdict(raw)
            except (RedisError, OSError) as exc:
                self._degrade(exc)
        self._state.refused()  # for the limiter: a decision taken locally, not shared
        return await self.local.admit(limits, now)

    async def incr_quota(self, key: str, day: str) -> int:
        if not self.degraded:
            try:
                return int(await self._quota(keys=[f"{self.prefix}{key}\x00{day}"],
                                             args=[QUOTA_TTL]))
            except (RedisError, OSError) as exc:
                self._degrade(exc)
        return await self.local.incr_quota(key, day)

    async def acquire_slot(self, key: str, limit: int) -> bool:
        if not self.degraded:
            token = f"{self._me}:{next(self._tokens)}"
            try:
                won = await self._acquire(keys=[self.prefix + key],
                                          args=[limit, token, self.slot_ttl_ms])
            except (RedisError, OSError) as exc:
                self._degrade(exc)
            else:
                if won:
                    self._held.setdefault(key, []).append(token)
                    self._keep_alive()
                return bool(won)
        if not await self.local.acquire_slot(key, limit):
            return False
        self._held.setdefault(key, []).append(LOCAL)
        return True

    async def release_slot(self, key: str) -> None:
        held = self._held.get(key)
        if not held:
            return
        token = held.pop()
        if not held:
            del self._held[key]
        if token is LOCAL:
            await self.local.release_slot(key)
            return
        try:
            await self.client.zrem(self.prefix + key, token)
        except (RedisError, OSError) as exc:
            self._degrade(exc)  # the token expires by itself after slot_ttl

    async def close(self) -> None:
        for task in (self._probe, self._keeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.local.close()
        await self.client.aclose()

    # -- degraded mode ----------------------------------------------------------------

    def _degrade(self, exc: BaseException) -> None:
        if not self.degraded:
            self.degraded = True
            # The exception's class only: a message may carry the URL (with a password).
            self._state.failed(type(exc).__name__, note="Redis unreachable: rate limits are "
                               "per replica until it returns")
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        """Ping Redis until it has answered for ``recover_after`` seconds, then use it."""
        answering_since: float | None = None
        loop = asyncio.get_running_loop()
        while self.degraded:
            await asyncio.sleep(self.probe_interval)
            try:
                await self.client.ping()
            except (RedisError, OSError):
                answering_since = None
                continue
            if answering_since is None:
                answering_since = loop.time()
            if loop.time() - answering_since < self.recover_after:
                continue  # a restarting Redis answers, then drops: switch back only once
            # Connections that sat idle in the pool through the outage point at the old
            # server: each would fail once and flip the limiter back to local limits.
            await self.client.connection_pool.disconnect(inuse_connections=False)
            self.degraded = False
            self._state.ok()  # logs: rate limits are shared again

    def _keep_alive(self) -> None:
        if self._keeper is None or self._keeper.done():
            self._keeper = asyncio.get_running_loop().create_task(self._refresh_slots())

    async def _refresh_slots(self) -> None:
        """Push the expiry of the slots this replica holds while it lives."""
        interval = self.slot_ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            for key, tokens in list(self._held.items()):
                mine = [t for t in tokens if t is not LOCAL]
                if not mine or self.degraded:
                    continue
                try:
                    await self._refresh(keys=[self.prefix + key],
                                        args=[self.slot_ttl_ms, *mine])
                except (RedisError, OSError) as exc:
                    self._degrade(exc)


def _verdict(raw: Sequence[Any]) -> Verdict:
    """The script's reply (floats travel as strings: Lua numbers become integers)."""
    allowed, delay, retry_after, cap, remaining, reset = raw
    return Verdict(bool(int(allowed)), float(delay), float(retry_after), int(cap),
                   int(remaining), float(reset))

