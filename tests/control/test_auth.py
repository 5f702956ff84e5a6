"""Operator authentication, decision by decision (the HTTP paths are in test_api.py)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import jwt
import pytest
from multidict import CIMultiDict

from framework.control.auth import OperatorAuth, load_auth, load_operator_keys
from framework.control.errors import Forbidden, Unauthenticated

SECRET = b"s" * 64
KEY = "operator-key-0123456789"


def auth() -> OperatorAuth:
    return OperatorAuth(SECRET, {"robot": hashlib.sha256(KEY.encode()).digest()})


def bearer(secret: bytes = SECRET, **claims: object) -> CIMultiDict:
    body = {"sub": "ops", "exp": int(time.time()) + 3600, "roles": ["platform-admin"], **claims}
    return CIMultiDict({"Authorization": f"Bearer {jwt.encode(body, secret, 'HS256')}"})


def test_operators_pass() -> None:
    assert auth().authenticate(bearer()).name == "ops"
    assert auth().authenticate(bearer(roles="admin,platform-admin")).method == "jwt"
    assert auth().authenticate(CIMultiDict({"X-API-Key": KEY})).name == "robot"


@pytest.mark.parametrize(("headers", "error"), [
    (CIMultiDict(), Unauthenticated),
    (CIMultiDict({"Authorization": "Bearer "}), Unauthenticated),
    (CIMultiDict({"Authorization": "Token abc"}), Unauthenticated),
    (CIMultiDict([("X-API-Key", KEY), ("X-API-Key", KEY)]), Unauthenticated),
    (CIMultiDict({"X-API-Key": "wrong"}), Unauthenticated),
    (bearer(secret=b"t" * 64), Unauthenticated),
    (bearer(sub=""), Unauthenticated),
    (bearer(sub=123), Unauthenticated),
    (bearer(exp=int(time.time()) - 100), Unauthenticated),
    (bearer(roles=["admin"]), Forbidden),
    (bearer(roles={"platform-admin": True}), Forbidden),
    (bearer(tenant_id="acme"), Forbidden),
    (bearer(tenant="acme"), Forbidden),
])
def test_everyone_else_is_refused(headers: CIMultiDict, error: type) -> None:
    with pytest.raises(error):
        auth().authenticate(headers)


def test_tokens_need_a_configured_secret() -> None:
    with pytest.raises(Unauthenticated, match="not enabled"):
        OperatorAuth(b"", {}).authenticate(bearer())


def test_algorithms_come_from_config_never_from_the_token() -> None:
    body = {"sub": "ops", "exp": int(time.time()) + 3600, "roles": ["platform-admin"]}
    unsigned = jwt.encode(body, None, algorithm="none")
    with pytest.raises(Unauthenticated):
        auth().authenticate(CIMultiDict({"Authorization": f"Bearer {unsigned}"}))
    hs512 = jwt.encode(body, SECRET, algorithm="HS512")  # one of the fixed algorithms
    assert auth().authenticate(CIMultiDict({"Authorization": f"Bearer {hs512}"})).name == "ops"


def test_keys_file(tmp_path: Path) -> None:
    assert load_operator_keys("") == {}
    path = tmp_path / "keys.toml"
    path.write_text(f'[keys.robot]\nhash = "sha256:{hashlib.sha256(KEY.encode()).hexdigest()}"\n')
    assert load_auth(SECRET, str(path)).authenticate(CIMultiDict({"X-API-Key": KEY})).name == \
        "robot"
