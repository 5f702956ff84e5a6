"""Ops tests read log records with caplog even after a module set the mtp logger up."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture(autouse=True)
def _mtp_logs_reach_caplog(monkeypatch: pytest.MonkeyPatch) -> None:
    # framework.logs.setup (run by create_app) stops propagation to the root logger.
    monkeypatch.setattr(logging.getLogger("mtp"), "propagate", True)
