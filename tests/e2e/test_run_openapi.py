"""`mtp run` end to end: GET /openapi.json through the sidecar, and schemathesis against it.

schemathesis generates requests from the served document (valid ones and, per its
negative mode, invalid ones) and checks every answer against it: no 5xx, only
documented statuses, headers and bodies that match their schemas.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from openapi_spec_validator import validate
from schemathesis.core.failures import FailureGroup

from tests.framework.openapi_tenant import API_KEY, make_openapi_tenant
from tests.helpers import base_env, free_port, stop
from tests.sidecar.run_stack import RunStack, run_env, start_run
from tests.sidecar.support import JWT_SECRET, SIDECAR_SECRET, token

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": f"Bearer {token(sub='root', roles=['admin'])}"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunStack]:
    root = tmp_path_factory.mktemp("run-openapi")
    tdir = make_openapi_tenant(root / "tenant")
    env = run_env(root, free_port(), MTP_SIDECAR_SECRET=SIDECAR_SECRET,
                  MTP_JWT_SECRET=JWT_SECRET)
    stack = start_run(root, tdir, env)
    try:
        yield stack
    finally:
        stop(stack.proc)


def served(run: RunStack, headers: dict[str, str]) -> dict[str, Any]:
    r = run.call("GET", "/openapi.json", headers)
    assert r.status == 200, r.body
    assert r.headers["Content-Type"] == "application/json"
    return r.json()


def test_the_document_needs_credentials_like_any_call(run: RunStack) -> None:
    r = run.call("GET", "/openapi.json")
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.headers["Content-Type"] == "application/problem+json"
    assert run.call("GET", "/openapi.json", {"X-API-Key": "wrong"}).status == 401
    other_tenant = {"Authorization": f"Bearer {token(tenant='globex')}"}
    assert run.call("GET", "/openapi.json", other_tenant).status == 403


def test_each_caller_gets_the_services_it_may_invoke(run: RunStack) -> None:
    alice = served(run, {"Authorization": f"Bearer {token()}"})
    validate(alice)
    services = {p for p in alice["paths"] if p.startswith("/services/")}
    assert services == {"/services/whoami", "/services/tree", "/services/report"}
    seller = served(run, {"Authorization": f"Bearer {token(groups=['sales'])}"})
    assert "/services/orders/create" in seller["paths"]
    assert "/services/orders/get" not in seller["paths"]
    # The list and the document agree for every caller.
    listed = run.call("GET", "/services", {"Authorization": f"Bearer {token(groups=['sales'])}"})
    assert {f"/services/{s['name']}" + (f"/{op}" if op else "")
            for s in listed.json()["services"] for op in (s["operations"] or [None])} == {
        p for p in seller["paths"] if p.startswith("/services/")}
    # An API key is a caller too (role deployer: no rule names it).
    keyed = served(run, {"X-API-Key": API_KEY})
    assert "/services/orders/create" not in keyed["paths"]
    assert set(keyed["components"]["securitySchemes"]) == {"bearer", "apiKey"}


def test_what_the_document_promises_holds(run: RunStack) -> None:
    """One call per kind of answer, checked against the served document by hand."""
    doc = served(run, ADMIN)
    bearer = ADMIN
    sync = run.call("POST", "/services/tree", bearer, b'{"name": "a", "children": [{"name": "b"}]}')
    assert sync.status == 200 and sync.json() == {"nodes": 2}
    assert "202" not in doc["paths"]["/services/tree"]["post"]["responses"]
    queued = run.call("POST", "/services/report", bearer, b"{}")
    assert queued.status == 202 and queued.headers["Location"].startswith("/jobs/")
    assert "202" in doc["paths"]["/services/report"]["post"]["responses"]
    job = run.call("GET", queued.headers["Location"], bearer)
    assert job.status == 200 and job.json()["job_id"] == queued.json()["job_id"]
    bad = run.call("POST", "/services/orders/create", bearer, b'{"qty": 1}')
    assert bad.status == 400 and "400" in doc["paths"]["/services/orders/create"]["post"][
        "responses"]
    assert bad.headers["Content-Type"] == "application/problem+json"
    # The HTTP parser's refusals are in the document too.
    big = run.call("GET", "/services/whoami", {**bearer, "X-Big": "a" * 20000})
    assert str(big.status) in doc["paths"]["/services/whoami"]["get"]["responses"]
    assert big.status == 431 and big.headers["X-Request-ID"]


# Two of schemathesis' expectations differ from the contract (DESIGN.md), by design:
# - the coverage phase sends methods the document does not declare and wants 405 for
#   them; QUERY is left out: it is a draft method (not RFC 9110/5789), and the sidecar
#   answers every method it does not know 501, as RFC 9110 15.6.2 says;
# - use_after_free wants 404 for a resource after its DELETE, but DELETE /jobs/{id}
#   cancels a queued job, which then stays readable with status "cancelled".
CONFIG = """
[phases.coverage]
unexpected-methods = ["get", "put", "post", "delete", "options", "patch", "trace"]
"""


def schemathesis_run(run: RunStack, tmp_path: Path, headers: dict[str, str],
                     examples: int) -> subprocess.CompletedProcess[str]:
    """schemathesis' own command line, as a user runs it: every check, every phase."""
    doc = tmp_path / "openapi.json"
    doc.write_text(json.dumps(served(run, headers)))
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    args = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config),
            "--no-color", "run", str(doc), "--url", f"http://127.0.0.1:{run.port}",
            "--checks", "all", "--exclude-checks", "use_after_free",
            "--max-examples", str(examples), "--seed", "18",
            # One worker: two share hypothesis state that is not thread safe (its errors).
            "--workers", "1", "--request-timeout", "20"]
    for name, value in headers.items():
        args += ["--header", f"{name}: {value}"]
    # The time cap: a few seconds is the norm; more means something hangs.
    return subprocess.run(args, capture_output=True, text=True, timeout=90, cwd=tmp_path,
                          env=base_env(), check=False)


