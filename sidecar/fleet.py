"""The sidecar's side of a fleet: the registry decides who is served, and on which plan.

With a registry in the store (framework/control/registry_view.py), a tenant that
is not registered is 403 ``unknown-tenant``, a suspended or offboarding one 403
``tenant-suspended``; a service outside the plan's entitlement globs is 403
``not-entitled``; each limit is the lower of the plan's and tenant.toml's, and
past the daily quota the plan's ``degraded_rate`` slows rather than refuses; a plan's
``daily_cpu_seconds`` used up counts as a used-up daily quota. Every
check reads the local copy of the registry: no store round trip per request.
Without a registry nothing here changes an answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

from framework.control.plans import Plan
from framework.control.registry_view import RegistryView, open_view
from framework.control.tenant_data import midnight
from framework.settings import Settings
from framework.tenant_config import BillingSettings, LimitSettings
from sidecar.errors import Forbidden

log = logging.getLogger("mtp.sidecar.fleet")

CPU_POLL = 2.0  # seconds between readings of today's CPU (a plan's daily_cpu_seconds)
DEDICATED = "dedicated"  # the placement of a tenant's own stack
CPU_FORGET = 600.0  # a tenant without a request for this long is no longer read

# Limits where 0 means "no limit": the lower of two is the lower non-zero one.
ZERO_IS_NONE = frozenset(("user_rate", "user_burst", "concurrency", "daily_quota"))
PLAN_ONLY = frozenset(("degraded_rate",))  # not a tenant.toml key: the plan's value applies
# name -> type (annotations are strings here: "float" or "int")
LIMIT_FIELDS = {f.name: float if str(f.type) == "float" else int
                for f in fields(LimitSettings) if f.name != "delay"}


class UnknownTenant(Forbidden):
    """403: a tenant the fleet does not register, or one this sidecar (a pool) does not
    serve: no tenant named, a bundle it does not hold, a placement elsewhere."""

    kind = "unknown-tenant"
    detail = "this tenant is not registered or not served here"


class TenantSuspended(Forbidden):
    kind = "tenant-suspended"
    detail = "this tenant is suspended"


class NotEntitled(Forbidden):
    kind = "not-entitled"
    detail = "the tenant's plan does not include this service"


def lower(name: str, mine: float, plans: float | None) -> float:
    """The effective value of one limit."""
    if plans is None:
        return mine
    if name in ZERO_IS_NONE and (not mine or not plans):
        return mine or plans
    return min(mine, plans)


def effective_limits(own: LimitSettings, plan: Plan) -> LimitSettings:
    """Each limit the lower of tenant.toml's and the plan's."""
    changes = {}
    for name, kind in LIMIT_FIELDS.items():
        if name in PLAN_ONLY:
            changes[name] = kind(plan.limits.get(name, getattr(own, name)))
        else:
            changes[name] = kind(lower(name, getattr(own, name), plan.limits.get(name)))
    return replace(own, **changes)


class CpuWatch:
    """Today's handler CPU seconds of the tenants served lately, for a plan's
    ``daily_cpu_seconds``.

    One thread reads the usage store every :data:`CPU_POLL` s, only for tenants asked
    about in the last :data:`CPU_FORGET` s whose plan caps CPU: a pool with 10,000
    registered tenants reads the few that are active, a tenant image its one tenant.
    """

    def __init__(self, view: RegistryView, open_usage: Callable[[str], Any]) -> None:
        self.view, self.open_usage = view, open_usage  # tenant id -> its usage store
        self.used: dict[str, float] = {}
        self._asked: dict[str, float] = {}  # tenant -> time.monotonic() of the last ask
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mtp-fleet-cpu", daemon=True)

    def start(self) -> CpuWatch:
        self._thread.start()
        return self

    def over(self, tenant_id: str, plan: Plan) -> bool:
        """True when the plan caps CPU per day and the tenant's today is used up."""
        cap = plan.limits.get("daily_cpu_seconds") or 0
        if not cap:
            return False
        self._asked[tenant_id] = time.monotonic()
        return self.used.get(tenant_id, 0.0) >= cap

    def read(self, stores: dict[str, Any]) -> None:
        """One round: today's CPU of each tenant asked about lately (``stores``: the
        usage stores opened so far, kept between rounds, dropped with their tenant)."""
        now = time.monotonic()
        for tenant_id, asked in list(self._asked.items()):
            plan = self.view.plan_of(tenant_id)
            if now - asked > CPU_FORGET or plan is None \
                    or not plan.limits.get("daily_cpu_seconds"):
                self._forget(tenant_id, stores)
                continue
            try:
                store = stores.get(tenant_id) or stores.setdefault(
                    tenant_id, self.open_usage(tenant_id))
                rows = store.query(tenant_id, BillingSettings(), start=midnight(),
                                   group_by=())
                self.used[tenant_id] = sum(float(r["cpu_seconds"]) for r in rows)
            except Exception as exc:  # keep the last reading, try again
                log.debug("CPU usage of %s not read (%s)", tenant_id, type(exc).__name__)

    def _forget(self, tenant_id: str, stores: dict[str, Any]) -> None:
        self._asked.pop(tenant_id, None)
        self.used.pop(tenant_id, None)
        stores.pop(tenant_id, None)  # SQLite opens per query; a Redis pool closes with it

    def _run(self) -> None:
        stores: dict[str, Any] = {}
        while not self._stop.wait(CPU_POLL):
            self.read(stores)
        for tenant_id in list(stores):
            self._forget(tenant_id, stores)

    def close(self) -> None:
        self._stop.set()


