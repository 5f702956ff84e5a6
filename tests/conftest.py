"""Shared fixtures for every test module (keep this file tiny)."""

from tests.servers import redis_server, slapd_server  # noqa: F401 - fixtures, found by name
