"""`mtp control` (the fleet's admin API) and `mtp tenants ...` (that API from a shell).

Output is a table for people and JSON with ``--json`` for scripts. Credentials:
``--token`` (or MTP_CONTROL_TOKEN), ``--api-key`` (or MTP_CONTROL_API_KEY), else a
short-lived platform-admin token minted from MTP_OPERATOR_JWT_SECRET when this
shell holds it (the operator's own machine).
"""

from __future__ import annotations

import getpass
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import click

from framework.control.config import DEFAULT_URL

TIMEOUT = 30.0
NEWLINE = b"\n"
COLUMNS = ("id", "name", "plan", "status", "placement", "updated")


@click.command()
def control() -> None:
    """Serve the fleet's admin API on MTP_CONTROL_LISTEN (default 127.0.0.1:8090)."""
    from framework.control.config import ControlConfig
    from framework.control.server import serve

    serve(ControlConfig.from_env())


class Client:
    """The admin API over HTTP; a problem+json answer becomes one clear ClickException."""

    def __init__(self, url: str, token: str, api_key: str) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Accept": "application/json"}
        if api_key:
            self.headers["X-API-Key"] = api_key
        else:
            self.headers["Authorization"] = f"Bearer {token or _minted_token()}"

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> tuple[int, bytes]:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        data = json.dumps(body).encode() if body is not None else None
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:  # noqa: S310
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            raise click.ClickException(_problem_text(exc.code, exc.read())) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise click.ClickException(
                f"cannot reach the control plane at {self.url}: {reason}") from None

    def json(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, str] | None = None) -> Any:
        return json.loads(self.call(method, path, body, query)[1])


def _problem_text(status: int, raw: bytes) -> str:
    try:
        doc = json.loads(raw)
        detail = doc.get("detail") or doc.get("title") or ""
        kind = str(doc.get("type", "")).rsplit(":", 1)[-1]
    except (ValueError, AttributeError):
        detail, kind = raw[:200].decode(errors="replace"), ""
    return f"{detail} ({status}{' ' + kind if kind else ''})"


def _minted_token() -> str:
    secret = os.environ.get("MTP_OPERATOR_JWT_SECRET", "")
    if not secret:
        raise click.UsageError("no operator credential: pass --token or --api-key "
                               "(or set MTP_CONTROL_TOKEN, MTP_CONTROL_API_KEY)")
    import jwt

    now = int(time.time())
    return jwt.encode({"sub": f"cli:{getpass.getuser()}", "roles": ["platform-admin"],
                       "iat": now, "exp": now + 300}, secret, algorithm="HS256")


