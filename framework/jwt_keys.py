"""JWT verification keys: which key can verify which algorithm, and ``public_key_file``.

One loader for ``[auth.jwt] public_key_file``, used by both ``mtp check`` and the
sidecar's start, so the two can never disagree about a key file. A relative path
is read from the folder of tenant.toml (not from wherever the process was started).
The file may hold a PEM public key (SubjectPublicKeyInfo or PKCS#1 RSA) or an X.509
certificate PEM, whose public key is used (identity providers often publish their
signing key as a certificate); the certificate's validity dates are not checked, as
a public key's would not be. A private key, anything else, or a key that cannot
verify every asymmetric algorithm the tenant allows (an EC key with RS256) is
refused with the file, the key and the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from framework.tenant_config import ConfigError, TenantConfig

KEY = "auth.jwt.public_key_file"
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1",
           "ES256K": "secp256k1"}
_MAX_BYTES = 1 << 20  # a key or certificate is a few KiB


def key_fits(algorithm: str, key: Any) -> bool:
    """True when ``key`` (a public key object, or bytes for HS*) can verify ``algorithm``."""
    if algorithm.startswith("HS"):
        return isinstance(key, bytes)
    if algorithm[:2] in ("RS", "PS"):
        return isinstance(key, rsa.RSAPublicKey)
    if algorithm in _CURVES:
        # A P-384 key cannot verify ES256: the curve is part of the algorithm.
        return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _CURVES[algorithm]
    if algorithm == "EdDSA":
        return isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    return False


def describe(key: Any) -> str:
    """A key's type for messages: ``RSA``, ``EC secp256r1``, ``Ed25519``..."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def key_path(tenant: TenantConfig) -> Path:
    """Where ``public_key_file`` is: relative paths are read from tenant.toml's folder."""
    path = Path(tenant.jwt.public_key_file)
    if path.is_absolute() or not tenant.source:
        return path
    return Path(tenant.source).parent / path


def parse_public_key(data: bytes) -> Any:
    """The public key in PEM ``data`` (a public key or a certificate); ValueError says why not."""
    if b"PRIVATE KEY-----" in data:
        # Never parse it: a private key has no business on the verifying side.
        raise ValueError("is a private key: give the public key "
                         "(openssl pkey -in key.pem -pubout) or the certificate")
    if b"-----BEGIN CERTIFICATE-----" in data:
        try:
            return x509.load_pem_x509_certificate(data).public_key()
        except ValueError as exc:
            raise ValueError(f"not a readable X.509 certificate ({exc})") from None
    try:
        return load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ValueError("not a PEM public key or X.509 certificate") from None


def load_public_key(tenant: TenantConfig) -> Any:
    """The verifying key of ``public_key_file``, checked against the allowed algorithms.

    None when no file is configured; ConfigError naming tenant.toml, the key and the
    reason when the file is unusable.
    """
    if not tenant.jwt.public_key_file:
        return None
    path = key_path(tenant)
    where = tenant.source or str(path)
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(where, KEY, f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > _MAX_BYTES:
        raise ConfigError(where, KEY, f"{path}: too large for a key (over 1 MiB)")
    try:
        key = parse_public_key(data)
    except ValueError as exc:
        raise ConfigError(where, KEY, f"{path}: {exc}") from None
    for algorithm in tenant.jwt.algorithms:
        if not algorithm.startswith("HS") and not key_fits(algorithm, key):
            raise ConfigError(where, KEY, f"{path}: {describe(key)} key cannot verify "
                                          f"{algorithm} (auth.jwt.algorithms)")
    return key
