"""Throwaway real servers for tests: OpenLDAP ``slapd`` and ``redis-server`` on loopback.

Use the fixtures (``slapd_server``, ``redis_server``; registered in tests/conftest.py) or the
classes directly when a test needs a private instance. Both servers can be stopped and started
again on the same port with the same data, to simulate an outage and a recovery.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from framework.tenant_config import LdapSettings
from tests.helpers import free_port, require_binary, spawn, stop, wait_for_port

DIRECTORY_LDIF = Path(__file__).resolve().parent / "data" / "directory.ldif"

SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"

# Users of tests/data/directory.ldif: uid -> (password, groups).
USERS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "alice": ("alice-pw", ("admins", "sales")),
    "bob": ("bob-pw", ("support",)),
    "carol": ("carol-pw", ()),
    "dee(ops)*,x": ("dee-pw", ("support",)),
}
AMBIGUOUS_USER = "twin"  # two entries carry uid=twin: never a valid login

_SLAPD_CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
pidfile {dir}/slapd.pid
sizelimit {size_limit}
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 104857600
suffix "{suffix}"
rootdn "{rootdn}"
rootpw {rootpw}
directory {dir}/db
index objectClass,uid,member eq
access to attrs=userPassword by self write by anonymous auth by * none
access to * by * read
"""


@dataclass
class SlapdServer:
    """A slapd on 127.0.0.1 with the test directory loaded; ``stop()``/``start()`` keep the data."""

    workdir: Path
    ldif: Path = DIRECTORY_LDIF
    port: int = field(default_factory=free_port)
    suffix: str = SUFFIX
    user_base: str = PEOPLE
    group_base: str = GROUPS
    bind_dn: str = f"cn=reader,{SUFFIX}"
    bind_password: str = "reader-pw"
    admin_dn: str = f"cn=admin,{SUFFIX}"
    admin_password: str = "admin-pw"
    users: Mapping[str, tuple[str, tuple[str, ...]]] = field(default_factory=lambda: dict(USERS))
    tls: bool = False  # also serve ldaps:// (and StartTLS) with a certificate from a test CA
    size_limit: int = 500  # slapd's default answer size limit
    ldaps_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def ca_file(self) -> Path:
        """PEM of the CA that signed the server certificate (with ``tls=True``)."""
        return self.workdir / "tls" / "ca.pem"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def password(self, user: str) -> str:
        """The current password of a test user."""
        return self.users[user][0]

    def groups(self, user: str) -> tuple[str, ...]:
        """The groups a test user belongs to, sorted."""
        return self.users[user][1]

    def user_dn(self, user: str) -> str:
        """The DN of a test user (RFC 4514 escaped)."""
        from ldap3.utils.dn import escape_rdn

        return f"uid={escape_rdn(user)},{self.user_base}"

    def setup(self) -> SlapdServer:
        """Write the config and load the LDIF into a fresh mdb database (before the first start)."""
        slapadd = require_binary("slapadd")
        (self.workdir / "db").mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "slapd.conf"
        text = _SLAPD_CONF.format(dir=self.workdir, suffix=self.suffix, rootdn=self.admin_dn,
                                  rootpw=self.admin_password, size_limit=self.size_limit)
        if self.tls:
            cert, key = write_test_ca_and_cert(self.workdir / "tls")
            # Global TLS directives must come before the database section.
            text = (f"TLSCACertificateFile {self.ca_file}\nTLSCertificateFile {cert}\n"
                    f"TLSCertificateKeyFile {key}\n") + text
        conf.write_text(text)
        subprocess.run([slapadd, "-q", "-f", str(conf), "-l", str(self.ldif)], check=True,
                       capture_output=True)
        return self

    def start(self) -> None:
        """Start slapd in the foreground (``-d 0``) so the child pid is slapd itself."""
        slapd = require_binary("slapd")
        urls = f"{self.url}/" + (f" {self.ldaps_url}/" if self.tls else "")
        self.proc = spawn([slapd, "-d", "0", "-f", str(self.workdir / "slapd.conf"), "-h", urls],
                          env={}, log=self.workdir / "slapd.log")
        wait_for_port(self.port, self.proc)
        if self.tls:
            wait_for_port(self.ldaps_port, self.proc)

    def stop(self) -> None:
        """Stop slapd by pid with SIGTERM (about 20 ms); the data stays for the next start."""
        if self.proc is not None:
            stop(self.proc, signal.SIGTERM)
            self.proc = None

    def set_password(self, user: str, new_password: str) -> None:
        """Replace a user's password as the rootdn (what an admin's ldapmodify does)."""
        import ldap3

        conn = ldap3.Connection(ldap3.Server(self.url), self.admin_dn, self.admin_password,
                                auto_bind=True)
        try:
            ok = conn.modify(self.user_dn(user),
                             {"userPassword": [(ldap3.MODIFY_REPLACE, [new_password])]})
            if not ok:
                raise RuntimeError(f"password change failed: {conn.result}")
        finally:
            conn.unbind()
        old = dict(self.users)
        old[user] = (new_password, old[user][1])
        self.users = old

    def settings(self, **overrides: Any) -> LdapSettings:
        """``LdapSettings`` pointing at this server (the reader's password goes separately)."""
        values: dict[str, Any] = {
            "enabled": True, "url": self.url, "bind_dn": self.bind_dn,
            "user_base": self.user_base, "group_base": self.group_base, "timeout": 2.0,
        }
        values.update(overrides)
        return LdapSettings(**values)

    def toml(self, **overrides: Any) -> str:
        """An ``[auth.ldap]`` table for a tenant.toml pointing at this server."""
        values: dict[str, Any] = {
            "enabled": True, "url": self.url, "bind_dn": self.bind_dn,
            "bind_password_env": "MTP_LDAP_PASSWORD", "user_base": self.user_base,
            "group_base": self.group_base, "timeout": 2.0,
        }
        values.update(overrides)
        lines = ["[auth.ldap]"]
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, str):
                lines.append(f'{key} = "{value}"')
            else:
                lines.append(f"{key} = {value}")
        return "\n".join(lines) + "\n"


def write_test_ca_and_cert(directory: Path, name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A throwaway CA (``ca.pem``) and a server cert/key for 127.0.0.1 and localhost."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mtp test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca.public_bytes(pem))
    (directory / "server.pem").write_bytes(cert.public_bytes(pem))
    (directory / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return directory / "server.pem", directory / "server.key"


@dataclass
class RedisServer:
    """A redis-server on 127.0.0.1; ``stop()``/``start()`` reuse the port (and, with
    ``persist``, the append-only file, fsynced on every write, as production runs it)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    persist: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Start redis-server in the foreground on this port."""
        binary = require_binary("redis-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn([binary, "--port", str(self.port), "--bind", "127.0.0.1",
                           "--save", "", "--appendonly", "yes" if self.persist else "no",
                           "--appendfsync", "always", "--dir", str(self.workdir)],
                          env={}, log=self.workdir / "redis.log")
        wait_for_port(self.port, self.proc)

    def stop(self) -> None:
        """Stop redis-server by pid with SIGTERM."""
        if self.proc is not None:
            stop(self.proc, signal.SIGTERM)
            self.proc = None


@pytest.fixture(scope="module")
def slapd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlapdServer]:
    """A running slapd with tests/data/directory.ldif, one per test module."""
    server = SlapdServer(tmp_path_factory.mktemp("slapd")).setup()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A running redis-server, one per test module."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
