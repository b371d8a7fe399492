"""``python -m services.storage``: the archive loop and the partner API on one port.

Listens on ``XIETONG_HTTP_HOST``:``XIETONG_STORAGE_HTTP_PORT`` (8085). SIGTERM or SIGINT flush
every open segment, commit and exit.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiokafka.errors import KafkaError

from services.storage.app import create_app
from services.storage.handlers import SERVICE
from services.storage.settings import load_storage_settings
from shared.kafka import kafka_problem, stop_on_signals
from shared.logs import configure_logging


async def main() -> None:
    settings = load_storage_settings()
    configure_logging(SERVICE, settings.log_level, settings.log_format)
    settings.link_key()  # refuse to start without a secret to sign links with
    stop = asyncio.Event()
    stop_on_signals(stop)
    runner = web.AppRunner(create_app(settings, stop=stop), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.http_host, settings.storage_http_port).start()
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except (KafkaError, TimeoutError, ConnectionError) as error:  # told to stop while away
        bootstrap = load_storage_settings().kafka_bootstrap_servers
        raise SystemExit(f"storage: {kafka_problem(error, bootstrap)}") from None
