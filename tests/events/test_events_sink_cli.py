"""Sink routes into a second running mtp, `mtp events` through the sidecar, `mtp check`."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest

from tests.events.stack import lines, structured, wait_lines, write_events_tenant
from tests.events.test_events_run import ADMIN, jwt, start, wait_for
from tests.helpers import base_env, free_port, stop
from tests.sidecar.run_stack import run_env, start_run
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, token

pytestmark = pytest.mark.slow


def test_a_sink_route_posts_the_event_to_another_mtp(tmp_path) -> None:
    receiver = start(tmp_path / "b")
    sender = None
    try:
        route = (f'\n[[events.routes]]\ntypes = ["order.shipped"]\n'
                 f'sink = "http://127.0.0.1:{receiver.port}/events"\n'
                 'sink_token_env = "SINK_TOKEN"\n')
        root = tmp_path / "a"
        tdir = write_events_tenant(root, route)
        env = run_env(root, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                      MTP_JWT_SECRET=JWT_SECRET, SINK_TOKEN=token(sub="relay"))
        sender = start_run(root, tdir, env)
        eid = uuid.uuid4().hex
        parent = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
        answer = structured(sender, jwt("alice"), {"id": eid, "source": "/shop",
                                                   "type": "order.shipped", "subject": "p/1",
                                                   "data": {"parcel": 9}},
                            {"traceparent": parent})
        assert answer.status == 202, answer.body
        got = wait_for(lambda: next((r for r in lines(tmp_path / "b" / "record.jsonl")
                                     if r["event"]["id"] == eid), None))
        # The receiving tenant's own sidecar authenticated the sink's token.
        assert got["user"] == "relay"
        assert got["event"]["source"] == "/shop"
        assert got["event"]["subject"] == "p/1"
        assert got["payload"] == {"parcel": 9}
        # The publish's trace context went along (CloudEvents distributed tracing).
        import sqlite3

        with sqlite3.connect(tmp_path / "b" / "data" / "events.sqlite3") as db:
            extra = db.execute("SELECT extra FROM events WHERE id = ?", (eid,)).fetchone()[0]
        assert json.loads(extra)["traceparent"] == parent
        wait_for(lambda: any(a.get("event_id") == eid and a["outcome"] == "delivered"
                             and a["service"].endswith("/events")
                             for a in lines(root / "audit.log")))
        # The tenant code of the sender never sees the sink token in its environment.
        environs = framework_environ(sender.proc.pid)
        assert "MTP_TENANT_DIR" in environs or "MTP_DATA_DIR" in environs  # found them
        assert "SINK_TOKEN" not in environs
    finally:
        if sender is not None:
            stop(sender.proc)
        stop(receiver.proc)


def framework_environ(run_pid: int) -> str:
    """The environments of the descendants of `mtp run` (not of itself)."""
    from pathlib import Path

    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    family, seen = {run_pid}, ""
    for _ in range(4):
        family |= {pid for pid, parent in parents.items() if parent in family}
    for pid in family - {run_pid}:
        try:
            seen += Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
    return seen


def mtp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "framework", *args], capture_output=True,
                          text=True, env=env or base_env(), timeout=60)


def test_mtp_events_publish_dead_and_replay_through_the_sidecar(tmp_path) -> None:
    run = start(tmp_path)
    try:
        url = f"http://127.0.0.1:{run.port}"
        user = token(sub="frank")
        done = mtp("events", "publish", "order.cli", "--data", '{"q": 2}', "--subject", "c/1",
                   "--url", url, "--token", user)
        assert done.returncode == 0, done.stderr
        eid = done.stdout.strip()
        record = next(r for r in wait_lines(tmp_path / "record.jsonl", 1)
                      if r["event"]["id"] == eid)
        assert record["payload"] == {"q": 2} and record["user"] == "frank"
        refused = mtp("events", "publish", "payroll.run", "--url", url, "--token", user)
        assert refused.returncode == 1 and "403" in refused.stderr
        bad = mtp("events", "publish", "order.cli", "--data", "{nope", "--url", url)
        assert bad.returncode != 0
        # A dead letter, listed and replayed by an admin.
        (tmp_path / "failing").write_text("1")
        failing = mtp("events", "publish", "flaky.cli", "--url", url, "--token", user)
        admin = ADMIN["Authorization"].removeprefix("Bearer ")
        letters = wait_for(lambda: [d for d in json.loads(
            mtp("events", "dead", "--url", url, "--token", admin).stdout)["dead"]
            if d["event"]["id"] == failing.stdout.strip()])
        assert mtp("events", "dead", "--url", url, "--token", user).returncode == 1
        (tmp_path / "failing").unlink()
        replayed = mtp("events", "dead", "--replay", letters[0]["id"], "--url", url,
                       "--token", admin)
        assert replayed.returncode == 0, replayed.stderr
        wait_for(lambda: lines(tmp_path / "flaky.jsonl"))
    finally:
        stop(run.proc)


def test_mtp_check_refuses_a_route_to_a_service_the_tenant_does_not_have(tmp_path) -> None:
    tdir = write_events_tenant(tmp_path, '\n[[events.routes]]\ntypes = ["x"]\n'
                                         'service = "nosuch"\n')
    checked = mtp("check", "--tenant-dir", str(tdir))
    assert checked.returncode == 1
    assert "events.routes.4.service: no service 'nosuch'" in checked.stderr
    (tdir / "services" / "nosuch.py").write_text('"""x"""\n\ndef handle(context):\n    return 1\n')
    assert mtp("check", "--tenant-dir", str(tdir)).returncode == 0
