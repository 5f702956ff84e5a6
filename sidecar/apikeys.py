"""API keys: only SHA-256 digests are configured; a presented key is looked up in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from framework.tenant_config import ApiKeySettings


class ApiKeys:
    """The tenant's API keys by digest."""

    def __init__(self, keys: Iterable[ApiKeySettings]) -> None:
        self._entries = tuple((bytes.fromhex(k.digest), k) for k in keys)

    def lookup(self, presented: str) -> ApiKeySettings | None:
        """The key's settings when ``presented`` is one of them, else None.

        Every configured digest is compared with ``hmac.compare_digest`` and the loop
        never exits early, so the time taken does not tell which key (or how much of
        one) matched.
        """
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found = None
        for known, settings in self._entries:
            if hmac.compare_digest(digest, known):
                found = settings
        return found
