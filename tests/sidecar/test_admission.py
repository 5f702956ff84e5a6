"""In-process: a call past its deadline keeps its connection and slot; the catalog is trusted
only when the framework signed it; admission counts."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from framework.catalog import SIGNATURE, body_signature
from sidecar.admission import Admission, Saturated
from sidecar.catalog import Catalog, CatalogRefused, CatalogWatcher, parse
from sidecar.http1 import Overdue
from sidecar.proxy import DeadlinePassed, Upstream, UpstreamReply
from tests.sidecar.support import SIDECAR_SECRET
from tests.sidecar.test_inprocess import OK, pooled, run, settings_for

SECRET = SIDECAR_SECRET.encode()


def late_by(delays: list[float]):
    """An upstream answering its n-th request after delays[n] seconds."""
    pending = iter(delays)

    async def answer(_r, w) -> None:
        await asyncio.sleep(next(pending))
        w.write(OK)
        await w.drain()

    return answer


def test_an_overdue_call_keeps_its_connection_until_the_late_answer(tmp_path: Path) -> None:
    async def go():
        async with pooled(tmp_path, late_by([0.3, 0.0])) as pool:
            with pytest.raises(Overdue) as caught:
                await pool.request("GET", "/", [], None, deadline=0.05)
            conn = next(iter(pool._all))
            busy = (len(pool._idle), pool._slots._value)
            await asyncio.wait_for(caught.value.settled, 5)
            await asyncio.sleep(0)  # the settle callbacks run
            back = (len(pool._idle), pool._slots._value)
            again = await pool.request("GET", "/", [], None, deadline=5)
            return busy, back, again, conn in pool._idle, len(pool._all)

    busy, back, again, reused, connections = run(go())
    from sidecar.http1 import MAX_CONNECTIONS

    assert busy == (0, MAX_CONNECTIONS - 1)  # in use and counted while the answer is due
    assert back == (1, MAX_CONNECTIONS)  # the late answer gave both back
    assert again[2] == b"ok" and reused and connections == 1


def test_an_answer_that_never_comes_closes_the_connection_at_the_cap(tmp_path: Path) -> None:
    async def go():
        async with pooled(tmp_path, late_by([30]), read_timeout=0.3) as pool:
            with pytest.raises(Overdue) as caught:
                await pool.request("GET", "/", [], None, deadline=0.05)
            await asyncio.wait_for(caught.value.settled, 5)
            await asyncio.sleep(0)
            return len(pool._all), len(pool._idle)

    assert run(go()) == (0, 0)


def test_a_soft_deadline_earlier_than_the_connections_timer_rearms_it(tmp_path: Path) -> None:
    async def go():
        async with pooled(tmp_path, late_by([0.0, 0.5, 0.0])) as pool:
            await pool.request("GET", "/", [], None)  # arms a timer at the long read timeout
            with pytest.raises(Overdue) as caught:
                await asyncio.wait_for(pool.request("GET", "/", [], None, deadline=0.1), 3)
            await asyncio.wait_for(caught.value.settled, 5)
            return (await pool.request("GET", "/", [], None))[2]

    assert run(go()) == b"ok"


def test_upstream_call_admits_and_gives_the_slot_back_only_when_answered(
        tmp_path: Path) -> None:
    async def go():
        admission = Admission(1, wait=0)
        async with pooled(tmp_path, late_by([0.4, 0.0, 0.0])) as pool:
            upstream = Upstream(settings_for(tmp_path / "u.sock"))
            upstream.pool = pool
            with pytest.raises(DeadlinePassed) as late:
                await upstream.call("GET", "/", [], None, admission, "svc", 0.05, 0.0)
            assert late.value.status == 504 and "'svc'" in late.value.detail
            with pytest.raises(Saturated) as full:
                await upstream.call("GET", "/", [], None, admission, "svc", 5, 0.0)
            assert full.value.headers["Retry-After"] == "1"
            while admission.busy:  # the late answer frees the slot
                await asyncio.sleep(0.02)
            reply = await upstream.call("GET", "/", [], None, admission, "svc", 5, 0.0)
            return reply.status, admission.busy

    assert run(go()) == (200, 0)


def test_admission_counts_to_its_limit_and_hands_slots_to_waiters_in_order() -> None:
    async def go():
        admission = Admission(2, wait=5, queue=2)
        assert admission.enter() and admission.enter() and not admission.enter()
        first = asyncio.ensure_future(admission.admit())
        second = asyncio.ensure_future(admission.admit())
        await asyncio.sleep(0)
        assert admission.waiting == 2 and not await admission.admit()  # queue full: at once
        admission.leave()
        assert await first and not second.done() and admission.busy == 2
        second.cancel()
        await asyncio.sleep(0)
        admission.leave()  # the cancelled waiter is skipped: the slot is free again
        assert admission.busy == 1 and admission.enter() and admission.busy == 2

    run(go())


def test_a_waiter_gets_no_slot_when_none_frees_in_time() -> None:
    async def go():
        admission = Admission(1, wait=0.05)
        assert admission.enter()
        refused = await admission.admit()
        admission.leave()  # the expired ticket is passed over
        return refused, admission.busy, admission.enter()

    assert run(go()) == (False, 0, True)


def test_a_slot_handed_to_a_caller_that_went_away_is_passed_on() -> None:
    async def go():
        admission = Admission(1, wait=5)
        assert admission.enter()
        waiter = asyncio.ensure_future(admission.admit())
        await asyncio.sleep(0)
        admission.leave()  # handed to the waiter...
        waiter.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return admission.busy

    assert run(go()) == 0


def signed(doc: object, status: int = 200, secret: bytes = SECRET) -> UpstreamReply:
    body = json.dumps(doc).encode()
    return UpstreamReply(status, [(SIGNATURE, body_signature(secret, body))], body)


def test_the_catalog_is_parsed_only_when_signed_and_well_formed() -> None:
    doc = {"version": "v1", "default": 30, "services": {"a": 1.5}}
    catalog = parse(SECRET, signed(doc))
    assert catalog == Catalog(30.0, {"a": 1.5}, "v1")
    assert catalog.timeout("a") == 1.5 and catalog.timeout("other") == 30.0
    with pytest.raises(CatalogRefused, match="unsigned"):
        parse(SECRET, signed(doc, secret=b"another-secret-0123456789"))
    with pytest.raises(CatalogRefused, match="unsigned"):
        parse(SECRET, signed(doc, status=401))
    for bad in ({"version": "v", "default": 0, "services": {}},
                {"version": "v", "default": 1, "services": {"a": True}},
                {"version": "v", "default": float("inf"), "services": {}},
                {"version": "v", "default": 1, "services": []},
                {"version": "v"}, [1]):
        with pytest.raises(CatalogRefused, match="malformed"):
            parse(SECRET, signed(bad))


class FakeUpstream:
    """Answers /readyz and the catalog from a dict; counts the requests."""

    def __init__(self, answers: dict[str, UpstreamReply]) -> None:
        self.answers, self.asked = answers, []

    async def send(self, method, path, headers, body, *, timeout=None, deadline=None):
        self.asked.append(path)
        return self.answers[path]


def test_the_watcher_fetches_the_catalog_only_when_its_version_changes() -> None:
    held = {"catalog": Catalog()}
    ready = UpstreamReply(200, [], b'{"status": "ready", "catalog": "v2"}')
    catalog = signed({"version": "v2", "default": 30, "services": {"a": 2}})
    upstream = FakeUpstream({"/readyz": ready, "/internal/catalog": catalog})
    watcher = CatalogWatcher(upstream, SECRET, lambda path: [],  # type: ignore[arg-type]
                             lambda c: held.update(catalog=c), lambda: held["catalog"])

    async def go():
        first = await watcher.check()
        second = await watcher.check()
        upstream.answers["/readyz"] = UpstreamReply(503, [], b"{}")
        third = await watcher.check()
        return first, second, third

    assert run(go()) == (True, False, False)
    assert held["catalog"].timeout("a") == 2.0
    assert upstream.asked == ["/readyz", "/internal/catalog", "/readyz", "/readyz"]


def test_the_watcher_loop_survives_a_framework_that_is_away(caplog) -> None:
    upstream = FakeUpstream({"/readyz": UpstreamReply(200, [], b"not json")})
    watcher = CatalogWatcher(upstream, SECRET, lambda path: [],  # type: ignore[arg-type]
                             lambda c: None, Catalog, poll=0.01, first_poll=0.01)

    async def go():
        watcher.start()
        while len(upstream.asked) < 3:
            await asyncio.sleep(0.01)
        await watcher.close()

    with caplog.at_level("WARNING", logger="mtp.sidecar"):
        run(go())
    assert len([r for r in caplog.records if "catalog not loaded" in r.getMessage()]) == 1
