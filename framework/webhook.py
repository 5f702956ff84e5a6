"""Billing export: finished hourly usage buckets POSTed to ``billing.webhook_url``.

One POST per finished hour of the tenant, body JSON, signed in the Standard
Webhooks format (https://www.standardwebhooks.com/) so that a receiver verifies it,
timestamp and replay window included, with an off-the-shelf library
(``standardwebhooks.Webhook(secret).verify(body, headers)``)::

    webhook-id: usage-<tenant>-<hour>-<source>      (the same on every retry)
    webhook-timestamp: <unix seconds at this attempt>
    webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">

The key is ``billing.webhook_secret_env``'s value: a Standard Webhooks secret
(``whsec_<base64>``) is base64-decoded, any other value is used as its UTF-8
bytes (then the receiver's secret is ``whsec_`` + base64 of it). The id also
goes out as ``Idempotency-Key`` (a retry of the same hour carries the same id,
so the receiver drops duplicates). ``source`` is the usage database's id:
replicas with their own data dir each send their share of an hour under their
own key (the receiver adds them up), never one replica's share under another's. Delivery is
at-least-once: an hour is marked sent in SQLite only after a 2xx, failures are
retried with exponential backoff and jitter, and a restart resumes from the table.

Each hour is priced when its payload is built, by ``pricing`` (in a fleet the
plan in force, read from the registry: see framework/control/tenant_check.py;
else the tenant's own ``[billing]``). When the prices cannot be known (the
registry unreachable or unreadable), the hour is not sent: it is retried with
the same backoff, and the outage is one log line (dependency ``fleet_registry``),
never a payload at prices the tenant set for itself. The URL and secret are
always the tenant's own.

It runs in a daemon thread of the framework (the process that owns the usage
database; the sidecar may not even share the data dir), never on a request
path. Every gunicorn worker may start one; a lease row lets exactly one export
at a time and hands over when its holder dies.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import os
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook

from framework import __version__, depstate
from framework.errors import Unavailable
from framework.tenant_config import BillingSettings
from framework.usage import HOUR, UsageStore, cost, iso_hour

log = logging.getLogger("mtp.webhook")

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SECRET_PREFIX = "whsec_"  # noqa: S105 - the Standard Webhooks secret prefix, not a secret
LEASE = "billing-webhook"

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_exports (
    tenant TEXT NOT NULL,
    hour INTEGER NOT NULL,
    state TEXT NOT NULL,              -- 'retry' or 'sent'
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    sent_at REAL,
    PRIMARY KEY (tenant, hour)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires REAL NOT NULL
);
"""


def signing_key(secret: str) -> bytes:
    """The HMAC key of a configured secret: ``whsec_<base64>`` decoded, else its UTF-8 bytes.

    ValueError when a ``whsec_`` secret is not valid base64 (the message never holds it).
    """
    if secret.startswith(SECRET_PREFIX):
        try:
            key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a whsec_ secret must be base64 after the prefix") from None
        if not key:
            raise ValueError("a whsec_ secret must not be empty")
        return key
    return secret.encode()


def signed_headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one delivery attempt."""
    when = datetime.fromtimestamp(timestamp, UTC)
    return {
        ID_HEADER: msg_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: Webhook(key).sign(msg_id, when, body.decode()),
    }


def idempotency_key(tenant: str, hour: int, source: str) -> str:
    """Stable id of one tenant's hour from one usage database: the same on every retry
    and after restarts."""
    return f"usage-{tenant}-{iso_hour(hour)}-{source}"


def backoff(attempts: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Seconds before retry number ``attempts`` (1, 2, ...): capped 2^n with equal jitter."""
    delay = min(cap, base * 2 ** (attempts - 1))
    return delay / 2 + rand() * delay / 2


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # urllib would turn a redirected POST into a GET without body and call it success.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass(frozen=True)
class ExportPolicy:
    """How and when to deliver."""

    grace: float = 10.0  # an hour is finished this long after it ends (late flushes)
    interval: float = 1.0  # seconds between rounds
    base_delay: float = 1.0
    max_delay: float = 300.0
    timeout: float = 10.0
    lease_ttl: float = 30.0
    batch: int = 50  # hours per round at most


