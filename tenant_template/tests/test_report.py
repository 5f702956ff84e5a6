"""services/report.py: an async-only service that sums 1..rows."""

import jsonschema
import pytest
from conftest import load_service

report = load_service("report")


def test_sums_rows(make_context):
    result = report.handle(make_context("report", payload={"rows": 100, "seconds": 0}))
    assert result == {"rows": 100, "total": 5050}


def test_is_async_only():
    assert report.MODE == "async"


def test_schema_caps_the_wait():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"seconds": 31}, report.INPUT_SCHEMA)
