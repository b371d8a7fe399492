"""Builders of insights and a small network of tenants, for the tests of every subscription path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from aiohttp import web
from aiohttp.test_utils import TestServer

from schemas.control import Tenant
from schemas.insights import NETWORK_TENANT, Benchmark, Insight, Prediction, Provenance, Statistics
from schemas.topics import INSIGHT_TOPICS
from services.ingest.insights import INSIGHTS_KEY, setup_insight_routes
from shared.codec import encode
from shared.control import ControlRegistry, ControlWriter, issue_api_key, new_id
from shared.httpauth import REGISTRY_KEY, require_api_key
from shared.kafka import BatchPublisher, OutRecord, create_producer, ensure_topics, started
from shared.sdk import GatewayClient, InsightStream
from shared.settings import XietongSettings

WINDOW = datetime(2026, 11, 1, tzinfo=UTC)


def provenance(partners: int = 1) -> Provenance:
    return Provenance(
        window_start=WINDOW,
        window_end=WINDOW + timedelta(hours=1),
        contributing_partners=partners,
        event_count=10,
        source_topics=["events.clean.v1"],
        schema_versions={"sales_order_line": 1},
        service="analytics",
        service_version="test",
        produced_at=datetime.now(UTC),
    )


def statistics(tenant: str, metric: str = "sales.amount_cny", mean: float = 1.0) -> Statistics:
    return Statistics(
        tenant=tenant,
        metric=metric,
        count=10,
        mean=mean,
        std=0.5,
        min=0.0,
        p25=0.5,
        p50=1.0,
        p75=1.5,
        max=2.0,
        provenance=provenance(),
    )


def prediction(tenant: str) -> Prediction:
    return Prediction(
        tenant=tenant,
        target="demand",
        model_name="rf",
        model_version="1",
        value=3.0,
        provenance=provenance(),
    )


def benchmark(metric: str) -> Benchmark:
    return Benchmark(
        tenant=NETWORK_TENANT,
        visibility="public",
        metric=metric,
        industry="fasteners",
        region="cn-east",
        firms=5,
        quantiles={"p50": 1.0},
        mean=1.0,
        provenance=provenance(5),
    )


async def publish(settings: XietongSettings, insights: Iterable[Insight]) -> None:
    """Publish to the insight topics as the analytics services do (key: owner)."""
    by_topic: dict[str, list[OutRecord]] = {}

    for insight in insights:
        by_topic.setdefault(INSIGHT_TOPICS[insight.type], []).append(
            OutRecord(insight.tenant.encode(), encode(insight))
        )
    await ensure_topics(settings, INSIGHT_TOPICS.values())
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish_many(dict(by_topic.items()))


@dataclass(frozen=True)
class Network:
    """Partner firms ``a`` and ``b`` and a consumer ``bank`` (unique ids), with their API keys."""

    a: str
    b: str
    bank: str
    keys: dict[str, str]
    writer: ControlWriter
    registry: ControlRegistry


@asynccontextmanager
async def network(settings: XietongSettings) -> AsyncIterator[Network]:
    tenants: dict[str, Literal["partner", "consumer"]] = {
        f"a{new_id()}": "partner",
        f"b{new_id()}": "partner",
        f"bank{new_id()}": "consumer",
    }
    async with ControlWriter(settings) as writer, ControlRegistry(settings) as registry:
        keys: dict[str, str] = {}
        for tenant, kind in tenants.items():
            await writer.put_tenant(
                Tenant(tenant=tenant, name=tenant, kind=kind, created_at=datetime.now(UTC))
            )
            keys[tenant], record = issue_api_key(tenant)
            await writer.put_key(record)
        async with asyncio.timeout(30):
            while any(registry.authenticate(key) is None for key in keys.values()):
                await registry.wait_changed(registry.version, 1)
        a, b, bank = tenants
        yield Network(a, b, bank, keys, writer, registry)


@dataclass(frozen=True)
class Gateway:
    """A minimal gateway app (auth middleware + insight routes) serving on 127.0.0.1."""

    net: Network
    url: str
    app: web.Application

    def client(self, tenant: str) -> GatewayClient:
        return GatewayClient(self.url, self.net.keys[tenant])

    def stream(self, tenant: str, **kwargs: Any) -> InsightStream:
        return InsightStream(self.url, self.net.keys[tenant], **kwargs)

    async def caught_up(self) -> None:
        """Everything published so far is in the gateway's insight cache."""
        assert await self.app[INSIGHTS_KEY].cache.wait_caught_up(30)


@asynccontextmanager
async def gateway_app(settings: XietongSettings) -> AsyncIterator[Gateway]:
    async with network(settings) as net:
        app = web.Application(middlewares=[require_api_key()])
        app[REGISTRY_KEY] = net.registry
        setup_insight_routes(app, heartbeat=0.5)
        async with TestServer(app, host="127.0.0.1") as server:
            yield Gateway(net, str(server.make_url("")).rstrip("/"), app)
