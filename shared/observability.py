"""Health, readiness and Prometheus metrics over HTTP for every service.

``/healthz`` says the process is alive, ``/readyz`` runs the service's readiness check (e.g. the
broker answers), ``/metrics`` is the Prometheus text format. These three are the only
unauthenticated endpoints of the platform.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from shared.codec import json_response

ReadinessCheck = Callable[[], Awaitable[str | None]]
"""Returns None when ready, or the reason it is not."""

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


def add_health_routes(
    app: web.Application,
    service: str,
    ready: ReadinessCheck,
    registry: CollectorRegistry = REGISTRY,
    *,
    metrics: bool = True,
) -> None:
    """``/healthz``, ``/readyz`` and (unless ``metrics`` is False: a partner-facing port)
    ``/metrics``."""

    async def healthz(_: web.Request) -> web.Response:
        return json_response({"status": "ok", "service": service})

    async def readyz(_: web.Request) -> web.Response:
        problem = await ready()
        if problem is None:
            return json_response({"status": "ready", "service": service})
        return json_response(
            {"status": "not ready", "service": service, "reason": problem}, status=503
        )

    async def prometheus(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if metrics:
        app.router.add_get("/metrics", prometheus)


async def serve_health(service: str, host: str, port: int, ready: ReadinessCheck) -> web.AppRunner:
    """Start a small HTTP server with only the health routes (for worker services)."""
    app = web.Application()
    add_health_routes(app, service, ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as error:
        await runner.cleanup()
        if error.errno not in BIND_ERRORS:
            raise
        raise cannot_listen(service, error, f"XIETONG_{service.upper()}_HTTP_PORT") from None
    return runner


BIND_ERRORS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})
"""Why a port cannot be listened on: the operator's to fix, not a bug to show a traceback for."""


def require_listenable(service: str, host: str, port: int, setting: str) -> None:
    """Exit with one line if ``host:port`` cannot be listened on — checked before a service
    starts anything that would have to be unwound (its Kafka clients) when the bind fails."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno not in BIND_ERRORS:
                raise
            raise SystemExit(
                f"{service}: cannot listen on {host}:{port}: {error.strerror} (another process "
                f"holds it?); choose another port with {setting}"
            ) from None


def cannot_listen(service: str, error: OSError, setting: str) -> SystemExit:
    """A port that cannot be listened on, as the one line the process exits with."""
    return SystemExit(
        f"{service}: {error.strerror or error} (another process holds it?); "
        f"choose another port with {setting}"
    )
