"""``mtp events publish`` and ``mtp events dead``: through the sidecar, as any client."""

from __future__ import annotations

import json
import re
import sys
import urllib.error
import urllib.request
import uuid
from typing import Any

import click

URL = click.option("--url", envvar="MTP_URL", default="http://127.0.0.1:8080",
                   show_default=True, help="The sidecar's base URL (or MTP_URL).")
TOKEN = click.option("--token", envvar="MTP_TOKEN", default="",
                     help="Bearer token (or MTP_TOKEN); e.g. TOKEN=$(mtp token --user u).")


def _request(url: str, token: str, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None) -> Any:
    """The JSON answer; a problem answer is printed and exits 1."""
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter("must start with http:// or https://", param_hint="--url")
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url.rstrip("/") + path, data=body, headers=sent,  # noqa: S310
                                 method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:  # noqa: S310 - http(s) checked
            return json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        click.echo(f"mtp events: {exc.code} {detail}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"mtp events: cannot reach {url}: {exc}", err=True)
        sys.exit(1)


@click.group("events")
def events() -> None:
    """Publish events; list and replay dead letters (through the sidecar)."""


@events.command("publish")
@click.argument("event_type")
@click.option("--data", default=None, help="JSON data of the event.")
@click.option("--subject", default=None, help="The event's subject.")
@click.option("--source", default="mtp-cli", show_default=True, help="The event's source.")
@URL
@TOKEN
def publish(event_type: str, data: str | None, subject: str | None, source: str, url: str,
            token: str) -> None:
    """Publish one event of EVENT_TYPE; prints its id."""
    event: dict[str, Any] = {"specversion": "1.0", "id": uuid.uuid4().hex, "source": source,
                             "type": event_type}
    if subject is not None:
        event["subject"] = subject
    if data is not None:
        try:
            event["data"] = json.loads(data)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--data") from None
        event["datacontenttype"] = "application/json"
    answer = _request(url, token, "POST", "/events", json.dumps(event).encode(),
                      {"Content-Type": "application/cloudevents+json"})
    click.echo(answer["id"])


@events.command("dead")
@click.option("--replay", "replay_id", default=None, help="Send this dead letter again.")
@URL
@TOKEN
def dead(replay_id: str | None, url: str, token: str) -> None:
    """List dead letters (JSON), or replay one (role admin)."""
    if replay_id is not None:
        if not re.fullmatch(r"[0-9]+(-[0-9]+)?", replay_id):
            raise click.BadParameter("a dead letter id, as listed", param_hint="--replay")
        answer = _request(url, token, "POST", f"/events/dead/{replay_id}/replay")
    else:
        answer = _request(url, token, "GET", "/events/dead")
    click.echo(json.dumps(answer, indent=2))
