"""Stage 2: a credential is good only for the tenant this image serves."""

from __future__ import annotations

from sidecar.errors import Forbidden
from sidecar.principal import Principal


def bind_tenant(principal: Principal, tenant_id: str) -> None:
    """Refuse (403) a principal whose credential names another tenant."""
    if principal.tenant != tenant_id:
        raise Forbidden("credential issued for another tenant")
