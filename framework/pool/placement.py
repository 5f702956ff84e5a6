"""Which tenants a pool serves when the fleet's registry is in its store.

A pool named NAME serves tenant T when T's record places it here (``pool:NAME``), or
while T is migrating away from here (the record's migration names this pool as its
source): the gateway still routes T here until the target is ready, then the calls
in flight drain. Once the migration is cleared the pool stops serving T (403
``unknown-tenant``) and its idle process goes with the next sweep.

Without a registry in the store (no fleet) every bundle present is served, as before.
Suspended and offboarding tenants stay placed: their own sidecar state answers them
403 ``tenant-suspended`` (sidecar/fleet.py), as a dedicated stack does.
"""

from __future__ import annotations

from framework.control.registry_view import RegistryView


def serves(pool: str, placement: str, migrating_from: str) -> bool:
    """The decision for one tenant: placed here, or draining away from here."""
    here = f"pool:{pool}"
    return placement == here or migrating_from == here


class RegistryPlacement:
    """The :class:`~framework.pool.bundles.Placement` of a pool in a fleet."""

    def __init__(self, pool: str, view: RegistryView) -> None:
        self.pool, self.view = pool, view

    def placed_here(self, tenant_id: str) -> bool:
        if not self.view.fleet:
            return True  # no registry: every bundle present
        entry = self.view.placements.get(tenant_id)
        return entry is not None and serves(self.pool, *entry)