def test_schemathesis_finds_no_server_error_and_no_broken_answer(
        run: RunStack, tmp_path: Path) -> None:
    done = schemathesis_run(run, tmp_path, ADMIN, examples=25)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_schemathesis_with_an_api_key_and_a_narrower_document(
        run: RunStack, tmp_path: Path) -> None:
    done = schemathesis_run(run, tmp_path, {"X-API-Key": API_KEY}, examples=5)
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]


def test_a_failing_document_would_be_caught(run: RunStack) -> None:
    """The check has teeth: a document that hides a status makes the run fail."""
    doc = served(run, ADMIN)
    del doc["paths"]["/services/orders/create"]["post"]["responses"]["400"]
    broken = schemathesis.openapi.from_dict(doc)
    broken.config.update(base_url=f"http://127.0.0.1:{run.port}")
    operation = broken["/services/orders/create"]["POST"]
    case = operation.Case(body={"qty": 1})
    with pytest.raises(FailureGroup, match="Undocumented status code"):
        case.call_and_validate(headers=dict(ADMIN), timeout=20)


def test_a_429_matches_the_document(run: RunStack) -> None:
    """The refusals schemathesis does not provoke, checked against the served document."""
    schema = schemathesis.openapi.from_dict(served(run, ADMIN))
    schema.config.update(base_url=f"http://127.0.0.1:{run.port}")
    operation = schema["/services/whoami"]["POST"]
    # A rate nobody else uses marks the first answer served under this overlay.
    run.overlay.write_text("[limits]\nrate = 9003\nburst = 9003\ndaily_quota = 3\n")
    try:
        deadline = time.monotonic() + 10
        statuses = []
        while not statuses or statuses[-1] != 429:
            assert time.monotonic() < deadline, statuses
            case = operation.Case(body={})
            response = case.call(headers=dict(ADMIN), timeout=20)
            if response.headers.get("ratelimit-limit") not in (["9003"], ["3"]):
                time.sleep(0.05)  # still the old limits
                continue
            statuses.append(response.status_code)
            case.validate_response(response)  # raises on anything the document does not say
        assert response.headers["retry-after"][0].isdigit()
    finally:
        run.overlay.unlink()
    assert statuses[-1] == 429
