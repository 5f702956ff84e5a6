"""Running the sidecar: open its clients, serve until SIGTERM/SIGINT, drain, close."""

from __future__ import annotations

import asyncio

from sidecar.front import install_stop_signals, serve
from sidecar.startup import App


async def main(app: App, *, shutdown_timeout: float, host: str = "", port: int = 0,
               path: str = "", stop: asyncio.Event | None = None) -> None:
    """Serve ``app`` on ``path`` (unix socket) or ``host:port`` until ``stop`` is set.

    Without ``stop``, SIGTERM and SIGINT stop it.
    """
    if stop is None:
        stop = asyncio.Event()
        install_stop_signals(asyncio.get_running_loop(), stop)
    async with app.started() as sidecar:
        await serve(sidecar.handle, shutdown_timeout=shutdown_timeout, host=host, port=port,
                    path=path, stop=stop)


def run(app: App, *, shutdown_timeout: float, host: str = "", port: int = 0,
        path: str = "") -> None:
    """Serve until SIGINT/SIGTERM, let requests in flight finish, then stop.

    ``asyncio.run`` then cancels whatever is still pending (background flushes,
    watchers) rather than dropping it, and closes the loop.
    """
    asyncio.run(main(app, shutdown_timeout=shutdown_timeout, host=host, port=port, path=path))
