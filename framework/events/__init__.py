"""Tenant-aware events (DESIGN.md "Events: tenant-aware routing").

``config`` (``[events]`` of tenant.toml), ``binding`` (the CloudEvents 1.0 HTTP binding),
``store`` (the embedded engine in MTP_DATA_DIR), ``dispatch`` (delivery with retries,
backoff, dead letters and per-subject order), ``views`` (``POST /events`` and the dead
letter routes) and ``install`` (wiring into a framework worker, ``context.emit``).
"""
