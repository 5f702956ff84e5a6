"""Pools: one sidecar and the worker processes of many tenants (`mtp pool`).

- bundles.py: the bundle directory, tenant configs loaded lazily, the placement hook;
- placement.py: in a fleet, the registry's placement decides which tenants are served;
- keys.py: per-tenant signing keys derived from the pool secret, per-tenant secrets;
- zygote.py: the warm parent that forks a tenant's framework process;
- procs.py: starting, idle reaping and LRU stopping of tenant processes;
- wake.py: stopped tenants with event deliveries to make, started again when due;
- gateway.py: the gateway's routing table rendered as an nginx config.

The sidecar side (identifying the tenant of a request) is sidecar/tenant_routing.py.
"""
