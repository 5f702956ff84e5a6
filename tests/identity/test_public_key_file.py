"""``[auth.jwt] public_key_file``: `mtp check` and the sidecar's start read it alike.

Both call framework/jwt_keys.py's loader: a PEM public key or an X.509 certificate
is accepted (the certificate's key verifies tokens), a private key, garbage, a
missing file or a key that cannot verify an allowed algorithm is refused by both
with the same line naming tenant.toml, the key and the reason.
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from framework.jwt_keys import describe, key_fits, parse_public_key
from tests.helpers import base_env, free_port, spawn, stop, wait_for_port
from tests.sidecar.support import SIDECAR_SECRET, call

MTP = [sys.executable, "-m", "framework"]
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def certificate_pem(key) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def tenant(tmp_path: Path, content: bytes | None, algorithms: str = '"RS256"') -> Path:
    """A tenant dir whose tenant.toml names ``keys/jwt.pem`` (relative: read from its folder)."""
    d = tmp_path / "tenant"
    (d / "keys").mkdir(parents=True)
    if content is not None:
        (d / "keys" / "jwt.pem").write_bytes(content)
    (d / "tenant.toml").write_text(
        f'[tenant]\nid = "acme"\n\n[auth.jwt]\nalgorithms = [{algorithms}]\n'
        f'public_key_file = "keys/jwt.pem"\nleeway = 0\n')
    return d


def mtp_check(d: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*MTP, "check", "--tenant-dir", str(d)], capture_output=True,
                          text=True, env=base_env(), cwd=cwd, timeout=60)


def sidecar_env(d: Path, port: int) -> dict[str, str]:
    # No framework behind it: a verified token gets 502, a refused one 401.
    return base_env(MTP_SIDECAR_SECRET=SIDECAR_SECRET, MTP_TENANT_DIR=str(d),
                    MTP_UPSTREAM=f"unix:{d / 'none.sock'}", MTP_LISTEN=f"127.0.0.1:{port}",
                    MTP_AUDIT_FILE=str(d / "audit.log"))


REFUSED: dict[str, tuple[Callable[[], bytes | None], str, str]] = {
    "private key": (lambda: private_pem(RSA_KEY), '"RS256"', "is a private key"),
    "garbage": (lambda: b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n",
                '"RS256"', "not a PEM public key or X.509 certificate"),
    "broken certificate": (lambda: b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                   b"-----END CERTIFICATE-----\n",
                           '"RS256"', "not a readable X.509 certificate"),
    "missing file": (lambda: None, '"RS256"', "cannot read: No such file or directory"),
    "EC key, RS256 allowed": (lambda: public_pem(EC_KEY), '"RS256"',
                              "EC secp256r1 key cannot verify RS256"),
    "RSA key, ES256 also allowed": (lambda: public_pem(RSA_KEY), '"RS256", "ES256"',
                                    "RSA key cannot verify ES256"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_check_and_sidecar_refuse_an_unusable_key_file_alike(tmp_path: Path, case: str) -> None:
    make, algorithms, reason = REFUSED[case]
    d = tenant(tmp_path, make(), algorithms)
    expected = (f"{d / 'tenant.toml'}: auth.jwt.public_key_file: "
                f"{d / 'keys' / 'jwt.pem'}: {reason}")
    checked = mtp_check(d, cwd=tmp_path)
    assert checked.returncode == 1
    assert f"mtp check: {expected}" in checked.stderr
    started = subprocess.run([*MTP, "sidecar"], capture_output=True, text=True,
                             env=sidecar_env(d, free_port()), cwd=tmp_path, timeout=60)
    assert started.returncode == 2
    assert f"mtp: config error: {expected}" in started.stderr
    assert "Traceback" not in checked.stderr + started.stderr


@pytest.mark.parametrize("form", ["public key", "certificate"])
def test_check_and_sidecar_accept_a_public_key_or_a_certificate(tmp_path: Path,
                                                                form: str) -> None:
    d = tenant(tmp_path, public_pem(RSA_KEY) if form == "public key"
               else certificate_pem(RSA_KEY))
    checked = mtp_check(d, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    port = free_port()
    proc = spawn([*MTP, "sidecar"], sidecar_env(d, port), log=tmp_path / "sidecar.log",
                 cwd=tmp_path)
    try:
        wait_for_port(port, proc)
        claims = {"sub": "alice", "tenant_id": "acme", "exp": int(time.time()) + 60}
        good = jwt.encode(claims, RSA_KEY, "RS256")
        stranger = jwt.encode(claims, rsa.generate_private_key(public_exponent=65537,
                                                               key_size=2048), "RS256")
        assert call(port, "GET", "/services/hello", {"Authorization": f"Bearer {good}"}
                    ).status == 502  # past authentication: only the absent framework fails
        assert call(port, "GET", "/services/hello", {"Authorization": f"Bearer {stranger}"}
                    ).status == 401
    finally:
        stop(proc)


def test_an_ed25519_certificate_fits_eddsa_only() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, None))
    found = parse_public_key(cert.public_bytes(serialization.Encoding.PEM))
    assert describe(found) == "Ed25519"
    assert key_fits("EdDSA", found) and not key_fits("ES256", found)
    assert not key_fits("HS256", found) and key_fits("HS256", b"secret")
    assert not key_fits("XX256", found)


def test_absolute_paths_oversized_files_and_other_key_types(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import dsa, ed448

    from framework.jwt_keys import load_public_key
    from framework.tenant_config import ConfigError, load_tenant

    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * ((1 << 20) + 1))
    (tmp_path / "tenant.toml").write_text(
        f'[tenant]\nid = "acme"\n[auth.jwt]\nalgorithms = ["EdDSA"]\n'
        f'public_key_file = "{big}"\n')
    with pytest.raises(ConfigError, match="too large"):
        load_public_key(load_tenant(tmp_path / "tenant.toml"))
    ed = ed448.Ed448PrivateKey.generate().public_key()
    big.write_bytes(ed.public_bytes(serialization.Encoding.PEM,
                                    serialization.PublicFormat.SubjectPublicKeyInfo))
    assert describe(load_public_key(load_tenant(tmp_path / "tenant.toml"))) == "Ed448"
    other = dsa.generate_private_key(2048).public_key()
    assert describe(other) == type(other).__name__ and not key_fits("RS256", other)
