#!/usr/bin/env python3
"""Keep an nginx gateway on the fleet's routing table (docs/pools.md, "Migration").

Polls ``GET /admin/gateway?format=nginx`` of ``mtp control`` with ``If-None-Match``;
when the table changed it writes it (a temporary file renamed over ``--out``) and
runs ``--reload`` (e.g. ``nginx -s reload``: new workers route by the new table,
old ones finish their requests). A reload that fails is tried again on the next
poll. Credentials as for ``mtp tenants``: MTP_CONTROL_API_KEY (an operator API key)
or MTP_CONTROL_TOKEN (an operator JWT). Standard library only.

    gateway-sync.py --control http://mtp-control:8090 --out /etc/nginx/mtp/routes.conf \
        --reload "nginx -s reload" --interval 1
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def fetch(url: str, etag: str, headers: dict[str, str]) -> tuple[str, bytes | None]:
    """(etag, new table) or (etag, None) when unchanged."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--control must be an http(s) URL, got {url!r}")
    sent = {**headers, **({"If-None-Match": etag} if etag else {})}
    request = urllib.request.Request(url, headers=sent)  # noqa: S310 - scheme checked above
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
            return reply.headers.get("ETag", ""), reply.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return etag, None
        raise


def write(path: Path, body: bytes) -> bool:
    """Replace the file atomically; False when it already holds this table."""
    if path.is_file() and path.read_bytes() == body:
        return False
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_bytes(body)
    os.replace(tmp, path)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", default=os.environ.get("MTP_CONTROL_URL",
                                                            "http://127.0.0.1:8090"))
    parser.add_argument("--out", required=True, type=Path, help="the routes file nginx includes")
    parser.add_argument("--reload", required=True, help='e.g. "nginx -s reload"')
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
    parser.add_argument("--once", action="store_true", help="one poll, then exit")
    args = parser.parse_args()
    headers = {}
    if os.environ.get("MTP_CONTROL_API_KEY"):
        headers["X-API-Key"] = os.environ["MTP_CONTROL_API_KEY"]
    elif os.environ.get("MTP_CONTROL_TOKEN"):
        headers["Authorization"] = "Bearer " + os.environ["MTP_CONTROL_TOKEN"]
    url = args.control.rstrip("/") + "/admin/gateway?format=nginx"
    etag, unloaded = "", False
    while True:
        try:
            new_etag, body = fetch(url, etag, headers)
            if body is not None:
                unloaded = write(args.out, body) or unloaded
                if unloaded:
                    subprocess.run(shlex.split(args.reload), check=True, timeout=60)
                    unloaded = False
                    print(f"gateway-sync: table {new_etag} in force", flush=True)
                etag = new_etag
        except (OSError, subprocess.SubprocessError) as exc:
            etag = ""  # fetch again, and reload what was written, on the next poll
            print(f"gateway-sync: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if args.once:
            return 0 if etag else 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
