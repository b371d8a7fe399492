"""``python -m services.ingest``: run the HTTP gateway until SIGTERM / SIGINT.

Two ports: the partner-facing gateway (``XIETONG_INGEST_HTTP_PORT``) and the operator's
metrics, health and readiness (``XIETONG_INGEST_METRICS_PORT``). On a signal aiohttp stops
accepting connections, lets running requests finish (their records
are acknowledged before they answer), then the ``cleanup_ctx`` stops the registry and flushes and
closes the producer.
"""

from __future__ import annotations

from aiohttp import web

from services.ingest.app import SERVICE, create_app, operator_port
from services.ingest.settings import load_ingest_settings
from shared.logs import configure_logging
from shared.observability import BIND_ERRORS, cannot_listen, require_listenable


def main() -> None:
    settings = load_ingest_settings()
    configure_logging(SERVICE, settings.log_level, settings.log_format)
    require_listenable(
        SERVICE, settings.http_host, settings.ingest_http_port, "XIETONG_INGEST_HTTP_PORT"
    )
    require_listenable(
        SERVICE, settings.http_host, settings.ingest_metrics_port, "XIETONG_INGEST_METRICS_PORT"
    )
    app = create_app(settings)
    app.cleanup_ctx.append(operator_port)
    try:
        web.run_app(
            app,
            host=settings.http_host,
            port=settings.ingest_http_port,
            access_log=None,
            shutdown_timeout=30,
            handle_signals=True,
        )
    except OSError as error:  # a busy port (either of the two) is one line, not a traceback
        if error.errno not in BIND_ERRORS:
            raise
        ports = "XIETONG_INGEST_HTTP_PORT / XIETONG_INGEST_METRICS_PORT"
        raise cannot_listen(SERVICE, error, ports) from None


if __name__ == "__main__":
    main()
