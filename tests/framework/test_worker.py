"""The gunicorn worker's side door: which requests skip the service threads."""

from __future__ import annotations

import io
import socket
from types import SimpleNamespace

import pytest

from framework.worker import first_bytes, side_request


@pytest.mark.parametrize(("head", "side"), [
    (b"GET /healthz HTTP/1.1\r\n", True),
    (b"GET /readyz?x=1 HTTP/1.1\r\n", True),
    (b"GET /metrics HTTP/1.1\r\n", True),
    (b"GET /internal/catalog HTTP/1.1\r\n", True),
    (b"POST /readyz HTTP/1.1\r\n", False),
    (b"GET /services/readyz HTTP/1.1\r\n", False),
    (b"GET /readyzz HTTP/1.1\r\n", False),
    (b"GET /rea", False),  # a request line cut short: the ordinary threads
    (b"", False),
])
def test_side_requests_are_gets_of_the_health_routes_only(head: bytes, side: bool) -> None:
    assert side_request(head) is side


def test_first_bytes_peeks_without_consuming_and_prefers_read_ahead() -> None:
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        conn = SimpleNamespace(parser=None, sock=ours)
        assert first_bytes(conn) == b"GET /healthz HTTP/1.1\r\n\r\n"
        assert ours.recv(100).startswith(b"GET /healthz")  # still there: only peeked
        assert first_bytes(conn) == b""  # nothing waiting (and no blocking)
        buffered = SimpleNamespace(unreader=SimpleNamespace(buf=io.BytesIO(b"GET /readyz")))
        assert first_bytes(SimpleNamespace(parser=buffered, sock=ours)) == b"GET /readyz"
        ours.close()
        assert first_bytes(conn) == b""  # a closed socket: the ordinary path decides
    finally:
        theirs.close()
