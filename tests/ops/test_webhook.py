"""Billing webhook: signed, idempotent, retried with backoff, resumed after restart."""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from framework.tenant_config import BillingSettings
from framework.usage import HOUR, UsageMeter, UsageStore, hour_of, iso_hour
from framework.webhook import (
    ExportPolicy,
    WebhookExporter,
    backoff,
    idempotency_key,
    signed_headers,
    signing_key,
    start_exporter,
)
from tests.helpers import free_port
from tests.ops.receiver import Receiver

SECRET = b"billing-secret-for-tests"
FAST = ExportPolicy(grace=0.0, interval=0.02, base_delay=0.01, max_delay=0.05, timeout=5)
NOW = time.time()
HOURS = [hour_of(NOW) - k * HOUR for k in (3, 2, 1)]  # finished hours


def prices(url: str) -> BillingSettings:
    return BillingSettings(currency="EUR", per_call=0.5, per_cpu_second=2.0, per_gb=1.0,
                           webhook_url=url)


@pytest.fixture
def store(tmp_path: Path) -> UsageStore:
    """Usage in three finished hours and in one not finished yet."""
    store = UsageStore(tmp_path / "usage.db")
    # The unfinished hour is the next one, not the current: a long suite may cross the
    # hour between collection (NOW) and this test.
    for i, hour in enumerate([*HOURS, hour_of(NOW) + HOUR]):
        meter = UsageMeter(store, "acme", clock=lambda h=hour: h + 5)
        for _ in range(i + 1):
            meter.record("orders", "create", "alice", 200, 0.1, 0.25, 10, 20)
        meter.record("hello", None, "bob", 500, 0.1, 0.0, 0, 0)
        meter.flush()
    return store


@pytest.fixture
def receiver():
    r = Receiver(SECRET).start()
    yield r
    r.stop()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_every_finished_hour_arrives_exactly_once_after_failures(store, receiver) -> None:
    receiver.fail_first = 5
    exporter = WebhookExporter(store, "acme", prices(receiver.url), SECRET, FAST).start()
    try:
        wait_for(lambda: len(receiver.accepted) == 3)
        time.sleep(0.2)  # a few more rounds: nothing is sent again
    finally:
        exporter.stop()
    keys = [idempotency_key("acme", h, store.store_id[:12]) for h in HOURS]
    assert sorted(receiver.accepted) == sorted(keys)
    assert all(receiver.deliveries[k] == 1 for k in keys)
    assert receiver.bad_signatures == 0 and receiver.requests == 5 + 3
    first = receiver.accepted[keys[0]]
    assert first["hour"] == iso_hour(HOURS[0]) and first["tenant"] == "acme"
    assert first["currency"] == "EUR" and first["idempotency_key"] == keys[0]
    assert first["source"] == store.store_id[:12] == exporter.source
    assert first["totals"]["calls"] == 2 and first["totals"]["errors"] == 1
    # 2 calls * 0.5 + 0.25 CPU-s * 2.0 + 30 bytes / 1e9 * 1.0
    orders = next(r for r in first["rows"] if r["service"] == "orders")
    assert orders["cost"] == pytest.approx(0.5 + 0.5 + 30e-9)
    assert first["totals"]["cost"] == pytest.approx(2 * 0.5 + 0.5 + 30e-9)
    assert next(r for r in first["rows"] if r["service"] == "hello")["operation"] is None
    assert [s["state"] for s in exporter.status()] == ["sent"] * 3


def test_restart_resumes_without_resending(store, receiver, tmp_path: Path) -> None:
    url = prices(receiver.url)
    first = WebhookExporter(store, "acme", url, SECRET, FAST)
    assert first.acquire_lease()
    assert first.deliver(HOURS[0]) == 1
    receiver.fail_first = receiver.requests + 1  # the next request fails
    assert first.deliver(HOURS[1]) == 0
    first.stop()  # "crash" after one hour sent and one failed
    again = WebhookExporter(UsageStore(tmp_path / "usage.db"), "acme", url, SECRET, FAST)
    wait_for(lambda: again.run_once() == 0 and len(again.due_hours()) == 0)
    assert sorted(receiver.deliveries.values()) == [1, 1, 1]
    failed = {s["hour"]: s for s in again.status()}[iso_hour(HOURS[1])]
    assert failed["state"] == "sent" and failed["attempts"] == 2


