"""The ingest HTTP gateway: partner firms publish events here, and read the insights they may see.

Consumes: HTTP requests (``POST /v1/events`` as a JSON array, NDJSON or CSV; see
:mod:`services.ingest.handlers`) and, to authenticate them, the control topics
(``control.tenants.v1``, ``control.keys.v1``, ``control.grants.v1``) through a
:class:`~shared.control.ControlRegistry` that every replica rebuilds from the compacted topics.
With ``ingest_with_insights`` it also serves the insight and sharing routes of
:mod:`services.ingest.insights`.

Produces: accepted events to ``events.raw.v1`` (key: the tenant of the API key, never a tenant
from the body) and refused records, with their original content and reasons, to
``events.raw.v1.dlq``.

Delivery semantics: **at-least-once, acknowledged before answering.** A request's records are
appended to per-partition batches — shared with the requests that arrive at the same moment
(group commit, :class:`~services.ingest.handlers.CoalescingPublisher`) — and sent together by an
idempotent ``acks=all`` producer; the ``202`` is answered only after Kafka acknowledged every one
of them. If Kafka does not, the
answer is ``503`` and the client retries. A retry (or any re-sent batch) publishes the same
``event_id`` again — for CSV without an ``event_id`` column the id is derived from
``(tenant, sha256(body), row)``, so it repeats too — and **the clean service drops repeated
event ids** (its de-duplication survives restarts). The gateway itself keeps no state: any
replica can take any request.

Routes: ``POST /v1/events``; ``GET /healthz``, ``/readyz`` (broker answers a metadata request)
and ``/openapi.json`` (OpenAPI 3.1) — these three need no key; the web console's static files
under ``/console/`` (:mod:`services.ingest.console`) need none either, and the operator view's
``/v1/operator/*`` (:mod:`services.ingest.operator`) needs the operator token, not a tenant
key. The Prometheus ``/metrics`` (with ``/healthz`` and ``/readyz`` again) are served on a
separate operator port (``XIETONG_INGEST_METRICS_PORT``, default 8090, :func:`operator_port`),
never to partners.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web
from aiokafka import AIOKafkaProducer

from schemas.topics import EVENTS_RAW, dlq
from services.ingest.console import PREFIX as CONSOLE_PREFIX
from services.ingest.console import setup_console
from services.ingest.handlers import (
    EVENT_TIME_KEY,
    KAFKA_HEALTH_KEY,
    MAX_BODY_KEY,
    METRICS_KEY,
    PUBLISH_TIMEOUT_KEY,
    PUBLISHER_KEY,
    CoalescingPublisher,
    GatewayMetrics,
    answer_errors,
    count_requests,
    post_events,
)
from services.ingest.openapi import build_openapi
from services.ingest.operator import PREFIX as OPERATOR_PREFIX
from services.ingest.operator import require_operator_token, setup_operator
from services.ingest.rates import setup_rates_routes
from services.ingest.settings import IngestSettings
from shared.codec import json_response
from shared.control import ControlRegistry
from shared.httpauth import REGISTRY_KEY, require_api_key
from shared.kafka import KafkaHealth, create_producer, ensure_topics, stop_quietly
from shared.observability import ReadinessCheck, add_health_routes

SERVICE = "ingest"
SETTINGS_KEY = web.AppKey("settings", IngestSettings)
READY_KEY: web.AppKey[ReadinessCheck] = web.AppKey("ready")
OPERATOR_KEY = web.AppKey("operator", web.AppRunner)


async def kafka_clients(app: web.Application) -> AsyncIterator[None]:
    """Own the producer and the control registry for the life of the app."""
    settings = app[SETTINGS_KEY]
    await ensure_topics(settings, [EVENTS_RAW, dlq(EVENTS_RAW)])

    # No linger: the publisher already groups concurrent requests into one batch per partition
    # (group commit), so waiting for more records would only add latency to every request.
    def new_producer() -> AIOKafkaProducer:
        return create_producer(settings, linger_ms=0)

    producers = [new_producer() for _ in range(settings.ingest_producers)]
    publisher = CoalescingPublisher(
        producers[0],
        lanes=producers[1:],
        round_requests=app[METRICS_KEY].round_requests,
        renew_with=new_producer,
    )
    try:
        for producer in producers:
            await producer.start()
        async with ControlRegistry(settings) as registry, app[KAFKA_HEALTH_KEY].watching(settings):
            app[PUBLISHER_KEY] = publisher
            app[REGISTRY_KEY] = registry
            try:
                yield
            finally:
                await publisher.drain(settings.ingest_publish_timeout_seconds)
    finally:
        for lane in publisher.lanes:  # the producers they hold now (some may be renewed ones)
            await stop_quietly(lane.producer, settings.ingest_publish_timeout_seconds)


def create_app(settings: IngestSettings) -> web.Application:
    """The gateway app; Kafka clients start with it (``cleanup_ctx``) and stop with it."""
    metrics = GatewayMetrics.create()
    token = settings.operator_token.get_secret_value() if settings.operator_token else None
    app = web.Application(
        middlewares=[
            count_requests,
            answer_errors,
            # /v1/operator/* is the operator token's (checked first), /console/ is static files
            require_operator_token(token),
            require_api_key(public_prefixes=(CONSOLE_PREFIX, OPERATOR_PREFIX)),
        ]
    )
    app[SETTINGS_KEY] = settings
    app[METRICS_KEY] = metrics
    app[MAX_BODY_KEY] = settings.ingest_max_body_bytes
    app[PUBLISH_TIMEOUT_KEY] = settings.ingest_publish_timeout_seconds
    app[EVENT_TIME_KEY] = settings.event_time_bounds()
    health = app[KAFKA_HEALTH_KEY] = KafkaHealth.of(settings, loops=False)
    app.cleanup_ctx.append(kafka_clients)

    async def ready() -> str | None:
        if PUBLISHER_KEY not in app:
            return "starting"
        problem = app[REGISTRY_KEY].problem()
        if problem is not None:
            return problem  # it refuses every key meanwhile (fail closed)
        # the broker answers its probes (every second) and no producer is broken
        return health.unreachable() or health.problem() or app[PUBLISHER_KEY].problem()

    async def openapi(_: web.Request) -> web.Response:
        """The OpenAPI 3.1 document of this gateway."""
        return json_response(build_openapi(app, settings))

    app[READY_KEY] = ready
    add_health_routes(app, SERVICE, ready, metrics=False)  # for the load balancers
    app.router.add_post("/v1/events", post_events)
    app.router.add_get("/openapi.json", openapi)
    setup_rates_routes(app, settings)  # GET /v1/rates: the dated exchange rates
    if settings.ingest_with_insights:
        # The insight routes' own startup needs the registry: it is appended after ours.
        from services.ingest.insights import setup_insight_routes

        setup_insight_routes(app, per_series=settings.ingest_insights_per_series)
        setup_console(app, settings)
    setup_operator(app, settings.operator_scrape)
    return app


def create_operator_app(gateway: web.Application) -> web.Application:
    """The operator side of a gateway app: its Prometheus metrics, health and readiness."""
    operator = web.Application()
    add_health_routes(operator, SERVICE, gateway[READY_KEY], registry=gateway[METRICS_KEY].registry)
    return operator


async def operator_port(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` of the process: serve :func:`create_operator_app` on
    ``ingest_metrics_port`` for the life of the gateway."""
    settings = app[SETTINGS_KEY]
    runner = web.AppRunner(create_operator_app(app), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.http_host, settings.ingest_metrics_port).start()
        app[OPERATOR_KEY] = runner
        yield
    finally:
        await runner.cleanup()
