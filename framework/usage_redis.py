"""Usage buckets in Redis: every replica and ``mtp worker`` adds into the same hours.

With ``MTP_REDIS_URL`` set, :class:`~framework.usage.UsageMeter` is unchanged (calls
added up in memory per process, a few µs each, flushed every second) but flushes
into :class:`RedisUsageStore`, so ``GET /usage`` and ``mtp usage`` on any replica
report every replica's calls. The store answers ``add``/``query``/``hourly``/
``hour_rows``/``store_id`` exactly as :class:`~framework.usage.UsageStore` does, and
:class:`RedisWebhookExporter` keeps the billing export's state and lease in Redis
too, so one exporter among all replicas sends each finished hour.

Keys (``P`` is ``mtp:<tenant>:usage``):

- ``P:<hour>``: hash per UTC hour (its unix start). Field
  ``<m>|<service>|<operation>|<user>`` (``m``: c calls, e errors, w wall, p CPU,
  i bytes in, o bytes out, q queue seconds), value the hour's total. Service and
  operation names cannot hold ``|``; the user comes last, so any user id splits
  back unambiguously. Zero deltas are not written (most calls have no error or
  queue wait). Expires :data:`RETENTION` after the hour ends.
- ``P:hours``: sorted set of the hours that have usage, the index queries read.
- ``P:unexported``: hours the billing webhook has not delivered yet.
- ``P:export:<hour>``: hash with the webhook state of one hour; ``P:lease``: the
  exporter lease (owner id, Redis-side expiry).
- ``P:flush:<id>``: marker of an applied flush (under the batch's first tenant),
  kept a day.
- ``mtp:usage:store_id`` (:data:`STORE_ID`): the id made once per Redis database (the
  webhook's ``source``, shared by every replica); the control plane makes it, as a
  tenant's ACL user may only read it.

One hash per hour rather than one per bucket: a range is read with one HGETALL
per hour (pipelined), a flush adds one EXPIREAT per hour rather than per bucket,
no per-bucket index has to be kept consistent, and a whole hour ages out at once.
The price is that a bucket's metrics are separate fields (up to seven).

A flush is one MULTI/EXEC pipeline of HINCRBY/HINCRBYFLOAT, so it lands whole or
not at all. Redis down: the meter keeps the counts and retries at the next flush.
When a reply is lost (timeout after the batch was sent) the batch may have been
applied; its marker tells at the next flush, which then subtracts that batch from
what the meter merged back instead of counting it twice.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from redis import BlockingConnectionPool, Redis
from redis.backoff import NoBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError
from redis.retry import Retry

from framework.errors import Unavailable
from framework.settings import Settings
from framework.tenant_config import BillingSettings
from framework.usage import (
    DB_NAME,
    DEFAULT_GROUP_BY,
    GROUP_FIELDS,
    HOUR,
    HourTotal,
    UsageStore,
    cost,
    hour_of,
    iso_hour,
    usage_row,
)
from framework.webhook import ExportPolicy, WebhookExporter, backoff
from framework.webhook import start_exporter as _start_exporter

log = logging.getLogger("mtp.usage")

# Hours stay this long after they end: past the 31 days anomalies look back, the
# 7-day forecast and a monthly bill; longer history is the webhook receiver's job.
RETENTION = 35 * 24 * HOUR
MARKER_TTL = 24 * HOUR
STORE_ID = "mtp:usage:store_id"
SOCKET_TIMEOUT = 2.0
POOL_SIZE = 8
METRICS = "cewpioq"  # the order of UsageStore rows' values
FLOATS = frozenset("wpq")
INTS = frozenset("ceio")
_ROW_KEY = slice(0, 5)  # tenant, hour, service, operation, user

# Take the lease when free or already ours; the expiry is Redis's clock, not the replicas'.
ACQUIRE_LUA = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class UsageUnavailable(Unavailable):
    """503: the shared usage store (Redis) cannot be read right now."""

    kind = "usage-unavailable"


def connect(url: str) -> Redis:
    """A small bounded client that fails fast: no silent re-sends (a re-sent flush
    could count twice), 2 s timeouts (flushes run off the request path)."""
    return Redis(connection_pool=BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=SOCKET_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
        socket_connect_timeout=SOCKET_TIMEOUT, retry=Retry(NoBackoff(), 0),
        decode_responses=True, driver_info=DriverInfo(lib_version=redis.__version__)))


def open_store(settings: Settings) -> UsageStore | RedisUsageStore:
    """The usage store of this deployment: Redis when MTP_REDIS_URL is set, else SQLite."""
    if settings.redis_url:
        return RedisUsageStore(connect(settings.redis_url))
    return UsageStore(settings.data_dir / DB_NAME)


def start_exporter(store: UsageStore | RedisUsageStore, tenant: str, prices: BillingSettings,
                   secret: str, policy: ExportPolicy | None = None,
                   pricing: Callable[[], BillingSettings] | None = None
                   ) -> WebhookExporter | None:
    """:func:`framework.webhook.start_exporter` with the exporter that fits the store."""
    cls = RedisWebhookExporter if isinstance(store, RedisUsageStore) else WebhookExporter
    return _start_exporter(store, tenant, prices, secret, policy, cls=cls,  # type: ignore[arg-type]
                           pricing=pricing)


def prefix(tenant: str) -> str:
    return f"mtp:{tenant}:usage"


class RedisUsageStore:
    """The hourly buckets in Redis, with the interface of :class:`UsageStore`."""

    errors: tuple[type[BaseException], ...] = (RedisError,)  # a flush retries after these

    def __init__(self, client: Redis, retention: float = RETENTION,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.retention = int(retention)
        self._clock = clock
        self._lock = threading.Lock()
        # A batch whose EXEC reply was lost: (batch id, its rows); settled at the next add.
        self._unsure: tuple[str, list[tuple[Any, ...]]] | None = None
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (s := ref()) and s._after_fork())

    @property
    def store_id(self) -> str:
        """A random id made once per Redis database: the same on every replica."""
        found = self.client.get(STORE_ID)  # a tenant's ACL user may read it, not make it
        if found is None:
            self.client.set(STORE_ID, uuid.uuid4().hex, nx=True)
            found = self.client.get(STORE_ID)
        return str(found)

    # -- writing --------------------------------------------------------------------

    def add(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Add bucket deltas (UsageStore's UPSERT rows) in one MULTI/EXEC."""
        with self._lock:
            rows = self._settle(list(rows))
            if not rows:
                return
            # The marker is the first row's tenant's: a data plane writes its own keys only.
            marker = f"{prefix(rows[0][0])}:flush:{uuid.uuid4().hex}"
            pipe = self.client.pipeline(transaction=True)
            hours: dict[str, set[int]] = {}
            for tenant, hour, service, operation, user, *values in rows:
                key = f"{prefix(tenant)}:{hour}"
                for code, value in zip(METRICS, values, strict=True):
                    if not value:
                        continue
                    name = f"{code}|{service}|{operation}|{user}"
                    if code in FLOATS:
                        pipe.hincrbyfloat(key, name, value)
                    else:
                        pipe.hincrby(key, name, int(value))
                hours.setdefault(tenant, set()).add(int(hour))
            oldest = self._clock() - self.retention - HOUR
            for tenant, found in hours.items():
                p = prefix(tenant)
                for hour in found:
                    pipe.expireat(f"{p}:{hour}", hour + HOUR + self.retention)
                scores = {str(h): h for h in found}
                for index in (f"{p}:hours", f"{p}:unexported"):
                    pipe.zadd(index, scores)
                    pipe.zremrangebyscore(index, "-inf", f"({oldest}")
                    pipe.expire(index, self.retention + 2 * HOUR)
            pipe.set(marker, 1, ex=MARKER_TTL)
            try:
                pipe.execute()
            except RedisError:
                self._unsure = (marker, rows)
                raise

    def _settle(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """Drop from ``rows`` a previous batch that did reach Redis after all."""
        if self._unsure is None:
            return rows
        marker, sent = self._unsure
        applied = self.client.exists(marker)  # Redis down: raises
        self._unsure = None
        if not applied:
            return rows
        log.info("usage flush: a batch whose reply was lost had been written; not adding "
                 "it again")
        return subtract(rows, sent)

    def _after_fork(self) -> None:
        # The parent settles its own batches; a child starts with nothing unsure.
        self._lock = threading.Lock()
        self._unsure = None

    # -- reading --------------------------------------------------------------------

    def hours(self, tenant: str, start: float | None = None,
              end: float | None = None) -> list[int]:
        """Hours with usage from ``start`` (rounded down to its hour) to ``end`` (exclusive)."""
        low = hour_of(start) if start is not None else "-inf"
        high = f"({end}" if end is not None else "+inf"
        return [int(h) for h in self._read(
            lambda: self.client.zrangebyscore(f"{prefix(tenant)}:hours", low, high))]

    def buckets(self, tenant: str, hours: Sequence[int]) -> dict[tuple[int, str, str, str],
                                                                  list[float]]:
        """Every bucket of the given hours: (hour, service, operation, user) -> the
        seven values in :data:`METRICS` order."""
        def read() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for hour in hours:
                pipe.hgetall(f"{prefix(tenant)}:{hour}")
            return pipe.execute()

        found: dict[tuple[int, str, str, str], list[float]] = {}
        for hour, fields in zip(hours, self._read(read) if hours else [], strict=True):
            for name, value in fields.items():
                code, service, operation, user = name.split("|", 3)
                acc = found.setdefault((hour, service, operation, user), [0, 0, 0.0, 0.0, 0, 0,
                                                                          0.0])
                acc[METRICS.index(code)] = float(value) if code in FLOATS else int(value)
        return found

    def query(self, tenant: str, prices: BillingSettings, start: float | None = None,
              end: float | None = None,
              group_by: Sequence[str] = DEFAULT_GROUP_BY) -> list[dict[str, Any]]:
        """Usage and cost rows, as :meth:`UsageStore.query` answers them."""
        fields = [f for f in GROUP_FIELDS if f in group_by]
        groups: dict[tuple[Any, ...], list[float]] = {}
        for (hour, service, operation, user), values in \
                self.buckets(tenant, self.hours(tenant, start, end)).items():
            parts = {"service": service, "operation": operation, "user": user, "hour": hour}
            acc = groups.setdefault(tuple(parts[f] for f in fields), [0, 0, 0.0, 0.0, 0, 0])
            for i in range(6):
                acc[i] += values[i]
        rows = []
        for key in sorted(groups):
            rows.append(usage_row(dict(zip(fields, key, strict=True)), groups[key], prices))
        return rows

    def hourly(self, tenant: str, prices: BillingSettings, start: float | None = None,
               end: float | None = None) -> list[HourTotal]:
        """Calls and cost per hour, gaps between the first and last hour with calls
        filled with zeros (as :meth:`UsageStore.hourly`)."""
        sums: dict[int, list[float]] = {}
        for (hour, *_), values in self.buckets(tenant, self.hours(tenant, start, end)).items():
            acc = sums.setdefault(hour, [0, 0.0, 0])
            acc[0] += values[0]
            acc[1] += values[3]
            acc[2] += values[4] + values[5]
        if not sums:
            return []
        found = {h: HourTotal(h, c, cost(prices, c, cpu, b)) for h, (c, cpu, b) in sums.items()}
        first, last = min(found), max(found)
        return [found.get(h, HourTotal(h, 0, 0.0)) for h in range(first, last + HOUR, HOUR)]

    def hour_rows(self, tenant: str, hour: int) -> list[tuple[Any, ...]]:
        """Raw bucket rows of one hour, as :meth:`UsageStore.hour_rows`."""
        found = self.buckets(tenant, [hour])
        return [(service, operation, user, *values)
                for (_, service, operation, user), values in sorted(found.items())]

    @staticmethod
    def _read(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except RedisError as exc:
            raise UsageUnavailable(
                f"the usage store (Redis) is unreachable ({type(exc).__name__}); "
                "try again shortly") from None


def subtract(rows: list[tuple[Any, ...]], sent: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """``rows`` minus the deltas of ``sent`` (a batch the meter merged back into them)."""
    done = {tuple(r[_ROW_KEY]): r[5:] for r in sent}
    left = []
    for row in rows:
        before = done.get(tuple(row[_ROW_KEY]))
        if before is None:
            left.append(row)
            continue
        values = [a - b for a, b in zip(row[5:], before, strict=True)]
        # Float remainders of (a + b) - a below a nanosecond are noise, not usage.
        values = [v if not isinstance(v, float) or abs(v) > 1e-9 else 0.0 for v in values]
        if any(values):
            left.append((*row[_ROW_KEY], *values))
    return left


class RedisWebhookExporter(WebhookExporter):
    """The billing export over the shared Redis data: one lease for all replicas,
    the per-hour state in ``P:export:<hour>``, ``source`` shared by every replica."""

    store: RedisUsageStore  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._failing = False

    @functools.cached_property
    def source(self) -> str:  # type: ignore[override]
        """The shared store id, read when first needed (Redis may be down at start)."""
        return self.store.store_id[:12]

    @property
    def _lease_key(self) -> str:
        return f"{prefix(self.tenant)}:lease"

    def _export_key(self, hour: int) -> str:
        return f"{prefix(self.tenant)}:export:{hour}"

    def _prepare_state(self) -> None:
        """Nothing to create: Redis keys come with their first write."""

    def _release_lease(self) -> None:
        with contextlib.suppress(RedisError):  # else it expires by itself
            self.store.client.eval(RELEASE_LUA, 1, self._lease_key, self.owner)

    def run_once(self) -> int:
        """One round; Redis down is logged once per transition, not every round."""
        try:
            sent = super().run_once()
        except (RedisError, UsageUnavailable) as exc:
            if not self._failing:
                log.warning("billing webhook: usage store (Redis) unreachable (%s); "
                            "retrying every %.0fs", type(exc).__name__, self.policy.interval)
                self._failing = True
            return 0
        if self._failing:
            log.warning("billing webhook: usage store (Redis) reachable again")
            self._failing = False
        return sent

    def acquire_lease(self) -> bool:
        """Take or renew the shared export lease; False while another process holds it."""
        ttl = max(1, int(self.policy.lease_ttl * 1000))
        return bool(self.store.client.eval(ACQUIRE_LUA, 1, self._lease_key, self.owner, ttl))

    def due_hours(self) -> list[int]:
        """Finished hours not sent yet whose next attempt is due, oldest first."""
        now = self._clock()
        pending = f"{prefix(self.tenant)}:unexported"
        hours = [int(h) for h in self.store.client.zrangebyscore(
            pending, "-inf", now - HOUR - self.policy.grace)]
        if not hours:
            return []
        pipe = self.store.client.pipeline(transaction=False)
        for hour in hours:
            pipe.hmget(self._export_key(hour), "state", "next_attempt")
        due, sent = [], []
        for hour, (state, next_attempt) in zip(hours, pipe.execute(), strict=True):
            if state == "sent":
                sent.append(hour)  # added again by a late flush; its hour went out already
            elif state is None or float(next_attempt or 0) <= now:
                due.append(hour)
        if sent:
            self.store.client.zrem(pending, *sent)
        return due[:self.policy.batch]

    def _mark_sent(self, hour: int) -> None:
        key = self._export_key(hour)
        pipe = self.store.client.pipeline(transaction=True)
        pipe.hset(key, mapping={"state": "sent", "sent_at": self._clock(), "last_error": ""})
        pipe.hincrby(key, "attempts", 1)
        pipe.expireat(key, hour + HOUR + self.store.retention)
        pipe.zrem(f"{prefix(self.tenant)}:unexported", hour)
        pipe.execute()

    def _schedule_retry(self, hour: int, error: str) -> None:
        key = self._export_key(hour)
        attempts = int(self.store.client.hincrby(key, "attempts", 1))
        delay = backoff(attempts, self.policy.base_delay, self.policy.max_delay, self._rand)
        pipe = self.store.client.pipeline(transaction=True)
        pipe.hset(key, mapping={"state": "retry", "next_attempt": self._clock() + delay,
                                "last_error": error})
        pipe.expireat(key, hour + HOUR + self.store.retention)
        pipe.execute()
        # Per attempt: debug only, as in SQLite mode (the outage itself is one line).
        log.debug("billing webhook: hour %s not delivered (%s), attempt %d, retry in %.1fs",
                  iso_hour(hour), error, attempts, delay)

    def status(self) -> list[dict[str, Any]]:
        """Export state per hour, newest first (for operators)."""
        hours = [int(h) for h in self.store.client.zrevrange(f"{prefix(self.tenant)}:hours",
                                                             0, -1)]
        pipe = self.store.client.pipeline(transaction=False)
        for hour in hours:
            pipe.hmget(self._export_key(hour), "state", "attempts", "last_error")
        return [{"hour": iso_hour(h), "state": s, "attempts": int(a or 0), "last_error": e or ""}
                for h, (s, a, e) in zip(hours, pipe.execute() if hours else [], strict=True)
                if s is not None]
