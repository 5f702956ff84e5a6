"""`mtp framework` with parts switched off, to see what each costs (bench only).

    python bench/framework_variant.py TENANT_DIR VARIANT[,VARIANT...]

Variants: ``noops`` (no metering/breaker/overlay layer), ``nowatch`` (sync calls
without the in-flight bookkeeping the deadline watchdog reads), ``nolog`` (no
request log line), ``nometrics`` (no Prometheus updates). Settings come from
MTP_* as for `mtp framework`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from framework.cli.serve import FrameworkServer, prepare
from framework.settings import Settings


class VariantServer(FrameworkServer):
    """Builds the normal app in each worker, then switches parts off."""

    variants: frozenset[str] = frozenset()

    def load(self):  # type: ignore[no-untyped-def]
        import framework.app as app_module
        import framework.hooks as hooks

        if "noops" in self.variants:
            app_module.install_operations = lambda app, rt: None
        app = super().load()
        rt = app.extensions["mtp"]
        if "nowatch" in self.variants:
            rt.executor.sync = lambda spec, ctx: rt.executor.call(spec, ctx)
        if "nolog" in self.variants:
            rt.log.setLevel("WARNING")
        if "nometrics" in self.variants:
            hooks.metrics.observe = lambda *a, **kw: None
        return app


def main() -> None:
    tenant_dir, variants = sys.argv[1], sys.argv[2]
    settings = Settings.from_env(tenant_dir=tenant_dir)
    prepare(settings)
    VariantServer.variants = frozenset(v for v in variants.split(",") if v)
    VariantServer(settings, settings.load_tenant()).run()


if __name__ == "__main__":
    main()
