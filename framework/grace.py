"""The stop budget: every layer's timeout derived from one MTP_GRACE_SECONDS.

Times count from the SIGTERM that starts the stop. Each layer ends inside the
one above it, so the outer one never has to cut work the inner one promised:

    sidecar drain  <  framework drain  <  kill  <  total

The sidecar stops accepting at once and answers what it holds; the framework
(and the job worker) outlive it, because those answers come from them.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_GRACE_SECONDS = 6  # below this the layers would have no room left between them


@dataclass(frozen=True)
class StopBudget:
    """Seconds each layer may take, all counted from SIGTERM."""

    total: int  # `mtp run` (or a container) from SIGTERM to exit
    kill_after: int  # `mtp run` SIGKILLs every child's process group that is left
    framework: int  # gunicorn's graceful_timeout and `mtp worker`'s drain of running jobs
    sidecar: int  # the sidecar answers requests in flight; then ~1 s to cancel and close


def stop_budget(grace_seconds: int) -> StopBudget:
    """The budget of one MTP_GRACE_SECONDS (at least MIN_GRACE_SECONDS), in whole seconds."""
    total = max(int(grace_seconds), MIN_GRACE_SECONDS)
    # One second per step: reaping after the kill, the kill after the framework's
    # own deadline, and the sidecar's cancel-and-close after its drain.
    return StopBudget(total=total, kill_after=total - 1, framework=total - 2,
                      sidecar=total - 4)