class WebhookExporter:
    """Exports one tenant's finished hours; start it in any number of processes."""

    def __init__(self, store: UsageStore, tenant: str, prices: BillingSettings,
                 secret: bytes, policy: ExportPolicy | None = None,
                 clock: Callable[[], float] = time.time,
                 pricing: Callable[[], BillingSettings] | None = None) -> None:
        """``prices``: the tenant's own [billing] (its webhook URL; its prices unless
        ``pricing`` says otherwise). ``pricing``: the prices in effect, called once per
        hour sent; it raises :class:`~framework.errors.Unavailable` when they cannot
        be known, and the hour waits."""
        if not prices.webhook_url.startswith(("http://", "https://")):
            raise ValueError("billing.webhook_url must be an http(s) URL")
        self.store = store
        self.tenant = tenant
        self.prices = prices
        self.pricing = pricing or (lambda: prices)
        self._registry: depstate.Dependency | None = None  # made at the first outage
        self._secret = secret
        self.policy = policy or ExportPolicy()
        self._clock = clock
        self._rand = secrets.SystemRandom().random
        self._opener = urllib.request.build_opener(_NoRedirect)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prepare_state()
        os.register_at_fork(after_in_child=self._after_fork)

    def _prepare_state(self) -> None:
        """Read the store's source id; create the export tables (a Redis store overrides)."""
        self.source = self.store.store_id[:12]
        with self.store.connect() as conn:
            conn.executescript(SCHEMA)

    def start(self) -> WebhookExporter:
        """Export in a daemon thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="mtp-billing-webhook",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop and hand the lease over at once."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.policy.timeout + 5)
        self._release_lease()

    def _release_lease(self) -> None:
        with self.store.connect() as conn:
            conn.execute("UPDATE leases SET expires = 0 WHERE name = ? AND owner = ?",
                         (LEASE, self.owner))

    def run_once(self) -> int:
        """One round: with the lease, deliver the due hours; returns how many were sent."""
        sent = 0
        for hour in self.due_hours():
            if self._stop.is_set() or not self.acquire_lease():
                break
            sent += self.deliver(hour)
        return sent

    def acquire_lease(self) -> bool:
        """Take or renew the export lease; False while another live process holds it."""
        now = self._clock()
        with self.store.connect() as conn:
            conn.execute(
                "INSERT INTO leases (name, owner, expires) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " expires = excluded.expires WHERE leases.owner = excluded.owner"
                " OR leases.expires < ?",
                (LEASE, self.owner, now + self.policy.lease_ttl, now))
            row = conn.execute("SELECT owner FROM leases WHERE name = ?", (LEASE,)).fetchone()
        return bool(row) and row[0] == self.owner

    def due_hours(self) -> list[int]:
        """Finished hours not sent yet whose next attempt is due, oldest first."""
        now = self._clock()
        with self.store.connect() as conn:
            rows = conn.execute(
                "SELECT DISTINCT u.hour FROM usage_hourly u LEFT JOIN webhook_exports e"
                " ON e.tenant = u.tenant AND e.hour = u.hour"
                " WHERE u.tenant = ? AND u.hour + ? <= ?"
                " AND (e.state IS NULL OR (e.state != 'sent' AND e.next_attempt <= ?))"
                " ORDER BY u.hour LIMIT ?",
                (self.tenant, HOUR + self.policy.grace, now, now, self.policy.batch)).fetchall()
        return [r[0] for r in rows]

    def payload(self, hour: int, prices: BillingSettings | None = None) -> dict[str, Any]:
        """The JSON document of one hour, at ``prices`` (default: the prices in effect,
        Unavailable when they cannot be known)."""
        prices = prices or self.pricing()
        rows, totals = [], {"calls": 0, "errors": 0, "cpu_seconds": 0.0,
                            "bytes_in": 0, "bytes_out": 0}
        for svc, op, user, calls, errors, wall, cpu, b_in, b_out, queue in \
                self.store.hour_rows(self.tenant, hour):
            rows.append({
                "service": svc, "operation": op or None, "user": user, "calls": calls,
                "errors": errors, "wall_seconds": round(wall, 6), "cpu_seconds": round(cpu, 6),
                "bytes_in": b_in, "bytes_out": b_out, "queue_seconds": round(queue, 6),
                "cost": cost(prices, calls, cpu, b_in + b_out),
            })
            totals["calls"] += calls
            totals["errors"] += errors
            totals["cpu_seconds"] += cpu
            totals["bytes_in"] += b_in
            totals["bytes_out"] += b_out
        totals["cpu_seconds"] = round(totals["cpu_seconds"], 6)
        totals["cost"] = cost(prices, totals["calls"], totals["cpu_seconds"],
                              totals["bytes_in"] + totals["bytes_out"])
        return {
            "type": "mtp.usage.hourly",
            "idempotency_key": idempotency_key(self.tenant, hour, self.source),
            "tenant": self.tenant,
            "source": self.source,
            "hour": iso_hour(hour),
            "currency": prices.currency,
            "rows": rows,
            "totals": totals,
        }

    def deliver(self, hour: int) -> int:
        """POST one hour; record success, or schedule the retry. Returns 1 when sent."""
        try:
            prices = self.pricing()  # apart from payload(): a usage store error is not this
        except Unavailable as exc:
            # No prices, no payload: the hour waits for the registry with the usual backoff.
            if self._registry is None:
                self._registry = depstate.dependency("fleet_registry", log)
            self._registry.failed(exc.detail)  # one line per outage, not per attempt
            self._registry.refused()
            self._schedule_retry(hour, f"prices unavailable: {exc.detail}")
            return 0
        if self._registry is not None:
            self._registry.ok()
        body = json.dumps(self.payload(hour, prices), sort_keys=True,
                          separators=(",", ":")).encode()
        msg_id = idempotency_key(self.tenant, hour, self.source)
        # Signed at send time: each retry carries a fresh timestamp (and the same id), so
        # a receiver's replay window never refuses a late but genuine retry.
        request = urllib.request.Request(  # noqa: S310 - scheme checked in __init__
            self.prices.webhook_url, data=body, method="POST", headers={
                "Content-Type": "application/json",
                "User-Agent": f"mtp/{__version__}",
                IDEMPOTENCY_HEADER: msg_id,
                **signed_headers(self._secret, msg_id, int(time.time()), body),
            })
        error = ""
        try:
            with self._opener.open(request, timeout=self.policy.timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status, error = exc.code, f"HTTP {exc.code}"
            exc.close()
        except (urllib.error.URLError, OSError) as exc:
            status, error = 0, f"unreachable: {getattr(exc, 'reason', exc)}"
        except http.client.HTTPException as exc:
            # Not HTTP back (BadStatusLine, IncompleteRead...): retried with backoff like
            # any failure, instead of escaping the round and being retried every second.
            status, error = 0, f"bad answer: {type(exc).__name__}"
        state = depstate.dependency("billing_webhook", log)
        if 200 <= status < 300:
            state.ok()
            self._mark_sent(hour)
            return 1
        state.failed(error or f"HTTP {status}")  # one line per outage, not per attempt
        state.refused()  # for the webhook: a delivery put off
        self._schedule_retry(hour, error or f"HTTP {status}")
        return 0

    def _mark_sent(self, hour: int) -> None:
        with self.store.connect() as conn:
            conn.execute(
                "INSERT INTO webhook_exports (tenant, hour, state, attempts, sent_at)"
                " VALUES (?, ?, 'sent', 1, ?) ON CONFLICT (tenant, hour) DO UPDATE SET"
                " state = 'sent', attempts = attempts + 1, sent_at = excluded.sent_at,"
                " last_error = ''",
                (self.tenant, hour, self._clock()))

    def _schedule_retry(self, hour: int, error: str) -> None:
        with self.store.connect() as conn:
            row = conn.execute("SELECT attempts FROM webhook_exports WHERE tenant = ? AND hour = ?",
                               (self.tenant, hour)).fetchone()
            attempts = (row[0] if row else 0) + 1
            delay = backoff(attempts, self.policy.base_delay, self.policy.max_delay, self._rand)
            conn.execute(
                "INSERT INTO webhook_exports (tenant, hour, state, attempts, next_attempt,"
                " last_error) VALUES (?, ?, 'retry', ?, ?, ?) ON CONFLICT (tenant, hour)"
                " DO UPDATE SET attempts = excluded.attempts,"
                " next_attempt = excluded.next_attempt, last_error = excluded.last_error",
                (self.tenant, hour, attempts, self._clock() + delay, error))
        # Per attempt: debug only (the outage itself is one line, see deliver).
        log.debug("billing webhook: hour %s not delivered (%s), attempt %d, retry in %.1fs",
                  iso_hour(hour), error, attempts, delay)

    def status(self) -> list[dict[str, Any]]:
        """Export state per hour, newest first (for operators)."""
        with self.store.connect() as conn:
            rows = conn.execute(
                "SELECT hour, state, attempts, last_error FROM webhook_exports"
                " WHERE tenant = ? ORDER BY hour DESC", (self.tenant,)).fetchall()
        return [{"hour": iso_hour(h), "state": s, "attempts": a, "last_error": e}
                for h, s, a, e in rows]

    def _run(self) -> None:
        while not self._stop.wait(self.policy.interval):
            try:
                self.run_once()
            except Exception:
                log.exception("billing webhook round failed")

    def _after_fork(self) -> None:
        if self._thread is not None:
            self._thread = None
            self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
            self.start()


def start_exporter(store: UsageStore, tenant: str, prices: BillingSettings,
                   secret: str, policy: ExportPolicy | None = None,
                   cls: type[WebhookExporter] | None = None,
                   pricing: Callable[[], BillingSettings] | None = None
                   ) -> WebhookExporter | None:
    """The running exporter (``cls``, default :class:`WebhookExporter`), or None when
    no webhook is configured (or no secret). ``pricing``: see :class:`WebhookExporter`."""
    if not prices.webhook_url:
        return None
    if not secret:
        log.error("billing webhook disabled: %s is not set (refusing to send unsigned usage)",
                  prices.webhook_secret_env)
        return None
    try:
        key = signing_key(secret)
    except ValueError as exc:
        log.error("billing webhook disabled: %s: %s", prices.webhook_secret_env, exc)
        return None
    return (cls or WebhookExporter)(store, tenant, prices, key, policy,
                                    pricing=pricing).start()