def test_only_the_lease_holder_exports(store, receiver) -> None:
    url = prices(receiver.url)
    a = WebhookExporter(store, "acme", url, SECRET, FAST)
    b = WebhookExporter(store, "acme", url, SECRET, FAST)
    assert a.acquire_lease() and not b.acquire_lease()
    assert b.run_once() == 0 and receiver.requests == 0
    a.stop()  # hands over at once
    assert b.acquire_lease()
    assert b.run_once() == 3


def test_an_expired_lease_is_taken_over(store, receiver) -> None:
    now = [time.time()]
    a = WebhookExporter(store, "acme", prices(receiver.url), SECRET, FAST, clock=lambda: now[0])
    b = WebhookExporter(store, "acme", prices(receiver.url), SECRET, FAST, clock=lambda: now[0])
    assert a.acquire_lease()
    now[0] += FAST.lease_ttl + 1  # a died without handing over
    assert b.acquire_lease() and not a.acquire_lease()


def test_unreachable_receiver_backs_off(store, caplog) -> None:
    url = prices(f"http://127.0.0.1:{free_port()}/billing")
    slow = ExportPolicy(grace=0.0, base_delay=60, max_delay=600)
    exporter = WebhookExporter(store, "acme", url, SECRET, slow)
    with caplog.at_level(logging.DEBUG, logger="mtp.webhook"):  # per attempt: debug only
        assert exporter.run_once() == 0
    assert "unreachable" in caplog.text and "retry in" in caplog.text
    assert exporter.due_hours() == []  # every hour waits for its backoff
    assert {s["state"] for s in exporter.status()} == {"retry"}
    assert all(s["last_error"].startswith("unreachable") for s in exporter.status())


def test_a_receiver_that_does_not_speak_http_backs_off(store) -> None:
    server = socket.create_server(("127.0.0.1", 0))

    def answer_garbage() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"SSH-2.0-OpenSSH\r\n")

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    slow = ExportPolicy(grace=0.0, base_delay=60, max_delay=600)
    url = prices(f"http://127.0.0.1:{server.getsockname()[1]}/billing")
    exporter = WebhookExporter(store, "acme", url, SECRET, slow)
    try:
        assert exporter.deliver(HOURS[0]) == 0
    finally:
        thread.join(timeout=5)
        server.close()
    state = exporter.status()[0]
    assert state["state"] == "retry" and state["last_error"].startswith("bad answer")
    assert HOURS[0] not in exporter.due_hours()  # waits for its backoff


def test_redirects_and_errors_are_not_success(store, receiver) -> None:
    receiver.fail_first, receiver.fail_status = 1, 302
    exporter = WebhookExporter(store, "acme", prices(receiver.url), SECRET, FAST)
    assert exporter.deliver(HOURS[0]) == 0
    assert exporter.status()[0]["last_error"] == "HTTP 302"
    receiver.fail_first, receiver.fail_status = 2, 503
    assert exporter.deliver(HOURS[0]) == 0
    assert exporter.status()[0]["attempts"] == 2
    assert receiver.accepted == {}


def test_wrong_secret_is_refused_by_the_receiver(store, receiver) -> None:
    exporter = WebhookExporter(store, "acme", prices(receiver.url), b"another-secret", FAST)
    assert exporter.deliver(HOURS[0]) == 0
    assert receiver.bad_signatures == 1 and exporter.status()[0]["last_error"] == "HTTP 401"


def test_start_exporter_needs_url_and_secret(store, caplog) -> None:
    assert start_exporter(store, "acme", BillingSettings(), "s") is None
    with caplog.at_level(logging.ERROR, logger="mtp.webhook"):
        assert start_exporter(store, "acme", prices("http://127.0.0.1:1/x"), "") is None
    assert "MTP_BILLING_SECRET is not set" in caplog.text
    with pytest.raises(ValueError, match="http"):
        WebhookExporter(store, "acme", prices("file:///etc/passwd"), SECRET)
    running = start_exporter(store, "acme", prices("http://127.0.0.1:1/x"), "s", FAST)
    assert running is not None
    running._after_fork()  # a forked child gets its own thread and lease identity
    running.stop()


def test_a_failing_round_does_not_stop_the_exporter(store, monkeypatch, caplog) -> None:
    exporter = WebhookExporter(store, "acme", prices("http://127.0.0.1:1/x"), SECRET, FAST)
    rounds = []

    def broken() -> int:
        rounds.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(exporter, "run_once", broken)
    with caplog.at_level(logging.ERROR, logger="mtp.webhook"):
        exporter.start()
        wait_for(lambda: len(rounds) >= 2)
        exporter.stop()
    assert "round failed" in caplog.text


