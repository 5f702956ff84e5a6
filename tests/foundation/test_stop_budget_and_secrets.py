"""The stop budget's nesting, the secrets hand-over pipe, each child's environment and
the health probe, without a whole `mtp run` (tests/e2e/test_run_supervision.py has that)."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from framework.cli.run import ChildSpec, Supervisor, answers_health, child_specs, split_env
from framework.grace import MIN_GRACE_SECONDS, stop_budget
from framework.settings import SECRETS_FD_ENV, Settings
from framework.tenant_config import ConfigError, TenantConfig, load_tenant


@pytest.mark.parametrize("grace", [MIN_GRACE_SECONDS, 8, 25, 120])
def test_each_layer_ends_inside_the_one_above(grace: int) -> None:
    b = stop_budget(grace)
    assert b.total == grace
    assert 0 < b.sidecar < b.sidecar + 1 < b.framework < b.kill_after < b.total


def test_a_grace_too_short_to_nest_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"MTP_GRACE_SECONDS": "3"}, tenant_dir=tmp_path)
    assert err.value.key == "MTP_GRACE_SECONDS"
    assert stop_budget(3).total == MIN_GRACE_SECONDS  # and the budget never goes below it


def test_health_settings_from_the_environment(tmp_path: Path) -> None:
    s = Settings.from_env({"MTP_HEALTH_INTERVAL": "2", "MTP_HEALTH_MISSES": "4",
                           "MTP_GRACE_SECONDS": "40"}, tenant_dir=tmp_path)
    assert (s.health_interval, s.health_misses, s.grace_seconds) == (2, 4, 40)
    d = Settings.from_env({}, tenant_dir=tmp_path)
    assert (d.health_interval, d.health_misses, d.grace_seconds) == (5, 3, 25)
    with pytest.raises(ConfigError) as err:
        Settings.from_env({"MTP_HEALTH_INTERVAL": "0"}, tenant_dir=tmp_path)
    assert err.value.key == "MTP_HEALTH_INTERVAL"


def _pipe(payload: bytes) -> int:
    read, write = os.pipe()
    os.write(write, payload)
    os.close(write)
    return read


def test_handed_secrets_join_settings_but_not_os_environ(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fd = _pipe(json.dumps({"MTP_SIDECAR_SECRET": "s" * 32, "MTP_BILLING_SECRET": "b"}).encode())
    monkeypatch.setenv(SECRETS_FD_ENV, str(fd))
    monkeypatch.delenv("MTP_SIDECAR_SECRET", raising=False)
    s = Settings.from_env(tenant_dir=tmp_path)
    assert s.require_sidecar_secret() == b"s" * 32
    assert s.secret("MTP_BILLING_SECRET") == "b"
    assert SECRETS_FD_ENV not in os.environ and "MTP_BILLING_SECRET" not in os.environ
    with pytest.raises(OSError):
        os.fstat(fd)  # read once, then closed: nothing later can read it again
    assert Settings.from_env(tenant_dir=tmp_path).sidecar_secret == b""  # and no error


@pytest.mark.parametrize("raw", [b"not json", b'["a list"]', b'{"K": 1}'])
def test_a_bad_hand_over_is_refused_by_name(tmp_path: Path, raw: bytes) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({SECRETS_FD_ENV: str(_pipe(raw))}, tenant_dir=tmp_path)
    assert err.value.key == SECRETS_FD_ENV


def test_a_missing_fd_is_refused_by_name(tmp_path: Path) -> None:
    read, write = os.pipe()
    os.close(read)
    os.close(write)
    for raw in (str(read), "seven"):
        with pytest.raises(ConfigError) as err:
            Settings.from_env({SECRETS_FD_ENV: raw}, tenant_dir=tmp_path)
        assert err.value.key == SECRETS_FD_ENV


def _tenant(tmp_path: Path) -> TenantConfig:
    (tmp_path / "tenant.toml").write_text("""
[tenant]
id = "acme"
framework_version = "0.1.0"

[auth.jwt]
algorithms = ["HS256"]
secret_env = "ACME_JWT"

[auth.ldap]
url = "ldap://127.0.0.1:1"
bind_dn = "cn=reader,dc=example,dc=org"
bind_password_env = "ACME_LDAP"
user_base = "ou=people,dc=example,dc=org"

