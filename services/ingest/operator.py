"""The operator view's API on the gateway: ``/v1/operator/*``, behind an operator token.

An operator is not a tenant: these routes are checked by :func:`require_operator_token` (the
bearer token of ``XIETONG_OPERATOR_TOKEN``, compared in constant time) and never by a tenant key;
without a configured token they answer ``404``. The tenant-key middleware lets the prefix pass
only because this one stands before it (:func:`setup_operator`).

- ``GET /v1/operator/overview`` — one snapshot: every topic's end offset (records written so
  far, summed over partitions), each service consumer group's lag per topic (end offsets minus
  its committed offsets, from the broker), each service's readiness (its ``/readyz``) and its
  Prometheus counters and gauges (its ``/metrics``, as exposed: no copy is kept), the tenants and
  their keys (ids and status; never a digest). The page turns successive snapshots into rates
  (records per second per topic, dead letters per reason per interval).

Consumes: nothing continuously; each request asks the broker (an admin client and a consumer
without a group, made on first use) and scrapes the services named in ``operator_scrape``.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

from shared.codec import json_response
from shared.httpauth import REGISTRY_KEY, Handler
from shared.kafka import connection_config, create_consumer, stop_consumer

PREFIX = "/v1/operator/"
SCRAPE_TIMEOUT = 2.0


def require_operator_token(token: str | None) -> Middleware:
    """Paths under ``/v1/operator/`` need ``Authorization: Bearer <operator token>``."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        # What the router refuses anyway (no such route: 404, another method: 405) it answers.
        if not request.path.startswith(PREFIX) or request.match_info.http_exception is not None:
            return await handler(request)
        if token is None:
            return json_response(
                {"error": "the operator view is not enabled (XIETONG_OPERATOR_TOKEN)"}, status=404
            )
        header = request.headers.get("Authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            return json_response(
                {"error": "wrong or missing operator token"},
                status=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return middleware


def prometheus_samples(text: str) -> list[dict[str, Any]]:
    """The counters and gauges of a Prometheus text page (histograms and summaries left out)."""
    samples = []
    for family in text_string_to_metric_families(text):
        if family.type not in ("counter", "gauge"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            samples.append({"name": sample.name, "labels": sample.labels, "value": sample.value})
    return samples


def is_service_group(group: str, services: list[str]) -> bool:
    """A consumer group of a service: named after it (``clean``, ``analytics-network`` ...)."""
    return any(group == s or group.startswith((f"{s}-", f"{s}.", f"{s}_")) for s in services)


class BrokerView:
    """End offsets and consumer lag from the broker; clients made on first use."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._lock = asyncio.Lock()

    async def _clients(self) -> tuple[AIOKafkaAdminClient, AIOKafkaConsumer]:
        async with self._lock:
            if self._admin is None or self._consumer is None:
                settings = self.app[REGISTRY_KEY].settings
                admin = AIOKafkaAdminClient(**connection_config(settings))
                await admin.start()
                consumer = create_consumer(settings, None)
                try:
                    await consumer.start()
                except BaseException:
                    await admin.close()
                    raise
                self._admin, self._consumer = admin, consumer
            return self._admin, self._consumer

    async def close(self) -> None:
        if self._consumer is not None:
            await stop_consumer(self._consumer)
        if self._admin is not None:
            await self._admin.close()

    async def snapshot(self, services: list[str]) -> tuple[dict[str, int], dict[str, Any]]:
        """(topic -> end offset summed over partitions, group -> {topic: lag, ...})."""
        admin, consumer = await self._clients()
        topics = [t for t in await admin.list_topics() if not t.startswith("__")]
        await consumer._client.force_metadata_update()
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        end = await consumer.end_offsets(partitions) if partitions else {}
        offsets: dict[str, int] = {}
        for tp, offset in end.items():
            offsets[tp.topic] = offsets.get(tp.topic, 0) + offset
        groups = sorted({str(g[0]) for g in await admin.list_consumer_groups()})
        lag: dict[str, Any] = {}
        for group in (g for g in groups if is_service_group(g, services)):
            committed = await admin.list_consumer_group_offsets(group)
            per_topic: dict[str, int] = {}
            for tp, meta in committed.items():
                if meta.offset < 0 or tp not in end:
                    continue
                per_topic[tp.topic] = per_topic.get(tp.topic, 0) + max(0, end[tp] - meta.offset)
            if per_topic:
                lag[group] = {"topics": per_topic, "total": sum(per_topic.values())}
        return offsets, lag


async def scrape(session: aiohttp.ClientSession, name: str, base: str) -> dict[str, Any]:
    """One service's readiness and its counters and gauges."""
    found: dict[str, Any] = {"service": name, "url": base, "ready": False, "reason": None}
    try:
        async with session.get(f"{base}/readyz") as answer:
            body = await answer.json(content_type=None)
            found["ready"] = answer.status == 200
            found["reason"] = None if found["ready"] else body.get("reason", answer.status)
        async with session.get(f"{base}/metrics") as answer:
            found["metrics"] = prometheus_samples(await answer.text())
    except (aiohttp.ClientError, TimeoutError, ValueError) as error:
        found["reason"] = f"unreachable: {type(error).__name__}"
        found["metrics"] = []
    return found


def setup_operator(app: web.Application, scrape_targets: dict[str, str]) -> None:
    """The operator routes (their middleware is :func:`require_operator_token`)."""
    broker = BrokerView(app)
    session_box: list[aiohttp.ClientSession] = []

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            session_box.append(session)
            try:
                yield
            finally:
                await broker.close()

    async def overview(_: web.Request) -> web.Response:
        """Topics, lag, services, tenants and keys: one snapshot."""
        registry = app[REGISTRY_KEY]
        services = sorted(scrape_targets)
        scraped = asyncio.gather(
            *(scrape(session_box[0], name, scrape_targets[name]) for name in services)
        )
        try:
            (topics, lag), found = await asyncio.gather(broker.snapshot(services), scraped)
        except Exception as error:  # the broker away: say so, the page keeps polling
            return json_response({"error": f"broker: {type(error).__name__}"}, status=503)
        return json_response(
            {
                "at": time.time(),
                "topics": topics,
                "lag": lag,
                "services": found,
                "tenants": [
                    t.model_dump(mode="json", exclude={"created_at"})
                    for t in sorted(registry.tenants.values(), key=lambda t: t.tenant)
                ],
                "keys": [
                    {
                        "key_id": k.key_id,
                        "tenant": k.tenant,
                        "label": k.label,
                        "created_at": k.created_at.isoformat(),
                        "status": "revoked" if k.revoked_at else "active",
                    }
                    for k in sorted(registry.keys.values(), key=lambda k: (k.tenant, k.key_id))
                ],
            }
        )

    from services.ingest.openapi import describe

    answer = {"application/json": {"schema": {"type": "object"}}}
    describe(
        "GET",
        f"{PREFIX}overview",
        {
            "summary": "Operators only: topics, consumer lag, services, tenants and keys.",
            "description": "Needs `Authorization: Bearer <operator token>` "
            "(XIETONG_OPERATOR_TOKEN), never a tenant key.",
            "security": [],  # not the tenant key scheme of this document
            "responses": {
                "200": {"description": "A snapshot", "content": answer},
                "401": {"description": "Wrong or missing operator token", "content": answer},
                "404": {"description": "The operator view is not enabled", "content": answer},
                "503": {"description": "The broker cannot be read", "content": answer},
            },
        },
    )
    app.cleanup_ctx.append(lifecycle)
    app.router.add_get(f"{PREFIX}overview", overview)
