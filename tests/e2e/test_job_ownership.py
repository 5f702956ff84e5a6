"""`mtp run` end to end: a job belongs to its principal, the auth method and user id together.

The API key named ``ci-bot`` and a JWT with ``sub = ci-bot`` are two principals: neither
sees nor cancels the other's job (404, as for a job that does not exist); role admin
sees both (DESIGN.md, jobs routes; issue 14).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.helpers import stop
from tests.sidecar.run_stack import RunStack, start_default
from tests.sidecar.support import API_KEY, token

pytestmark = pytest.mark.slow

JSON = {"Content-Type": "application/json"}
KEY = {"X-API-Key": API_KEY, **JSON}


def jwt_of(sub: str, *roles: str) -> dict[str, str]:
    extra = {"roles": list(roles)} if roles else {}
    return {"Authorization": f"Bearer {token(sub=sub, **extra)}", **JSON}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[RunStack]:
    stack = start_default(tmp_path_factory.mktemp("run-jobs"))
    try:
        yield stack
    finally:
        stop(stack.proc)


def submit_whoami(run: RunStack, who: dict[str, str]) -> str:
    answer = run.call("POST", "/services/whoami?mode=async", who, b"{}")
    assert answer.status == 202, answer.body
    return answer.json()["job_id"]


def test_an_api_key_and_a_jwt_with_the_same_user_id_do_not_share_jobs(run: RunStack) -> None:
    by_key = submit_whoami(run, KEY)
    by_jwt = submit_whoami(run, jwt_of("ci-bot"))
    for job_id, owner, other in ((by_key, KEY, jwt_of("ci-bot")),
                                 (by_jwt, jwt_of("ci-bot"), KEY)):
        mine = run.call("GET", f"/jobs/{job_id}", owner)
        assert mine.status == 200, mine.body
        theirs = run.call("GET", f"/jobs/{job_id}", other)
        assert theirs.status == 404, theirs.body
        assert theirs.headers["Content-Type"] == "application/problem+json"
        assert json.loads(theirs.body)["detail"] == "no such job"
        refused = run.call("DELETE", f"/jobs/{job_id}", other)
        assert refused.status == 404, refused.body
        # The same answer as for an id nobody has: existence does not leak.
        assert run.call("GET", "/jobs/" + "0" * 32, other).status == 404
    admin = jwt_of("root", "admin")
    for job_id in (by_key, by_jwt):
        seen = run.call("GET", f"/jobs/{job_id}", admin)
        assert seen.status == 200 and seen.json()["job_id"] == job_id


def test_the_job_runs_as_the_principal_that_created_it(run: RunStack) -> None:
    job_id = submit_whoami(run, KEY)
    for _ in range(100):
        body = run.call("GET", f"/jobs/{job_id}", KEY).json()
        if body["status"] == "succeeded":
            break
        time.sleep(0.1)
    assert body["status"] == "succeeded", body
    assert (body["result"]["user"], body["result"]["auth_method"]) == ("ci-bot", "api_key")
