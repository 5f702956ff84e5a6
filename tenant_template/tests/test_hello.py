"""services/hello.py: greets by name, falls back to the caller's user id."""

from conftest import load_service

hello = load_service("hello")


def test_greets_the_name_in_the_payload(make_context):
    result = hello.handle(make_context("hello", payload={"name": "Bob"}))
    assert result == {"message": "Hello, Bob!", "tenant": "demo"}


def test_greets_the_caller_without_a_name(make_context):
    result = hello.handle(make_context("hello", payload=None, user="carol"))
    assert result["message"] == "Hello, carol!"


def test_has_no_operations_and_runs_both_ways():
    assert not hasattr(hello, "OPERATIONS")
    assert getattr(hello, "MODE", "both") == "both"
