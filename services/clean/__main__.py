"""``python -m services.clean``: run the clean hop with its health and metrics server.

The server listens on ``XIETONG_HTTP_HOST``:``XIETONG_CLEAN_HTTP_PORT`` (``/healthz``,
``/readyz``, ``/metrics``). SIGTERM or SIGINT finish the current batch, commit it and exit.
"""

from __future__ import annotations

import asyncio

from services.clean.app import HopStatus, run_clean
from services.clean.handlers import SERVICE
from services.clean.settings import load_clean_settings
from shared.kafka import stop_on_signals
from shared.logs import configure_logging
from shared.observability import serve_health


async def main() -> None:
    settings = load_clean_settings()
    configure_logging(SERVICE, settings.log_level, settings.log_format)
    stop = asyncio.Event()
    stop_on_signals(stop)
    status = HopStatus()

    async def ready() -> str | None:
        return status.problem()

    runner = await serve_health(SERVICE, settings.http_host, settings.clean_http_port, ready)
    try:
        await run_clean(
            settings,
            stop,
            source=settings.clean_source_topic,
            target=settings.clean_target_topic,
            status=status,
        )
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
