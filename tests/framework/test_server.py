"""End to end against `mtp framework`: real gunicorn, 2 gthread workers, on loopback."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

from tests.framework.client import Answer, signed_headers
from tests.framework.conftest import Server
from tests.framework.tenant import markers

PROBLEM = "application/problem+json"


def assert_problem(answer, status: int) -> dict:
    assert answer.status == status, answer.body
    assert answer.header("Content-Type") == PROBLEM
    doc = answer.json()
    assert doc["status"] == status and doc["request_id"] and doc["type"] and doc["title"]
    assert b"Traceback" not in answer.body
    return doc


def wait_job(server: Server, location: str, user: str = "alice", until=("succeeded", "failed",
             "cancelled"), timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = server.client.get(location, user=user)
        assert answer.status == 200, answer.body
        job = answer.json()
        if job["status"] in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {location} still {job['status']}")


def submit(server: Server, path: str, body: dict, **kw):
    """Start a job (202); the small test queues may be full for a moment."""
    deadline = time.monotonic() + 15
    while (answer := server.client.post(path, body, **kw)).status == 503:
        assert time.monotonic() < deadline, "the job queue never had room"
        time.sleep(0.1)
    assert answer.status == 202, answer.body
    return answer


def job_runner_pid(server: Server, job_id: str) -> int:
    with sqlite3.connect(server.data / "jobs.sqlite3") as db:
        (runner,) = db.execute("SELECT runner FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return int(runner.rsplit(":", 2)[1])


def test_sync_call_carries_the_signed_identity(server: Server):
    answer = server.client.post("/services/echo?x=1&y=two", {"a": 1}, groups="g1,g2, g3",
                                roles="r1", auth="api_key", request_id="abc.123")
    assert answer.status == 200, answer.body
    assert answer.header("Content-Type") == "application/json"
    assert answer.header("X-Request-ID") == "abc.123"
    body = answer.json()
    assert body["tenant_id"] == "acme" and body["service"] == "echo"
    assert body["operation"] is None and body["user"] == "alice"
    # Exact members, as the sidecar reads them: " g3" is not g3 and grants nothing.
    assert body["groups"] == ["g1", "g2"] and body["roles"] == ["r1"]
    assert body["auth_method"] == "api_key" and body["payload"] == {"a": 1}
    assert body["params"] == {"x": "1", "y": "two"} and body["request_id"] == "abc.123"
    assert body["config"] == {"currency": "EUR"} and body["beta"] is True
    assert body["time_left"] is True


def test_get_without_body_has_an_empty_payload_and_flags_follow_the_user(server: Server):
    body = server.client.get("/services/echo", user="bob").json()
    assert body["payload"] == {} and body["beta"] is False


def test_operations_schema_and_bad_json(server: Server):
    c = server.client
    assert c.post("/services/ops/create", {"qty": 2}).json() == {
        "op": "create", "payload": {"qty": 2}}
    assert_problem(c.post("/services/ops", {}), 404)
    assert_problem(c.post("/services/ops/delete", {}), 404)
    assert_problem(c.post("/services/echo/extra", {}), 404)
    doc = assert_problem(c.post("/services/ops/create", {"qty": 0}), 400)
    assert doc["path"] == "$.qty" and "minimum" in doc["detail"]
    assert_problem(c.post("/services/ops/create", {"other": 1}), 400)
    assert_problem(c.post("/services/echo", raw=b"{not json"), 400)
    # Python's json reads these; JSON cannot carry them (and no result could echo them).
    for odd in (b'{"a": NaN}', b'{"a": -Infinity}', b'{"a": 1e999}'):
        assert "not valid JSON" in assert_problem(c.post("/services/echo", raw=odd),
                                                  400)["detail"]


def test_a_malformed_chunked_body_is_400(server: Server):
    headers = signed_headers("POST", "/services/echo")
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", server.client.port), timeout=10) as sock:
        sock.sendall(f"POST /services/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     f"Transfer-Encoding: chunked\r\n{head}\r\nzz\r\n{{}}\r\n0\r\n\r\n"
                     .encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"application/problem+json" in answer and b"could not be read" in answer


def test_mode_rules(server: Server):
    c = server.client
    sync_only = c.post("/services/ops/get", {}, headers={"Prefer": "respond-async"})
    assert sync_only.status == 200 and sync_only.header("Preference-Applied") is None
    assert_problem(c.post("/services/ops/get?mode=async", {}), 400)
    assert_problem(c.post("/services/forced?mode=async", {}), 400)  # tenant.toml says sync
    assert_problem(c.post("/services/echo?mode=later", {}), 400)
    async_only = submit(server, "/services/slow", {})  # MODE = "async": a job without asking
    assert async_only.header("Preference-Applied") is None
    assert async_only.header("Location") == f"/jobs/{async_only.json()['job_id']}"
    forced_sync = c.post("/services/echo?mode=sync", {}, headers={"Prefer": "respond-async"})
    assert forced_sync.status == 200


def test_async_round_trip_and_the_job_is_found_by_the_other_worker(server: Server):
    c = server.client
    answer = c.post("/services/echo?mode=async", {"n": 7}, headers={"Prefer": "respond-async"})
    assert answer.status == 202, answer.body
    assert answer.header("Preference-Applied") == "respond-async"
    body = answer.json()
    assert body["status"] == "queued" and answer.header("Location") == f"/jobs/{body['job_id']}"
    job = wait_job(server, answer.header("Location"))
    assert job["status"] == "succeeded" and job["result"]["payload"] == {"n": 7}
    assert job["service"] == "echo" and job["operation"] is None
    assert job["created_at"] and job["started_at"] and job["finished_at"]
    # Freeze the worker that ran it: only the other worker can answer now.
    pid = job_runner_pid(server, body["job_id"])
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(6):
            again = c.get(answer.header("Location"), timeout=5)
            assert again.status == 200 and again.json()["result"]["payload"] == {"n": 7}
    finally:
        os.kill(pid, signal.SIGCONT)


def test_prefer_wait_answers_with_the_sync_body_when_done_in_time(server: Server):
    answer = server.client.post("/services/echo", {"w": 1},
                                headers={"Prefer": "respond-async, wait=10"})
    assert answer.status == 200, answer.body
    assert answer.header("Preference-Applied") == "wait=10"
    assert answer.json()["payload"] == {"w": 1}
    slow = submit(server, "/services/slow", {"seconds": 1},
                  headers={"Prefer": "respond-async; foo=bar, wait=0"})
    assert slow.status == 202 and slow.header("Preference-Applied") == "respond-async, wait=0"
    late = submit(server, "/services/slow", {"seconds": 2},
                  headers={"Prefer": "respond-async, wait=1"})
    assert late.status == 202 and late.header("Preference-Applied") == "respond-async, wait=1"


def test_failed_job_keeps_an_error_without_traceback(server: Server):
    job = wait_job(server, submit(server, "/services/slow", {"fail": True}).header("Location"))
    assert job["status"] == "failed" and "result" not in job
    assert job["error"]["status"] == 500 and job["error"]["error_id"]
    assert "job failed" not in json.dumps(job)
    assert job["error"]["error_id"] in server.log_text()


def test_jobs_are_visible_to_their_creator_and_admins_only(server: Server):
    c = server.client
    location = submit(server, "/services/slow", {}, user="carol").header("Location")
    wait_job(server, location, user="carol")
    assert_problem(c.get(location, user="mallory"), 404)
    assert_problem(c.delete(location, user="mallory"), 404)
    assert c.get(location, user="root", roles="admin").status == 200
    assert_problem(c.get("/jobs/" + "0" * 32), 404)
    assert_problem(c.get("/jobs/not-a-job"), 404)
    doc = assert_problem(c.delete(location, user="carol"), 409)
    assert doc["job_status"] == "succeeded"


def test_service_errors_are_500_with_an_error_id_in_the_log(server: Server):
    c = server.client
    doc = assert_problem(c.post("/services/boom", {}), 500)
    assert "secret internal detail" not in json.dumps(doc)
    log = server.log_text()
    line = next(json.loads(x) for x in log.splitlines() if doc["error_id"] in x)
    assert "secret internal detail" in line["traceback"] and line["tenant"] == "acme"
    assert "limit" in assert_problem(c.post("/services/huge", {}), 500)["detail"]
    assert "not JSON" in assert_problem(c.post("/services/nonjson", {}), 500)["detail"]
    broken = assert_problem(c.post("/services/broken", {}), 500)
    assert "services/broken.py, line 3" in broken["detail"] and broken["error_id"]
    assert "handle" in assert_problem(c.post("/services/nohandle", {}), 500)["detail"]
    assert c.post("/services/echo", {}).status == 200  # the runtime is still fine


def test_hostile_names_never_import_anything(server: Server):
    c = server.client
    for path in ("/services/..", "/services/..%2Fecho", "/services/%2E%2E", "/services/os.py",
                 "/services/os%2Epy", "/services/..%2Fos",
                 "/services/__init__", "/services/Hello", "/services/a/../b",
                 "/services/" + "a" * 65, "/services/echo%0A", "/services/ech%00o"):
        answer = c.get(path)
        assert answer.status in (400, 404), (path, answer.status)
        assert answer.header("Content-Type") == PROBLEM
    assert markers(server.root) == []
    # Services doing `import os` get the stdlib, not the tenant's os.py.
    assert isinstance(c.get("/services/echo").json()["pid"], int)
    assert markers(server.root) == []
    # The tenant's own `os` service is a service like any other, loaded privately.
    assert c.get("/services/os").json() == {"tenant_os": True}
    assert markers(server.root) == ["os_imported.marker"]


def test_signatures_unsigned_forged_stale_tampered_or_foreign_are_refused(server: Server):
    c = server.client
    unsigned = assert_problem(c.get("/services/echo", sign=False, headers={
        "X-Tenant-ID": "acme", "X-User-ID": "alice", "X-Auth-Method": "jwt"}), 401)
    assert unsigned["type"].endswith("unauthenticated")
    assert c.get("/services/echo", sign=False).header("WWW-Authenticate")
    forged = signed_headers("GET", "/services/echo", secret="another-secret-0123456789")
    assert_problem(c.get("/services/echo", sign=False, headers=forged), 401)
    # Made with the secret, only too old: held on its way, not the client's fault.
    stale = signed_headers("GET", "/services/echo", now=time.time() - 120)
    held = c.get("/services/echo", sign=False, headers=stale)
    assert_problem(held, 503)
    assert held.header("Retry-After") == "1"
    tampered = signed_headers("GET", "/services/echo")
    tampered["X-User-Roles"] = "admin"
    assert_problem(c.get("/services/echo", sign=False, headers=tampered), 401)
    other_path = signed_headers("GET", "/services/echo")
    assert_problem(c.get("/services/boom", sign=False, headers=other_path), 401)
    assert_problem(c.get("/services/echo", tenant="globex"), 403)
    assert_problem(c.get("/services/echo", auth="magic"), 401)
    assert_problem(c.get("/nowhere", sign=False), 401)  # routes are not revealed unsigned
    for odd in ("\u00b2", "9" * 5000):  # isdigit() yet not int()-able: still 401, not 500
        bad_ts = signed_headers("GET", "/services/echo")
        bad_ts["X-Sidecar-Timestamp"] = odd
        assert_problem(c.get("/services/echo", sign=False, headers=bad_ts), 401)


def test_only_health_needs_no_signature(server: Server):
    c = server.client
    assert c.get("/healthz", sign=False).json() == {"status": "ok"}
    for path in ("/readyz", "/metrics"):
        assert_problem(c.get(path, sign=False), 401)
    assert c.get("/readyz").json()["status"] == "ready"
    c.get("/services/echo")
    text = c.get("/metrics").body.decode()
    assert 'mtp_framework_requests_total{operation="",service="echo",status="200",' \
           'tenant="acme"}' in text
    assert "mtp_framework_request_duration_seconds_bucket" in text
    assert 'mtp_framework_jobs{status="succeeded",tenant="acme"}' in text


def test_log_lines_are_json_with_tenant_and_request_id(server: Server):
    server.client.get("/services/echo", request_id="log-check-1")
    time.sleep(0.1)
    lines = [json.loads(x) for x in server.log_text().splitlines() if x.startswith("{")]
    mine = [x for x in lines if x.get("request_id") == "log-check-1"]
    assert mine and all(x["tenant"] == "acme" for x in mine)
    assert mine[-1]["msg"] == "request" and mine[-1]["status"] == 200
    handler_line = next(x for x in mine if x["msg"] == "echo called")
    assert handler_line["service"] == "echo" and handler_line["keys"] == []


def test_listing_disabled_body_limit_and_methods(server: Server):
    c = server.client
    names = [s["name"] for s in c.get("/services").json()["services"]]
    assert "echo" in names and "ops" in names
    assert not {"disabled", "broken", "nohandle", "Hello", "__init__"} & set(names)
    ops = next(s for s in c.get("/services").json()["services"] if s["name"] == "ops")
    assert ops == {"name": "ops", "description": "Operations, sync only, with a schema.",
                   "operations": ["create", "get"], "mode": "sync"}
    assert_problem(c.post("/services/disabled", {}), 403)
    assert_problem(c.post("/services/echo", raw=b"[" + b"1," * 4000 + b"1]"), 413)
    chunked = http.client.HTTPConnection("127.0.0.1", c.port, timeout=10)
    chunked.request("POST", "/services/echo", body=iter([b"[" + b"1," * 3000, b"1]"] * 2),
                    headers=signed_headers("POST", "/services/echo"), encode_chunked=True)
    assert_problem(Answer(*(lambda r: (r.status, r.headers, r.read()))(chunked.getresponse())),
                   413)
    chunked.close()
    not_allowed = assert_problem(c.request("PUT", "/services/echo"), 405)
    assert not_allowed["status"] == 405
    assert "POST" in c.request("PUT", "/services/echo").header("Allow")
    assert_problem(c.get("/nowhere"), 404)


def test_full_job_queue_is_503_with_retry_after(server: Server):
    # 2 workers x (1 running + 1 queued): six quick submissions cannot all fit.
    answers = [server.client.post("/services/slow", {"seconds": 1}) for _ in range(6)]
    statuses = sorted(a.status for a in answers)
    assert statuses.count(202) <= 4 and 503 in statuses
    refused = next(a for a in answers if a.status == 503)
    assert_problem(refused, 503)
    assert refused.header("Retry-After") == "1"
    for answer in answers:
        if answer.status == 202:
            wait_job(server, answer.header("Location"))


def test_a_late_call_is_504_and_health_never_waits_for_busy_threads(server: Server):
    c = server.client
    doc = assert_problem(c.post("/services/hang", {"seconds": 1}), 504)
    assert "0.5s" in doc["detail"]
    # More sleepers than the 2 x 4 request threads: every one is taken, some calls queue.
    with ThreadPoolExecutor(10) as pool:
        sleepers = [pool.submit(c.post, "/services/hang", {"seconds": 6}) for _ in range(10)]
        time.sleep(1)
        health = [c.get(path, timeout=5) for path in ("/healthz", "/readyz") * 3]
        scrape = c.get("/metrics", timeout=5)
        # Answered while every service thread still sleeps: off the request threads.
        assert not any(f.done() for f in sleepers)
        answers = [f.result() for f in sleepers]
    assert [h.status for h in health] == [200] * 6 and scrape.status == 200
    assert all(a.status == 504 for a in answers)
    # The same threads serve again once the sleepers return.
    assert c.post("/services/hang", {"seconds": 0}).json() == {"woke": True}
    text = c.get("/metrics").body.decode()
    assert 'service="hang",status="504"' in text  # the late answers, in the metrics


def test_the_catalog_lists_every_timeout_signed_for_the_sidecar_only(server: Server):
    from framework.catalog import SIGNATURE, body_signature
    from tests.framework.tenant import SECRET

    c = server.client
    assert_problem(c.get("/internal/catalog", sign=False), 401)
    answer = c.get("/internal/catalog")
    assert answer.status == 200
    assert answer.header(SIGNATURE) == body_signature(SECRET.encode(), answer.body)
    doc = answer.json()
    assert doc["default"] == 30.0
    assert doc["services"]["hang"] == 0.5  # [services.hang] timeout
    assert doc["services"]["ops"] == 5.0  # the module's TIMEOUT
    assert doc["services"]["echo"] == 30.0
    assert "disabled" not in doc["services"] and "broken" not in doc["services"]
    assert c.get("/readyz").json()["catalog"] == doc["version"]


def test_sigusr1_writes_every_workers_thread_stacks_and_serving_goes_on(server: Server):
    before = server.log_text().count("most recent call first")
    assert server.client.diagnose is not None
    tail = server.client.diagnose()
    stacks = server.log_text().count("most recent call first") - before
    # 2 workers, each with at least its main loop and a request thread: a hang is found
    # by where its threads wait.
    assert stacks >= 4 and "gthread.py" in tail, tail
    assert server.client.get("/healthz").status == 200
    assert server.client.post("/services/echo", {"n": 1}).status == 200
