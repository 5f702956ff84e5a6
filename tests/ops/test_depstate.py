"""A dependency's state: one log line per transition, refusals counted, listeners told.

In-process checks of framework/depstate.py and of the JWKS and billing-webhook clients
against real local servers; tests/ops/test_dependency_outages.py runs the real processes
against slapd and redis-server."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from pathlib import Path

import pytest

from framework import depstate
from framework.depstate import Dependency
from framework.tenant_config import BillingSettings
from framework.usage import HOUR, UsageMeter, UsageStore, hour_of
from framework.webhook import ExportPolicy, WebhookExporter
from sidecar.jwks import JwksKeys, JwksUnavailable, UnknownKey
from tests.identity.jwks_server import JwksServer, SigningKey
from tests.ops.receiver import Receiver

NOW = 1_800_000_000.0
# key_for(kid) takes the token's algorithm too once JWKs without "alg" are accepted.
ALG = ("ES256",) if "algorithm" in inspect.signature(JwksKeys.key_for).parameters else ()


def lines(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "dependency", "") == name]


def test_transitions_are_logged_once_with_error_duration_and_refusals(caplog) -> None:
    now = [100.0]
    dep = Dependency("test_dep", clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="mtp"):
        dep.ok()  # up and staying up: silent
        for i in range(200):
            dep.failed(ConnectionRefusedError(f"refused #{i}"))
            dep.refused()
        assert not dep.up
        now[0] += 12.5
        for _ in range(5):
            dep.ok()
        dep.failed("plain text error", note="limits turn local")
        dep.ok()
    records = lines(caplog, "test_dep")
    assert [(r.levelname, r.state) for r in records] == [
        ("WARNING", "down"), ("WARNING", "up"), ("WARNING", "down"), ("WARNING", "up")]
    assert records[0].error == "ConnectionRefusedError: refused #0"  # the first error
    assert records[0].name == "mtp.dependency"  # no client logger given
    assert records[1].down_seconds == 12.5 and records[1].refused == 200
    assert records[2].error == "plain text error" and records[3].refused == 0
    assert records[2].getMessage() == (
        "dependency test_dep is down: limits turn local (plain text error)")
    assert dep.refusals == 200 and dep.up


def test_an_error_without_text_is_named_by_its_class(caplog) -> None:
    dep = Dependency("quiet_dep")
    with caplog.at_level(logging.WARNING, logger="mtp"):
        dep.failed(TimeoutError())
    assert lines(caplog, "quiet_dep")[0].error == "TimeoutError"


def test_concurrent_failures_log_one_line(caplog) -> None:
    dep = Dependency("racy_dep")
    start = threading.Barrier(8)

    def hammer() -> None:  # 8 threads at once: one line, no refusal lost
        start.wait()
        for _ in range(500):
            dep.failed(OSError("down"))
            dep.refused()

    with caplog.at_level(logging.WARNING, logger="mtp"):
        threads = [threading.Thread(target=hammer) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(lines(caplog, "racy_dep")) == 1 and dep.refusals == 4000


def test_one_state_per_name_and_listeners_hear_every_event() -> None:
    heard: list[tuple[str, str]] = []
    depstate.listen(lambda name, event: heard.append((name, event)) if name == "heard" else None)
    dep = depstate.dependency("heard")
    assert depstate.dependency("heard") is dep and dep in depstate.dependencies()
    dep.failed("x")
    dep.refused()
    dep.ok()
    assert heard == [("heard", "up"), ("heard", "down"), ("heard", "refused"), ("heard", "up")]
    dep.failed("y")
    again = depstate.dependency("heard", fresh=True)  # a new client: its own state, up
    assert again is not dep and again.up and not dep.up
    assert depstate.dependency("heard") is again and dep not in depstate.dependencies()
    assert heard[-1] == ("heard", "up")


def test_the_framework_exports_dependency_state_and_refusals() -> None:
    from framework import metrics

    dep = depstate.dependency("framework_dep")
    dep.failed("gone")
    dep.refused()
    dep.refused()
    text = metrics.exposition("acme", dict)[0].decode()
    assert 'mtp_dependency_up{dependency="framework_dep"} 0.0' in text
    assert 'mtp_dependency_refusals_total{dependency="framework_dep"} 2.0' in text
    dep.ok()
    text = metrics.exposition("acme", dict)[0].decode()
    assert 'mtp_dependency_up{dependency="framework_dep"} 1.0' in text


def test_jwks_outage_is_two_lines_however_many_requests(caplog) -> None:
    key = SigningKey.generate("k1", "ES256")
    server = JwksServer()
    server.publish(key)
    server.start()
    depstate.dependency("jwks").ok()  # whatever an earlier test left

    async def scenario() -> int:
        keys = JwksKeys(server.url, cache_ttl=300, refetch_interval=0)
        try:
            await keys.key_for("k1", *ALG)
            server.stop()
            refused = 0
            for i in range(30):  # each unknown kid asks the endpoint, which is away
                with pytest.raises(JwksUnavailable):
                    await keys.key_for(f"unknown-{i}", *ALG)
                refused += 1
            server.start()
            with pytest.raises(UnknownKey):  # the refetch works again: a plain 401 case
                await keys.key_for("unknown-after", *ALG)
            return refused
        finally:
            await keys.close()

    try:
        with caplog.at_level(logging.INFO, logger="mtp"):
            refused = asyncio.run(scenario())
    finally:
        server.stop()
    assert refused == 30
    records = lines(caplog, "jwks")
    assert [r.state for r in records] == ["down", "up"]
    assert records[1].refused == 30
    assert records[0].name == "mtp.sidecar.jwks"  # the client's logger
    assert not [r for r in caplog.records if r.name == "mtp.sidecar.jwks"
                and r.levelno >= logging.WARNING and r not in records]


@pytest.fixture
def store(tmp_path: Path) -> UsageStore:
    store = UsageStore(tmp_path / "usage.db")
    for k in (3, 2, 1):
        hour = hour_of(NOW) - k * HOUR
        meter = UsageMeter(store, "acme", clock=lambda h=hour: h + 5)
        meter.record("orders", "create", "alice", 200, 0.1, 0.25, 10, 20)
        meter.flush()
    return store


def test_webhook_outage_is_two_lines_however_many_deliveries(store, caplog) -> None:
    secret = b"billing-secret-for-tests"
    receiver = Receiver(secret, fail_first=12).start()  # answers 500 twelve times
    url = BillingSettings(currency="EUR", webhook_url=receiver.url)
    policy = ExportPolicy(grace=0.0, base_delay=0.0, max_delay=0.0, timeout=5)
    exporter = WebhookExporter(store, "acme", url, secret, policy, clock=lambda: NOW)
    depstate.dependency("billing_webhook").ok()
    try:
        with caplog.at_level(logging.INFO, logger="mtp"):
            for _ in range(4):  # 3 hours x 4 rounds undelivered
                assert exporter.run_once() == 0
            assert exporter.run_once() == 3
    finally:
        receiver.stop()
    records = lines(caplog, "billing_webhook")
    assert [r.state for r in records] == ["down", "up"]
    assert records[0].error == "HTTP 500" and records[1].refused == 12
    assert not [r for r in caplog.records if r.name == "mtp.webhook"
                and r.levelno >= logging.WARNING and r not in records]
