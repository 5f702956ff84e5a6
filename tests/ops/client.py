"""Signed requests straight to the framework, the way the sidecar sends them."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from typing import Any

from framework import signing
from tests.ops.tenant import SIDECAR_SECRET, TENANT


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """HTTP to one address; identity headers signed with the sidecar secret."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port

    def request(self, method: str, path: str, body: Any = None, *, user: str = "alice",
                roles: str = "", groups: str = "", request_id: str = "req-ops",
                headers: dict[str, str] | None = None) -> Answer:
        sent = {signing.REQUEST_ID: request_id, signing.TENANT: TENANT, signing.USER: user,
                signing.GROUPS: groups, signing.ROLES: roles, signing.AUTH_METHOD: "jwt"}
        sent.update(signing.sign(SIDECAR_SECRET.encode(), method, path, sent))
        sent.update(headers or {})
        data = json.dumps(body).encode() if body is not None else None
        conn = http.client.HTTPConnection(self.host, self.port, timeout=20)
        try:
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            return Answer(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Answer:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Answer:
        return self.request("POST", path, body, **kw)
