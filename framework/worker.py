"""gunicorn's gthread worker with a side door: health checks never wait for service threads.

A sync handler runs on the request thread that took the call, so when every
thread holds a slow (or hung) handler, a request for ``/healthz`` or ``/readyz``
would queue behind them and a busy framework would look dead. This worker reads
the request line before it picks a thread (a ``MSG_PEEK``, nothing consumed):
``GET /healthz``, ``/readyz``, ``/metrics`` and ``/internal/catalog`` run on a
small pool of their own (SIDE_THREADS), every other request on the ``threads``
that MTP_THREADS sets. A stopped or deadlocked process still answers nothing.
"""

from __future__ import annotations

import selectors
import socket
import time
from concurrent import futures
from functools import partial
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

SIDE_THREADS = 2  # one slow metrics scrape cannot hold up a health check
SIDE_PATHS = frozenset({b"/healthz", b"/readyz", b"/metrics", b"/internal/catalog"})
PEEK = 64


def side_request(head: bytes) -> bool:
    """Whether the request starting with ``head`` is one for the side pool."""
    if not head.startswith(b"GET /"):
        return False
    target = head[4:].split(b" ", 1)[0]
    return target.split(b"?", 1)[0] in SIDE_PATHS


def first_bytes(conn: Any) -> bytes:
    """The start of the connection's next request, without consuming it."""
    parser = conn.parser
    if parser is not None:
        buffered = parser.unreader.buf.getvalue()  # read ahead by the previous request
        if buffered:
            return bytes(buffered[:PEEK])
    try:
        return conn.sock.recv(PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return b""


class FrameworkWorker(ThreadWorker):
    """gthread, plus the side pool for health, readiness, metrics and the catalog."""

    side: futures.ThreadPoolExecutor

    def init_process(self) -> None:
        self.side = futures.ThreadPoolExecutor(max_workers=SIDE_THREADS,
                                               thread_name_prefix="mtp-side")
        super().init_process()  # runs the worker until it stops

    def handle_quit(self, sig: Any, frame: Any) -> None:
        self.side.shutdown(wait=False)
        super().handle_quit(sig, frame)

    def enqueue_req(self, conn: Any) -> None:
        """Submit ``conn`` to the side pool or the request pool, by its request line."""
        if not conn.initialized and not conn.data_ready:
            # A new connection: wait on the poller for its first bytes (as gthread does
            # for a connection that sent nothing yet), so the request line can be read.
            conn.sock.setblocking(False)
            conn.timeout = time.monotonic() + self.cfg.keepalive
            self.pending_conns.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self.on_pending_socket_readable, conn))
            return
        pool = self.side if side_request(first_bytes(conn)) else self.tpool
        fs = pool.submit(self.handle, conn)
        fs.add_done_callback(
            lambda fut: self.method_queue.defer(self.finish_request, conn, fut))
