"""services/orders.py: create and get, per-service config, the new_pricing flag."""

import jsonschema
import pytest
from conftest import Flags, load_service

orders = load_service("orders")


def test_create_uses_config_and_caller(make_context):
    ctx = make_context("orders", operation="create", payload={"item": "book", "quantity": 2},
                       config={"currency": "USD"}, user="alice")
    result = orders.handle(ctx)
    assert result["item"] == "book"
    assert result["quantity"] == 2
    assert result["currency"] == "USD"
    assert result["created_by"] == "alice"
    assert result["unit_price"] == 10.0
    assert len(result["order_id"]) == 32


def test_create_with_new_pricing_flag(make_context):
    ctx = make_context("orders", operation="create", payload={"item": "pen"},
                       flags=Flags({"new_pricing"}))
    result = orders.handle(ctx)
    assert result["unit_price"] == 9.5
    assert result["quantity"] == 1
    assert result["currency"] == "EUR"


def test_create_without_item_is_an_error_result(make_context):
    result = orders.handle(make_context("orders", operation="create", payload={}))
    assert result == {"error": "item is required"}


def test_get_reads_payload_or_query(make_context):
    by_body = orders.handle(make_context("orders", operation="get", payload={"order_id": "a1"}))
    by_query = orders.handle(make_context("orders", operation="get", params={"order_id": "b2"}))
    assert by_body == {"order_id": "a1", "status": "shipped"}
    assert by_query == {"order_id": "b2", "status": "shipped"}


def test_declares_operations_and_sync_mode():
    assert orders.OPERATIONS == ["create", "get"]
    assert orders.MODE == "sync"


@pytest.mark.parametrize("payload", [{"item": ""}, {"item": "x", "quantity": 0}, {"extra": 1}])
def test_schema_refuses_bad_input(payload):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(payload, orders.INPUT_SCHEMA)
