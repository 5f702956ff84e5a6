"""`mtp token` and `mtp apikey create`: development tokens and API keys."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time

import click
import jwt

from framework.cli import resolve_tenant_dir, template_dir
from framework.devsecret import dev_jwt_secret
from framework.settings import Settings
from framework.tenant_config import ConfigError

API_KEY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@click.command()
@click.option("--user", "-u", required=True, help="The token's subject (user id).")
@click.option("--tenant", "-t", default=None, help="Tenant id (default: the tenant dir's).")
@click.option("--groups", default="", help="Comma-separated groups.")
@click.option("--roles", default="", help="Comma-separated roles.")
@click.option("--ttl", default=3600, type=click.IntRange(1, 30 * 86400), show_default=True,
              help="Lifetime in seconds.")
@click.option("--tenant-dir", default=None, help="Tenant directory (else MTP_TENANT_DIR or .).")
def token(user: str, tenant: str | None, groups: str, roles: str, ttl: int,
          tenant_dir: str | None) -> None:
    """Print a development JWT signed with the configured HS* secret."""
    found = resolve_tenant_dir(tenant_dir)
    settings = Settings.from_env(tenant_dir=found or template_dir())
    cfg = settings.load_tenant()
    alg = next((a for a in cfg.jwt.algorithms if a.startswith("HS")), None)
    if alg is None:
        raise ConfigError(cfg.source, "auth.jwt.algorithms",
                          "mtp token signs HS* development tokens; this tenant accepts none")
    secret = settings.secret(cfg.jwt.secret_env)
    if not secret and found is None:
        secret = dev_jwt_secret(settings.data_dir)  # the one `mtp run` uses for the template
    if not secret:
        raise ConfigError("environment", cfg.jwt.secret_env, "not set: the HS* secret is needed")
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": user,
        cfg.jwt.tenant_claim: tenant or cfg.tenant_id,
        "iat": now,
        "exp": now + ttl,
        "groups": _split(groups),
        "roles": _split(roles),
    }
    if cfg.jwt.issuer:
        claims["iss"] = cfg.jwt.issuer
    if cfg.jwt.audience:
        claims["aud"] = cfg.jwt.audience
    click.echo(jwt.encode(claims, secret, algorithm=alg))


@click.group()
def apikey() -> None:
    """Create API keys (only their hash goes into tenant.toml)."""


@apikey.command("create")
@click.option("--name", "-n", default=None, help="The key's user id (its table name).")
@click.option("--roles", default="", help="Comma-separated roles.")
def create(name: str | None, roles: str) -> None:
    """Print a new key on the first line, then the table to paste into tenant.toml."""
    name = name or f"key-{secrets.token_hex(3)}"
    if not API_KEY_NAME_RE.match(name):
        raise click.BadParameter("letters, digits, '.', '_' and '-', at most 64",
                                 param_hint="--name")
    key = "mtp_" + secrets.token_urlsafe(32)
    digest = hashlib.sha256(key.encode()).hexdigest()
    role_list = ", ".join(json.dumps(r) for r in _split(roles))  # JSON strings are TOML ones
    click.echo(key)
    # A dotted name is one key only when quoted (bare, TOML reads nested tables).
    click.echo(f'[auth.api_keys."{name}"]' if "." in name else f"[auth.api_keys.{name}]")
    click.echo(f'hash = "sha256:{digest}"')
    click.echo(f"roles = [{role_list}]")
