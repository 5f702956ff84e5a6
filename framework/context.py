"""What a handler receives: ``handle(context)``.

A plain (non-frozen) dataclass so other parts of the framework can add fields
(``context.call`` is attached by the service-to-service layer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from framework.flags import FlagSet


@dataclass(eq=False)
class Context:
    """One call of one service by one principal."""

    tenant_id: str
    service: str
    operation: str | None
    user: str
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    auth_method: str
    payload: Any
    params: Mapping[str, str]
    request_id: str
    config: Mapping[str, Any]
    flags: FlagSet
    logger: logging.Logger | logging.LoggerAdapter
    deadline: float  # time.monotonic() value; past it a sync caller gets 504

    def time_left(self) -> float:
        """Seconds until the deadline (negative once passed)."""
        return self.deadline - time.monotonic()