def test_replicas_with_their_own_database_export_under_their_own_keys(
        store, receiver, tmp_path: Path) -> None:
    other = UsageStore(tmp_path / "replica-2" / "usage.db")
    meter = UsageMeter(other, "acme", clock=lambda: HOURS[0] + 5)
    meter.record("hello", None, "bob", 200, 0.1, 0.0, 0, 0)
    meter.flush()
    mine = WebhookExporter(store, "acme", prices(receiver.url), SECRET, FAST)
    theirs = WebhookExporter(other, "acme", prices(receiver.url), SECRET, FAST)
    assert mine.source != theirs.source and store.store_id == store.store_id
    assert theirs.acquire_lease() and mine.acquire_lease()  # one lease per database
    assert mine.deliver(HOURS[0]) + theirs.deliver(HOURS[0]) == 2
    assert len(receiver.accepted) == 2  # both shares of the hour arrive


def test_backoff_helper() -> None:
    assert backoff(1, 1.0, 300, lambda: 0.0) == 0.5
    assert backoff(4, 1.0, 300, lambda: 1.0) == 8.0
    assert backoff(30, 1.0, 300, lambda: 1.0) == 300


def test_a_delivered_webhook_verifies_with_the_standard_library_and_a_replay_does_not(
        store, receiver) -> None:
    exporter = WebhookExporter(store, "acme", prices(receiver.url), SECRET, FAST)
    assert exporter.run_once() == 3
    assert receiver.bad_signatures == 0 and len(receiver.accepted) == 3
    body, headers = receiver.received[0]
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["webhook-id"] == lower["idempotency-key"] == idempotency_key(
        "acme", HOURS[0], exporter.source)
    assert lower["webhook-signature"].startswith("v1,")
    # What a receiver outside the project runs: the library, not our code.
    assert Webhook(SECRET).verify(body, headers)["hour"] == iso_hour(HOURS[0])
    assert Webhook("whsec_" + base64.b64encode(SECRET).decode()).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(body + b" ", headers)  # another body
    with pytest.raises(WebhookVerificationError):
        Webhook(b"another-key").verify(body, headers)
    # A captured delivery replayed later: the library refuses its old timestamp, and
    # re-stamping it breaks the signature.
    old = int(time.time()) - 600
    replayed = {**headers, **signed_headers(SECRET, lower["webhook-id"], old, body)}
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(SECRET).verify(body, replayed)
    moved = {**headers, "webhook-timestamp": str(int(lower["webhook-timestamp"]) - 1)}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(SECRET).verify(body, moved)


def test_a_replayed_delivery_is_refused_by_the_receiver(store, receiver) -> None:
    import urllib.request

    exporter = WebhookExporter(store, "acme", prices(receiver.url), SECRET, FAST)
    assert exporter.deliver(HOURS[0]) == 1
    body, headers = receiver.received[0]
    lower = {k.lower(): v for k, v in headers.items()}
    # The attacker resends the captured request with an old (signed) timestamp.
    stale = signed_headers(SECRET, lower["webhook-id"], int(time.time()) - 3600, body)
    request = urllib.request.Request(receiver.url, data=body, method="POST", headers={
        "Content-Type": "application/json", **stale})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401 and receiver.bad_signatures == 1


@pytest.mark.parametrize("secret, key", [
    ("plain-secret", b"plain-secret"),
    ("whsec_" + base64.b64encode(b"\x00random key bytes").decode(), b"\x00random key bytes"),
])
def test_secret_mapping(secret: str, key: bytes) -> None:
    assert signing_key(secret) == key
    headers = signed_headers(signing_key(secret), "msg_1", int(time.time()), b'{"a":1}')
    # A receiver configured with the whsec_ form of the same key verifies it.
    standard = secret if secret.startswith("whsec_") else (
        "whsec_" + base64.b64encode(secret.encode()).decode())
    assert Webhook(standard).verify(b'{"a":1}', headers) == {"a": 1}


@pytest.mark.parametrize("secret", ["whsec_not base64!", "whsec_"])
def test_a_malformed_standard_secret_disables_the_export(store, caplog, secret: str) -> None:
    with caplog.at_level(logging.ERROR, "mtp.webhook"):
        assert start_exporter(store, "acme", prices("http://127.0.0.1:9/x"), secret,
                              FAST) is None
    assert "MTP_BILLING_SECRET" in caplog.text and "not base64!" not in caplog.text