class FleetGate:
    """Registry checks for one sidecar; :meth:`admit` runs after the tenant is bound."""

    def __init__(self, view: RegistryView, cpu: CpuWatch | None = None,
                 dedicated: bool = False) -> None:
        self.view = view
        self.cpu = cpu
        self.dedicated = dedicated  # a tenant's own stack (a pool places by its bundles)
        self._limits: dict[tuple[LimitSettings, int, str, bool], LimitSettings] = {}

    def admit(self, tenant_id: str) -> None:
        """Refuse (403) a tenant the registry does not serve."""
        refusal = self.view.refusal(tenant_id)
        if refusal == "unknown-tenant":
            raise UnknownTenant(f"tenant {tenant_id} not in the fleet registry")
        if refusal is not None:
            raise TenantSuspended(f"tenant {tenant_id} is suspended or offboarding")
        if self.dedicated and self.placed_elsewhere(tenant_id):
            raise UnknownTenant(f"tenant {tenant_id} is placed in a pool, not here")

    def placed_elsewhere(self, tenant_id: str) -> bool:
        """Whether the operator placed the tenant in a pool (a migration away from its
        dedicated stack is over): that stack then stops serving it.

        A placement that is only its plan's default (``pool:<isolation>``: nobody chose
        one) keeps a dedicated stack serving, as does a migration into or out of it.
        """
        placement, source = self.view.placements.get(tenant_id, ("", ""))
        if not placement or DEDICATED in (placement, source):
            return False
        plan = self.view.plan_of(tenant_id)
        return plan is not None and placement != plan.default_placement

    def entitle(self, tenant_id: str, service: str) -> None:
        """Refuse (403) a service the tenant's plan does not include."""
        plan = self.view.plan_of(tenant_id)
        if plan is not None and not plan.entitled(service):
            raise NotEntitled(f"plan {plan.name} does not include service {service}")

    def limits(self, tenant_id: str, own: LimitSettings) -> LimitSettings:
        """The limits in force: tenant.toml's lowered by the plan's (cached per version)."""
        plan = self.view.plan_of(tenant_id)
        if plan is None:
            return own
        over = self.cpu is not None and self.cpu.over(tenant_id, plan)
        key = (own, self.view.plans_version, plan.name, over)
        found = self._limits.get(key)
        if found is None:
            if len(self._limits) > 64:  # old versions and overlays: drop, rebuild on demand
                self._limits.clear()
            found = effective_limits(own, plan)
            if over:
                # Today's CPU is used up: a used-up daily quota (degraded or 429 till midnight).
                found = replace(found, daily_quota=1)
            self._limits[key] = found
        return found

    def close(self) -> None:
        if self.cpu is not None:
            self.cpu.close()
        self.view.close()


def start_fleet(settings: Settings, tenant_id: str) -> FleetGate:
    """The gate over this sidecar's store (a no-op until the store holds a registry)."""
    from framework.usage_redis import open_store

    view = open_view(settings.redis_url, settings.data_dir, tenant_id)  # one tenant's record
    return FleetGate(view, CpuWatch(view, lambda _tenant: open_store(settings)).start(),
                     dedicated=True)
