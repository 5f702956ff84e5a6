"""A tiny HTTP client that signs requests the way the sidecar does."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from framework import signing
from tests.framework.tenant import SECRET, TENANT


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def identity(user: str = "alice", groups: str = "", roles: str = "", tenant: str = TENANT,
             auth: str = "jwt", request_id: str = "req-1") -> dict[str, str]:
    return {
        signing.REQUEST_ID: request_id, signing.TENANT: tenant, signing.USER: user,
        signing.GROUPS: groups, signing.ROLES: roles, signing.AUTH_METHOD: auth,
    }


def signed_headers(method: str, path: str, secret: str = SECRET, now: float | None = None,
                   body: bytes | None = None, **who: str) -> dict[str, str]:
    headers = identity(**who)
    headers.update(signing.sign(secret.encode(), method, path, headers, now=now, body=body))
    return headers


class UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (the default upstream between sidecar and framework)."""

    def __init__(self, path: str, timeout: float = 20) -> None:
        super().__init__("framework", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Client:
    """Requests to one framework address; ``sign=False`` sends no signature at all."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", unix: str = "",
                 secret: str = SECRET, diagnose: Callable[[], str] | None = None) -> None:
        self.host, self.port, self.unix, self.secret = host, port, unix, secret
        self.diagnose = diagnose  # what the server was doing, for a request without answer

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                sign: bool = True, headers: dict[str, str] | None = None,
                timeout: float = 20, **who: Any) -> Answer:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                            else None)
        sent = signed_headers(method, path, self.secret, body=data, **who) if sign else {}
        sent.update(headers or {})
        conn = (UnixConnection(self.unix, timeout) if self.unix
                else http.client.HTTPConnection(self.host, self.port, timeout=timeout))
        try:
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            return Answer(resp.status, resp.headers, resp.read())
        except TimeoutError:
            if self.diagnose is None:
                raise
            raise AssertionError(f"{method} {path}: no answer in {timeout:g}s\n"
                                 f"{self.diagnose()}") from None
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Answer:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Answer:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Answer:
        return self.request("DELETE", path, **kw)
