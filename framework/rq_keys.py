"""Where RQ keeps a tenant's keys: under ``mtp:<tenant>:rq``, not RQ's global ``rq:``.

RQ reads its key prefix from ``RQ_KEY_PREFIX`` once, when it is imported. With the
tenant's prefix every RQ key of a data plane (queue, registries, job hashes,
results, worker keys and Pub/Sub channels) is one of ``mtp:<tenant>:*``, the only
keys the tenant's Redis ACL user may touch (framework/control/acl.py); a data plane
can then run as that user, and RQ's shared sets (``rq:queues``, ``rq:workers``)
no longer list every tenant. Each command that may import RQ for a tenant
(``mtp run``'s children, ``mtp framework``, ``mtp worker``, ``mtp probe worker``)
calls :func:`use_tenant_prefix` after reading the tenant's id and before RQ is
imported.
"""

from __future__ import annotations

import os
import sys

ENV = "RQ_KEY_PREFIX"


def prefix(tenant_id: str) -> str:
    """The RQ key prefix of one tenant."""
    return f"mtp:{tenant_id}:rq"


def use_tenant_prefix(tenant_id: str) -> None:
    """Make RQ, imported after this in this process, keep its keys under the tenant's prefix.

    An RQ already imported with another prefix would use keys the tenant's ACL user
    may not touch, and its jobs would be invisible to the tenant's other processes:
    refused here (a top-level ``import rq`` before the tenant is known).
    """
    want = prefix(tenant_id)
    os.environ[ENV] = want  # the one place a process sets it: RQ reads it at import
    loaded = sys.modules.get("rq.defaults")
    if loaded is not None and getattr(loaded, "RQ_KEY_PREFIX", want) != want:
        raise RuntimeError(f"RQ was imported with key prefix {loaded.RQ_KEY_PREFIX!r} before "
                           f"the tenant's ({want!r}) was set")
