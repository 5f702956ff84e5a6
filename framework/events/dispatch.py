"""Delivery: due deliveries claimed from the store and run on a small thread pool.

Each delivery is one async invocation of the route's service as the principal that
published the event, with ``context.event`` and ``context.payload = data``. The
target's authz is checked here, at delivery: a refusal (or a service that is gone) is
a dead letter at once, never a retry loop. Other failures are retried after the
route's exponential backoff, then dead-lettered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from framework import logs, tracing
from framework.authz import decide
from framework.context import Context
from framework.errors import FrameworkError
from framework.events.binding import to_http, trace_context
from framework.events.observe import DEAD, DELIVERED, LAG, RETRIED, EventAudit, type_label
from framework.events.store import DEAD as DEAD_STATUS
from framework.events.store import DONE, PENDING, Delivery, EventStore
from framework.flags import FlagSet
from framework.redis_wait import Outage
from framework.runtime import Runtime

if TYPE_CHECKING:
    from framework.events.store_redis import RedisEventStore

SINK_TIMEOUT = 10.0
PRUNE_SECONDS = 3600.0  # how often delivered events are forgotten
KEEP_SECONDS = 7 * 24 * 3600  # delivered events are kept a week

log = logging.getLogger("mtp.framework.events")


class Refused(Exception):
    """The delivery can never succeed as it is: a dead letter at once."""


@dataclass
class Dispatcher:
    """Claims and runs the deliveries of one tenant in this process."""

    rt: Runtime
    store: EventStore | RedisEventStore
    audit: EventAudit
    capacity: int = 4
    poll: float = 0.05  # idle poll (Settings.events_poll): another worker's events
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:"
                                               f"{uuid.uuid4().hex[:8]}")
    wake: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _inflight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None
    _pool: ThreadPoolExecutor | None = None
    _outage: Outage = field(default_factory=lambda: Outage(log, "event delivery"))

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.capacity, thread_name_prefix="mtp-event")
        self._thread = threading.Thread(target=self._loop, name="mtp-events", daemon=True)
        self._thread.start()

    def close(self, wait: float = 2.0) -> None:
        """Stop claiming; give running deliveries ``wait`` seconds, hand the rest back."""
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        self.wake.set()
        self._thread.join(wait)
        deadline = time.monotonic() + wait
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(Exception):
            released = self.store.release(self.owner)
            if released:
                log.info("handed %d running deliveries back", released)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        renewed = pruned = time.monotonic()
        while not self._stop.is_set():
            try:
                if time.monotonic() - pruned > PRUNE_SECONDS:
                    self.store.prune(KEEP_SECONDS)
                    pruned = time.monotonic()
                free = self.capacity - self._inflight
                lease = self.store.lease
                batch = self.store.claim(self.owner, free, lease) if free > 0 else []
                if time.monotonic() - renewed > lease / 3:
                    self.store.renew(self.owner, lease)
                    renewed = time.monotonic()
                self._outage.answered()
            except RedisError as exc:
                # Redis away: one line when it goes and one when it is back, not a
                # traceback per poll; the entries wait in Redis meanwhile.
                self._outage.failed(exc)
                batch = []
            except Exception:
                log.exception("claiming deliveries failed")
                batch = []
            for delivery in batch:
                with self._lock:
                    self._inflight += 1
                assert self._pool is not None
                self._pool.submit(self._run, delivery)
            if not batch:
                self.wake.wait(self.poll)
                self.wake.clear()

    def _run(self, d: Delivery) -> None:
        try:
            self._attempt(d)
        except Exception:
            log.exception("delivery %s failed unexpectedly", d.did)
        finally:
            with self._lock:
                self._inflight -= 1
            self.wake.set()  # the next event of the subject may be due now

    def _attempt(self, d: Delivery) -> None:
        route, event = d.route, d.event
        if d.attempts == 1:
            LAG.labels(self.rt.tenant.tenant_id).observe(max(0.0, time.time() - d.published))
        label = type_label(event.type)
        tenant = self.rt.tenant.tenant_id
        target = route.sink or route.service
        try:
            status, error = self._deliver(d)
        except Refused as exc:
            status, error = 403, str(exc)
            self.store.finish(d.did, self.owner, DEAD_STATUS, error)
            DEAD.labels(tenant, label).inc()
            self._audit(d, "dead", f"refused: {error}", status, target)
            return
        if status < 300:
            self.store.finish(d.did, self.owner, DONE)
            DELIVERED.labels(tenant, label).inc()
            self._audit(d, "delivered", "", status, target)
        elif d.attempts > route.retries:
            self.store.finish(d.did, self.owner, DEAD_STATUS, error)
            DEAD.labels(tenant, label).inc()
            self._audit(d, "dead", f"attempt {d.attempts}: {error}", status, target)
        else:
            self.store.finish(d.did, self.owner, PENDING, error,
                              time.time() + route.delay(d.attempts))
            RETRIED.labels(tenant, label).inc()
            self._audit(d, "retry", f"attempt {d.attempts}: {error}", status, target)


    def _audit(self, d: Delivery, outcome: str, reason: str, status: int, target: str) -> None:
        self.audit.write(request_id=d.publisher.request_id, user=d.publisher.user,
                         auth_method=d.publisher.auth_method, outcome=outcome,
                         event_id=d.event.id, event_type=d.event.type, service=target,
                         operation=d.route.operation, reason=reason, status=status)

    def _deliver(self, d: Delivery) -> tuple[int, str]:
        if d.route.sink:
            return self._sink(d)
        rt, route, who = self.rt, d.route, d.publisher
        tenant = rt.tenant
        operation = route.operation or None
        try:
            spec = rt.registry.resolve(route.service)
            spec.check_operation(operation)
        except FrameworkError as exc:
            if exc.status in (403, 404):  # gone, disabled, not in the plan: never will run
                raise Refused(exc.detail) from None
            return exc.status, exc.detail  # e.g. a module that fails to import: retried
        decision = decide(tenant.authz, who, spec.name, operation)
        if not decision.allowed:
            raise Refused(decision.reason)
        ctx = Context(
            tenant_id=tenant.tenant_id, service=spec.name, operation=operation,
            user=who.user, groups=who.groups, roles=who.roles, auth_method=who.auth_method,
            payload=d.event.data, params={}, request_id=who.request_id,
            config=tenant.service(spec.name).config,
            flags=FlagSet(tenant.flags, tenant.tenant_id, who.user, who.groups, who.roles),
            logger=logs.service_logger(tenant.tenant_id, who.request_id, spec.name, operation),
            deadline=time.monotonic() + spec.timeout)
        ctx.event = d.event.public()  # type: ignore[attr-defined]
        token = logs.REQUEST_ID.set(who.request_id)
        try:
            # Linked to the publish's span (when tracing is on), as a job's is to its request.
            with tracing.link_span("mtp.event.deliver", trace_context(d.event.extra),
                                   {"mtp.tenant": tenant.tenant_id, "mtp.service": spec.name,
                                    "mtp.event.type": d.event.type}):
                outcome = rt.executor.call(spec, ctx)
        finally:
            logs.REQUEST_ID.reset(token)
        error = ""
        if outcome.error is not None:
            error = getattr(outcome.error, "detail", "") or type(outcome.error).__name__
        return outcome.status, error

    def _sink(self, d: Delivery) -> tuple[int, str]:
        """A CloudEvents POST to another mtp's /events, with the route's token."""
        headers, body = to_http(d.event)
        token = self.rt.settings.secret(d.route.sink_token_env)
        if not token:
            return 0, f"{d.route.sink_token_env} is not set"
        headers["Authorization"] = f"Bearer {token}"
        headers["X-Request-ID"] = d.publisher.request_id
        # The schema allows http(s) sinks only.
        req = urllib.request.Request(d.route.sink, data=body, headers=headers,  # noqa: S310
                                     method="POST")
        try:
            with urllib.request.urlopen(req, timeout=SINK_TIMEOUT) as reply:  # noqa: S310
                return reply.status, ""
        except urllib.error.HTTPError as exc:
            return exc.code, f"sink answered {exc.code}"
        except (OSError, ValueError) as exc:
            return 0, f"sink unreachable: {type(exc).__name__}"


