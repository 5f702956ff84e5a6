"""Shared fixtures for every test module (keep this file tiny)."""

import os

from framework.rq_keys import ENV, prefix
from tests.servers import redis_server, slapd_server  # noqa: F401 - fixtures, found by name

# RQ fixes its key prefix at import. The tests that drive RQ in this process (tests/redis)
# use tenant acme, whose `mtp worker`/`mtp run` children use acme's prefix
# (framework/rq_keys.py): this process must use the same keys.
os.environ[ENV] = prefix("acme")
