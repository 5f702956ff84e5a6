"""Sidecar metrics: made-up service names cannot grow the series without end."""

from __future__ import annotations

from sidecar.metrics import OTHER, Metrics


def series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_labels_past_the_cap_are_counted_as_other() -> None:
    metrics = Metrics(max_targets=2)
    for i in range(50):
        metrics.observe("acme", f"made_up_{i}", "", 403, 0.001)
        metrics.decision(Metrics.AUTHZ, "acme", f"made_up_{i}", "", "denied")
    metrics.observe("acme", "made_up_0", "", 200, 0.001)  # a pair seen before keeps its name
    text = metrics.render().decode()
    requests = series(text, "mtp_sidecar_requests_total")
    assert len(requests) == 4
    assert any(f'service="{OTHER}"' in line and line.endswith(" 48.0") for line in requests)
    assert any('service="made_up_0"' in line and 'status="200"' in line for line in requests)
    assert len(series(text, "mtp_sidecar_authz_decisions_total")) == 3
    assert len(series(text, "mtp_sidecar_request_seconds_count")) == 3