[billing]
webhook_url = "http://127.0.0.1:1/usage"
webhook_secret_env = "ACME_BILLING"
""")
    return load_tenant(tmp_path / "tenant.toml")


def test_each_child_gets_only_the_secrets_it_uses(tmp_path: Path) -> None:
    env = {"PATH": "/bin", "MTP_TENANT_DIR": "/t", "ACME_JWT": "j", "MTP_JWT_SECRET": "j0",
           "ACME_LDAP": "l", "ACME_BILLING": "b", "MTP_SIDECAR_SECRET": "s",
           "MTP_OPERATOR_JWT_SECRET": "o"}
    envs, handed = split_env(env, _tenant(tmp_path), ["framework", "worker", "sidecar"])
    secrets = {"ACME_JWT", "MTP_JWT_SECRET", "ACME_LDAP", "ACME_BILLING",
               "MTP_SIDECAR_SECRET", "MTP_OPERATOR_JWT_SECRET"}
    for tenant_code in ("framework", "worker"):
        assert envs[tenant_code] == {"PATH": "/bin", "MTP_TENANT_DIR": "/t"}
        assert not secrets & set(envs[tenant_code])
    assert handed == {"framework": {"MTP_SIDECAR_SECRET": "s", "ACME_BILLING": "b"},
                      "worker": {"ACME_BILLING": "b"}}
    assert envs["sidecar"] == {k: v for k, v in env.items() if k != "ACME_BILLING"}


def test_the_children_and_where_each_answers_its_health_check(tmp_path: Path) -> None:
    s = Settings.from_env({"MTP_LISTEN": "127.0.0.1:9000", "MTP_UPSTREAM": "unix:/x.sock",
                           "MTP_REDIS_URL": "redis://r"}, tenant_dir=tmp_path)
    assert [(c.name, c.health) for c in child_specs(s)] == [
        ("framework", "/x.sock"), ("worker", None), ("sidecar", ("127.0.0.1", 9000))]


def _server(answer: bytes | None) -> Iterator[tuple[str, int]]:
    """A listener that answers every connection with ``answer`` (None: never answers)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    done = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            conn.recv(1024)
            if answer == b"":
                conn.close()  # hangs up without a word
                continue
            if answer is None:
                held.append(conn)  # read the request, say nothing: a hung process
                continue
            conn.sendall(answer)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield sock.getsockname()
    finally:
        done.set()
        sock.close()
        for conn in held:
            conn.close()


@pytest.fixture
def ok() -> Iterator[tuple[str, int]]:
    yield from _server(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
def failing() -> Iterator[tuple[str, int]]:
    yield from _server(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
def silent() -> Iterator[tuple[str, int]]:
    yield from _server(None)


@pytest.fixture
def hanging_up() -> Iterator[tuple[str, int]]:
    yield from _server(b"")


def test_the_probe_wants_a_200_in_time(ok, failing, silent, hanging_up) -> None:
    assert answers_health(ok, 2.0)
    assert not answers_health(failing, 2.0)
    assert not answers_health(hanging_up, 2.0)
    assert not answers_health(silent, 0.3)  # accepted, never answered: a stopped process
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    assert not answers_health(("0.0.0.0", port), 0.3)  # nothing listening


def test_secrets_too_big_for_the_pipe_are_refused_before_anything_starts() -> None:
    spec = ChildSpec("framework", ("framework",))
    sup = Supervisor([spec], {"framework": {}}, {"framework": {"BIG": "x" * 70000}})
    with pytest.raises(ConfigError) as err:
        sup.start()
    assert err.value.key == SECRETS_FD_ENV and sup.procs == {}


ADOPTER = r'''
import os, subprocess, sys, time
from framework.cli.run import become_subreaper, reap_adopted, reap_orphans
assert become_subreaper()
# Our child starts a grandchild and exits: the grandchild is now ours to reap.
orphan = int(subprocess.run([sys.executable, "-c",
    "import subprocess, sys; p = subprocess.Popen(['sleep', '0.3']); print(p.pid)"],
    capture_output=True, text=True, check=True).stdout)
ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1); raise SystemExit(7)"])
def zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return False
for _ in range(100):
    reap_adopted({ours.pid})
    if not os.path.exists(f"/proc/{orphan}"):
        break
    time.sleep(0.05)
gone = not os.path.exists(f"/proc/{orphan}")
while not zombie(ours.pid):
    time.sleep(0.05)
reap_adopted({ours.pid})  # ours has exited: left for Popen to reap
print(gone, ours.wait(5))
reap_adopted(set())  # no child left at all: nothing to do
reap_orphans(time.monotonic() + 1)
'''


def test_mtp_run_reaps_adopted_orphans_and_leaves_its_children_to_popen() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ADOPTER], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "7"]  # the orphan reaped, our child's code kept
