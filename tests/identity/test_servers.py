"""The shared server fixtures themselves: real processes, stoppable and restartable in place."""

from __future__ import annotations

import os

import ldap3
import pytest
import redis

from tests.servers import RedisServer, SlapdServer


def test_redis_server_stops_and_starts_on_the_same_port(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    assert client.ping()
    pid, port = redis_server.pid, redis_server.port
    redis_server.stop()
    assert redis_server.pid is None
    with pytest.raises(redis.ConnectionError):
        client.ping()
    redis_server.start()
    assert redis_server.port == port and redis_server.pid not in (None, pid)
    assert redis.Redis.from_url(redis_server.url, socket_timeout=2).ping()


def test_slapd_server_serves_the_directory(slapd_server: SlapdServer) -> None:
    pid = slapd_server.pid
    assert pid is not None
    os.kill(pid, 0)  # the pid is slapd itself (foreground), so stop() signals the right process
    conn = ldap3.Connection(ldap3.Server(slapd_server.url), slapd_server.bind_dn,
                            slapd_server.bind_password, auto_bind=True)
    conn.search(slapd_server.group_base, "(objectClass=groupOfNames)", attributes=["cn"])
    assert sorted(str(e.cn) for e in conn.entries) == ["admins", "sales", "support"]
    conn.unbind()
    slapd_server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    slapd_server.start()
    assert ldap3.Connection(ldap3.Server(slapd_server.url), slapd_server.bind_dn,
                            slapd_server.bind_password, auto_bind=True).bound


def test_toml_block_is_a_valid_ldap_table(slapd_server: SlapdServer) -> None:
    import tomllib

    from framework.tenant_config import parse_tenant

    raw = tomllib.loads('[tenant]\nid = "acme"\n' + slapd_server.toml(cache_ttl=5, start_tls=False))
    ldap = parse_tenant(raw).ldap
    assert ldap.enabled and ldap.url == slapd_server.url and ldap.cache_ttl == 5
