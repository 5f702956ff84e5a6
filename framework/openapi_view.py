"""``GET /openapi.json``: the OpenAPI document of the services the caller may invoke."""

from __future__ import annotations

from flask import Flask, Response, g

from framework.controller import invokable, json_response
from framework.openapi import Offered, document
from framework.runtime import Runtime


def install(app: Flask, rt: Runtime) -> None:
    """Attach the route to ``app``."""

    @app.get("/openapi.json")
    def openapi_json() -> Response:
        specs = {spec.name: spec for spec in rt.registry.available()}
        # The same filter as GET /services, so the document and the list always agree
        # and neither offers a call the sidecar would refuse.
        listed = invokable(list(specs.values()), rt.tenant.authz, g.identity)
        offered = [Offered(specs[entry["name"]], tuple(entry["operations"]))
                   for entry in listed]
        return json_response(document(rt.tenant, offered))
