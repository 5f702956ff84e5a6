"""A Redis job's span links to the request that queued it (real redis-server, RQ's stored
call, the `mtp worker` job function), in process with the SDK's in-memory exporter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from rq.job import Job as RqJob
from rq.serializers import JSONSerializer

from framework import signing, tracing
from framework.app import create_app
from framework.jobs_redis import connect, install_worker, perform
from framework.settings import Settings
from tests.redis.stack import SIDECAR_SECRET, TENANT, write_tenant

TRACE_ID = "5bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "10f067aa0ba902b7"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    tracing.setup({}, "mtp-test", TENANT, exporter=memory)
    yield memory
    tracing.shutdown()


def test_redis_job_span_links_to_the_framework_request(redis_server, tmp_path: Path,
                                                       exporter: InMemorySpanExporter) -> None:
    from framework.cli.worker import build_job_worker

    connect(redis_server.url).flushdb()
    root = write_tenant(tmp_path / "t", "rate = 1000\nburst = 1000")
    settings = Settings.from_env({"MTP_REDIS_URL": redis_server.url,
                                  "MTP_SIDECAR_SECRET": SIDECAR_SECRET,
                                  "MTP_DATA_DIR": str(tmp_path / "data"),
                                  "MTP_LOG_LEVEL": "WARNING"}, tenant_dir=root)
    app = create_app(settings, settings.load_tenant(), background=False)
    sent = {signing.REQUEST_ID: "req-traced", signing.TENANT: TENANT, signing.USER: "alice",
            signing.GROUPS: "", signing.ROLES: "", signing.AUTH_METHOD: "jwt"}
    body = json.dumps({"x": 1}).encode()
    sent.update(signing.sign(SIDECAR_SECRET.encode(), "POST", "/services/echo", sent, body=body))
    # The traceparent stands for the sidecar's (the framework cannot tell them apart).
    sent.update({"traceparent": f"00-{TRACE_ID}-{CLIENT_SPAN}-01", "Prefer": "respond-async"})
    try:
        reply = app.test_client().post("/services/echo", data=body, headers=sent,
                                       content_type="application/json")
        assert reply.status_code == 202, reply.get_json()
        job_id = reply.get_json()["job_id"]
        framework = [s for s in exporter.get_finished_spans() if s.name.startswith("framework")]
        assert len(framework) == 1
        assert format(framework[0].parent.span_id, "016x") == CLIENT_SPAN
        # What RQ stored is what the worker runs: the call, with the request's context.
        call = RqJob.fetch(job_id, connection=connect(redis_server.url),
                           serializer=JSONSerializer).args[1]
        assert call["trace"]["traceparent"].split("-")[1] == TRACE_ID
        worker = build_job_worker(settings, settings.load_tenant())
        install_worker(worker)
        try:
            assert perform(job_id, call) == "succeeded"
        finally:
            install_worker(None)  # type: ignore[arg-type]
            worker.close()
            worker.rt.close()
    finally:
        app.extensions["mtp.operations"].close()
        app.extensions["mtp"].close()
    [job] = [s for s in exporter.get_finished_spans() if s.name == "job echo"]
    assert job.parent is None and job.context.trace_id != int(TRACE_ID, 16)
    assert [link.context.span_id for link in job.links] == [framework[0].context.span_id]
    assert job.attributes["mtp.request_id"] == "req-traced"
    assert job.attributes["mtp.status"] == 200