def _common(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--control, credentials and --json on every subcommand."""
    fn = click.option("--json", "as_json", is_flag=True, help="JSON for scripts.")(fn)
    fn = click.option("--api-key", envvar="MTP_CONTROL_API_KEY", default="",
                      help="Operator API key (or MTP_CONTROL_API_KEY).")(fn)
    fn = click.option("--token", envvar="MTP_CONTROL_TOKEN", default="",
                      help="Operator JWT (or MTP_CONTROL_TOKEN).")(fn)
    return click.option("--control", "control_url", envvar="MTP_CONTROL_URL",
                        default=DEFAULT_URL, show_default=True,
                        help="The control plane (or MTP_CONTROL_URL).")(fn)


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...] = COLUMNS) -> str:
    cells = [[str(r.get(c, "") if r.get(c) is not None else "") for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _record_text(rec: dict[str, Any]) -> str:
    lines = [f"{k}: {rec[k]}" for k in (*COLUMNS[:-1], "created", "updated") if k in rec]
    move = rec.get("migration")
    if move:
        # A placement change in progress (docs/fleet.md, "Moving a tenant").
        line = f"migration: {move['from']} -> {move['to']}, {move['state']} since {move['since']}"
        if move.get("attempts"):
            line += f" ({move['attempts']} attempts; last error: {move.get('last_error', '')})"
        lines.append(line)
    usage = rec.get("usage")
    if usage:
        lines.append(f"usage today: {usage['calls']} calls, {usage['cost']} {usage['currency']}")
    return "\n".join(lines)


def _out(doc: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    click.echo(json.dumps(doc, indent=2) if as_json else text(doc))


def _path(tenant_id: str) -> str:
    return "/admin/tenants/" + urllib.parse.quote(tenant_id, safe="")


@click.group()
def tenants() -> None:
    """Create, list, show, update, suspend, resume, delete and export fleet tenants."""


@tenants.command()
@click.argument("tenant_id")
@click.option("--name", required=True, help="Display name.")
@click.option("--plan", required=True, help="A plan of the plans file.")
@click.option("--placement", default="", help='"dedicated" or "pool:<name>" (default: the plan).')
@_common
def create(tenant_id: str, name: str, plan: str, placement: str, control_url: str,
           token: str, api_key: str, as_json: bool) -> None:
    """Onboard a tenant."""
    body = {"id": tenant_id, "name": name, "plan": plan}
    if placement:
        body["placement"] = placement
    rec = Client(control_url, token, api_key).json("POST", "/admin/tenants", body)
    _out(rec, as_json, _record_text)


@tenants.command(name="list")
@click.option("--plan", default="", help="Only this plan.")
@click.option("--status", default="", help="Only this status (active, suspended, offboarding).")
@click.option("--placement", default="", help="Only this placement.")
@click.option("--limit", default=50, show_default=True, help="Tenants per page.")
@click.option("--cursor", default="", help="Continue after a page (next_cursor).")
@click.option("--all", "every", is_flag=True, help="Follow the cursor to the end.")
@_common
def list_(plan: str, status: str, placement: str, limit: int, cursor: str, every: bool,
          control_url: str, token: str, api_key: str, as_json: bool) -> None:
    """List tenants (one page, or --all)."""
    client = Client(control_url, token, api_key)
    found: list[dict[str, Any]] = []
    while True:
        page = client.json("GET", "/admin/tenants", query={
            "plan": plan, "status": status, "placement": placement, "limit": str(limit),
            "cursor": cursor})
        found.extend(page["tenants"])
        cursor = page.get("next_cursor") or ""
        if not every or not cursor:
            break
    doc = {"tenants": found, "next_cursor": cursor or None}
    _out(doc, as_json, lambda d: _table(d["tenants"]) + (
        f"\n(more: --cursor {d['next_cursor']})" if d["next_cursor"] else ""))


@tenants.command()
@click.argument("tenant_id")
@_common
def show(tenant_id: str, control_url: str, token: str, api_key: str, as_json: bool) -> None:
    """Show a tenant with today's calls and cost."""
    _out(Client(control_url, token, api_key).json("GET", _path(tenant_id)), as_json,
         _record_text)


def _patch(tenant_id: str, changes: dict[str, str], control_url: str, token: str,
           api_key: str, as_json: bool) -> None:
    rec = Client(control_url, token, api_key).json("PATCH", _path(tenant_id), changes)
    _out(rec, as_json, _record_text)


@tenants.command()
@click.argument("tenant_id")
@click.option("--plan", default=None, help="Move to another plan.")
@click.option("--name", default=None, help="New display name.")
@click.option("--placement", default=None, help='"dedicated" or "pool:<name>".')
@click.option("--status", default=None, type=click.Choice(["active", "suspended"]))
@_common
def update(tenant_id: str, plan: str | None, name: str | None, placement: str | None,
           status: str | None, control_url: str, token: str, api_key: str,
           as_json: bool) -> None:
    """Change a tenant's plan, name, placement or status."""
    changes = {k: v for k, v in (("plan", plan), ("name", name), ("placement", placement),
                                 ("status", status)) if v is not None}
    if not changes:
        raise click.UsageError("nothing to change: give --plan, --name, --placement or --status")
    _patch(tenant_id, changes, control_url, token, api_key, as_json)


@tenants.command()
@click.argument("tenant_id")
@_common
def suspend(tenant_id: str, control_url: str, token: str, api_key: str, as_json: bool) -> None:
    """Suspend a tenant: every data plane refuses it (403 tenant-suspended)."""
    _patch(tenant_id, {"status": "suspended"}, control_url, token, api_key, as_json)


@tenants.command()
@click.argument("tenant_id")
@_common
def resume(tenant_id: str, control_url: str, token: str, api_key: str, as_json: bool) -> None:
    """Resume a suspended tenant."""
    _patch(tenant_id, {"status": "active"}, control_url, token, api_key, as_json)


@tenants.command()
@click.argument("tenant_id")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_common
def delete(tenant_id: str, yes: bool, control_url: str, token: str, api_key: str,
           as_json: bool) -> None:
    """Offboard a tenant: refused at once, exported, then purged from every store."""
    if not yes:
        click.confirm(f"Offboard {tenant_id} and purge all its data?", abort=True)
    rec = Client(control_url, token, api_key).json("DELETE", _path(tenant_id))
    _out(rec, as_json, lambda r: f"{r['id']}: offboarding (export kept, data being purged)")


@tenants.command()
@click.argument("tenant_id")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, writable=True),
              default=None, help="Write the JSON lines here (default stdout).")
@_common
def export(tenant_id: str, out_file: str | None, control_url: str, token: str, api_key: str,
           as_json: bool) -> None:
    """Print a tenant's export: JSON lines of usage rows, config versions and jobs."""
    _, body = Client(control_url, token, api_key).call("GET", _path(tenant_id) + "/export")
    if out_file:
        with open(out_file, "wb") as fh:
            fh.write(body)
        click.echo(f"{out_file}: {body.count(NEWLINE)} lines", err=True)
    else:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
