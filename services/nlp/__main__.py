"""``python -m services.nlp``: run the nlp service with its health and metrics server.

The server listens on ``XIETONG_HTTP_HOST``:``XIETONG_NLP_HTTP_PORT`` (``/healthz``,
``/readyz``, ``/metrics``). SIGTERM or SIGINT finish the current batch, commit it and exit.
"""

from __future__ import annotations

import asyncio

from aiokafka.errors import KafkaError

from services.nlp.app import NlpStatus, run_nlp
from services.nlp.handlers import SERVICE
from services.nlp.settings import load_nlp_settings
from shared.kafka import kafka_problem, stop_on_signals
from shared.logs import configure_logging
from shared.observability import serve_health


async def main() -> None:
    settings = load_nlp_settings()
    configure_logging(SERVICE, settings.log_level, settings.log_format)
    settings.network_key()  # refuse to start without the network secret, before anything else
    stop = asyncio.Event()
    stop_on_signals(stop)
    status = NlpStatus()

    async def ready() -> str | None:
        return status.problem()

    runner = await serve_health(SERVICE, settings.http_host, settings.nlp_http_port, ready)
    try:
        await run_nlp(settings, stop, status=status)
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except (KafkaError, TimeoutError, ConnectionError) as error:  # told to stop while away
        bootstrap = load_nlp_settings().kafka_bootstrap_servers
        raise SystemExit(f"nlp: {kafka_problem(error, bootstrap)}") from None
