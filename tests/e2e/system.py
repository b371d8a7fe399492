"""The whole network in one process, for the end-to-end stories.

:func:`running_system` starts, on the real local Kafka: the ingest gateway (``create_app`` in an
aiohttp ``TestServer`` on 127.0.0.1), the clean hop (``run_clean``) and analytics
(``run_analytics``) as asyncio tasks with a stop event — each with consumer groups and internal
topics no other test uses. The gateway always publishes to the shared ``events.raw.v1``; so that
a test sees only its own events, the clean hop's group starts at the current end of that topic
(a fresh deployment would start there too) and writes to a clean topic of its own, which is what
its analytics reads. Insight topics are shared: tests read them through the gateway, filtered by
their own (unique) tenants.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import math
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
import pandas as pd
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner

from schemas.control import Tenant
from schemas.insights import Insight
from schemas.topics import EVENTS_RAW, dlq
from services.analytics.app import run_analytics
from services.analytics.settings import AnalyticsSettings, load_analytics_settings
from services.clean.app import HopStatus, run_clean
from services.ingest.app import create_app
from services.ingest.settings import load_ingest_settings
from shared.codec import decode, encode
from shared.control import ControlRegistry, ControlWriter, issue_api_key
from shared.httpauth import REGISTRY_KEY
from shared.kafka import create_consumer, create_producer, ensure_topics, started
from shared.sdk import GatewayClient, InsightStream
from shared.settings import XietongSettings

TIMEOUT = 60.0
"""Longest wait for anything to come out of the system (the stories take seconds)."""


# --------------------------------------------------------------------------- tenants


@dataclass(frozen=True)
class Member:
    """A tenant of the test network and its API key."""

    tenant: str
    kind: Literal["partner", "consumer"]
    industry: str
    region: str
    key: str


def partition_of(tenant: str, partitions: int) -> int:
    """The raw (and clean) partition of a tenant's events: the producer's default partitioner."""
    numbers = list(range(partitions))
    return int(DefaultPartitioner()(tenant.encode(), numbers, numbers))


def tenant_names(prefix: str, count: int, partitions: int) -> tuple[list[str], list[str]]:
    """``count`` fresh tenant names, spread over as many partitions as the names allow, and
    *fillers*: one more tenant for each partition none of them lands on.

    Network-wide windows close when every source partition has passed them; the fillers (which
    publish only the later events that move event time on) make sure every partition does,
    whatever the partition count of ``events.raw.v1``.
    """
    wanted = min(count, partitions)
    for _ in range(1000):
        tag = uuid.uuid4().hex[:8]
        names = [f"{prefix}{i}-{tag}" for i in range(count)]
        if len({partition_of(n, partitions) for n in names}) == wanted:
            break
    covered = {partition_of(n, partitions) for n in names}
    fillers: list[str] = []
    index = 0
    while len(covered) < partitions:
        name = f"filler{index}-{tag}"
        index += 1
        if partition_of(name, partitions) not in covered:
            covered.add(partition_of(name, partitions))
            fillers.append(name)
    return names, fillers


async def register(
    settings: XietongSettings,
    tenants: Iterable[tuple[str, Literal["partner", "consumer"], str, str]],
) -> dict[str, Member]:
    """Tenants (id, kind, industry, region) with one API key each, read back by a registry."""
    members: dict[str, Member] = {}
    async with ControlWriter(settings) as writer:
        for tenant, kind, industry, region in tenants:
            await writer.put_tenant(
                Tenant(
                    tenant=tenant,
                    name=tenant,
                    kind=kind,
                    industry=industry,
                    region=region,
                    created_at=datetime.now(UTC),
                )
            )
            key, record = issue_api_key(tenant)
            await writer.put_key(record)
            members[tenant] = Member(tenant, kind, industry, region, key)
    async with ControlRegistry(settings) as registry, asyncio.timeout(TIMEOUT):
        while any(registry.authenticate(m.key) is None for m in members.values()):
            await registry.wait_changed(registry.version, 1)
    return members


# --------------------------------------------------------------------------- the system


@dataclass
class System:
    """The running network of one test."""

    settings: XietongSettings
    analytics: AnalyticsSettings
    url: str
    clean_topic: str
    clean_status: HopStatus
    members: dict[str, Member]
    session: ClientSession
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def client(self, tenant: str) -> GatewayClient:
        return GatewayClient(self.url, self.members[tenant].key, session=self.session)

    def stream(self, tenant: str, **kwargs: Any) -> InsightStream:
        return InsightStream(self.url, self.members[tenant].key, session=self.session, **kwargs)

    def check_running(self) -> None:
        """Fail with the service's own error when one of them stopped."""
        for task in self.tasks:
            if task.done():
                task.result()
                raise AssertionError(f"{task.get_name()} stopped")

    async def post(
        self, tenant: str, body: bytes, content_type: str, **params: str
    ) -> dict[str, Any]:
        """``POST /v1/events`` with the tenant's key; the 202 answer, decoded."""
        async with self.session.post(
            f"{self.url}/v1/events",
            data=body,
            params=params,
            headers={
                "Authorization": f"Bearer {self.members[tenant].key}",
                "Content-Type": content_type,
            },
        ) as response:
            text = await response.text()
            assert response.status == 202, text
            answer: dict[str, Any] = decode(text.encode())
            return answer

    async def publish_json(self, tenant: str, events: Sequence[dict[str, Any]]) -> None:
        answer = await self.post(tenant, encode(list(events)), "application/json")
        assert answer["accepted"] == len(events) and answer["refused"] == 0, answer

    async def publish_csv(
        self, tenant: str, event_type: str, rows: Sequence[dict[str, Any]]
    ) -> bytes:
        """Rows as a CSV export (the header from the first row); returns the body sent."""
        body = csv_body(rows)
        answer = await self.post(tenant, body, "text/csv", type=event_type)
        assert answer["accepted"] == len(rows) and answer["refused"] == 0, answer
        return body

    async def wait_for(
        self,
        reader: str,
        done: Callable[[list[Insight]], bool],
        *,
        types: Iterable[str] = (),
        owner: str | None = None,
    ) -> list[Insight]:
        """What ``GET /v1/insights`` shows ``reader``, polled until ``done`` says it is there."""
        client = self.client(reader)
        async with asyncio.timeout(TIMEOUT):
            while True:
                self.check_running()
                found = await client.insights(types=types, owner=owner, limit=1000)
                if done(found):
                    return found
                await asyncio.sleep(0.2)


async def start_at_end(settings: XietongSettings, group: str, topic: str) -> None:
    """Commit the end of ``topic`` for ``group``: its first member starts from now on."""
    async with started(create_producer(settings)) as producer:
        partitions = sorted(await producer.partitions_for(topic))
    async with started(create_consumer(settings, group)) as consumer:
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        await consumer.commit(dict(await consumer.end_offsets(tps)))


async def create_topics(
    settings: XietongSettings, topics: Sequence[str], partitions: int | None = None
) -> None:
    """Create ``topics`` and wait until the broker's metadata shows them.

    ``ensure_topics`` returns as soon as the broker accepted the creation; a consumer group that
    subscribes in that moment may be assigned nothing, and aiokafka looks again only at its next
    metadata refresh (minutes). A deployment creates its topics first; so do the tests.
    """
    await ensure_topics(settings, topics, partitions=partitions)
    async with started(create_producer(settings)) as producer:
        for topic in topics:
            await producer.partitions_for(topic)


async def raw_partitions(settings: XietongSettings) -> int:
    await ensure_topics(settings, [EVENTS_RAW, dlq(EVENTS_RAW)])
    async with started(create_producer(settings)) as producer:
        return len(await producer.partitions_for(EVENTS_RAW))


@contextlib.asynccontextmanager
async def running_system(
    settings: XietongSettings,
    unique_name: Callable[[str], str],
    members: dict[str, Member],
    **analytics_overrides: Any,
) -> AsyncIterator[System]:
    """Gateway, clean and analytics running for ``members`` (registered beforehand)."""
    partitions = await raw_partitions(settings)
    clean_topic = unique_name("events.clean")
    await create_topics(settings, [clean_topic], partitions=partitions)
    clean_group = unique_name("clean")
    await start_at_end(settings, clean_group, EVENTS_RAW)
    analytics = load_analytics_settings(
        **{
            **settings.model_dump(),
            "analytics_group_id": unique_name("analytics"),
            "analytics_network_group_id": unique_name("analytics-network"),
            "analytics_firm_windows_topic": unique_name("analytics.firm-windows"),
            **analytics_overrides,
        }
    )
    await create_topics(settings, [analytics.analytics_firm_windows_topic], partitions=1)
    stop = asyncio.Event()
    status = HopStatus()
    tasks = [
        asyncio.create_task(
            run_clean(settings, stop, target=clean_topic, group_id=clean_group, status=status),
            name="clean",
        ),
        asyncio.create_task(run_analytics(analytics, stop, source=clean_topic), name="analytics"),
    ]
    app = create_app(load_ingest_settings(**settings.model_dump()))
    try:
        async with TestServer(app, host="127.0.0.1") as server, ClientSession() as session:
            registry = app[REGISTRY_KEY]
            async with asyncio.timeout(TIMEOUT):
                while any(registry.authenticate(m.key) is None for m in members.values()):
                    await registry.wait_changed(registry.version, 1)
            system = System(
                settings,
                analytics,
                str(server.make_url("")).rstrip("/"),
                clean_topic,
                status,
                members,
                session,
                tasks,
            )
            async with asyncio.timeout(TIMEOUT):
                while not status.started or status.restoring or not status.assigned:
                    system.check_running()
                    await asyncio.sleep(0.1)
            yield system
    finally:
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=TIMEOUT)
        for task in pending:
            task.cancel()
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


@contextlib.asynccontextmanager
async def collecting(stream: InsightStream) -> AsyncIterator[list[Insight]]:
    """Everything ``stream`` delivers, appended to the yielded list in the background."""
    got: list[Insight] = []

    async def read() -> None:
        async for insight in stream:
            got.append(insight)

    async with stream:
        task = asyncio.create_task(read(), name="sse-reader")
        try:
            yield got
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


async def read_topic(
    settings: XietongSettings, topic: str, keep: Callable[[bytes | None], bool]
) -> list[dict[str, Any]]:
    """Every record of ``topic`` (up to its current end) whose key ``keep`` accepts."""
    found: list[dict[str, Any]] = []
    async with started(create_consumer(settings, None)) as consumer:
        async with started(create_producer(settings)) as producer:
            partitions = sorted(await producer.partitions_for(topic))
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        remaining = {tp for tp in tps if ends[tp] > 0}
        async with asyncio.timeout(TIMEOUT):
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=200)
                for tp, records in batch.items():
                    found += [
                        decode(r.value)
                        for r in records
                        if r.offset < ends[tp] and r.value is not None and keep(r.key)
                    ]
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
    return found


# --------------------------------------------------------------------------- data


def sales(
    tenant: str, at: datetime, quantity: float, unit_price: float, seq: int
) -> dict[str, Any]:
    """A sales order line as a partner sends it (CNY, pieces: the clean values are the same)."""
    return {
        "event_id": str(uuid.uuid4()),
        "tenant": tenant,
        "type": "sales_order_line",
        "schema_version": 1,
        "occurred_at": at.isoformat(),
        "source": {"system": "e2e", "record_id": f"SO-{seq:05d}/1"},
        "payload": {
            "order_id": f"SO-{seq:05d}",
            "line_no": 1,
            "customer_id": "C-7",
            "product_sku": "BOLT-M8",
            "quantity": quantity,
            "unit": "pcs",
            "unit_price": unit_price,
            "currency": "CNY",
        },
    }


def stock(tenant: str, at: datetime, on_hand: float, seq: int) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "tenant": tenant,
        "type": "inventory_level",
        "schema_version": 1,
        "occurred_at": at.isoformat(),
        "source": {"system": "e2e", "record_id": f"INV-{seq:05d}"},
        "payload": {"site_id": "WH-1", "product_sku": "BOLT-M8", "on_hand": on_hand, "unit": "pcs"},
    }


def metrics_of(event: dict[str, Any]) -> dict[str, float]:
    """The metrics the clean service derives from one of the events above."""
    p = event["payload"]
    if event["type"] == "sales_order_line":
        return {
            "sales.quantity": float(p["quantity"]),
            "sales.amount_cny": p["quantity"] * p["unit_price"],
        }
    return {"inventory.on_hand": float(p["on_hand"])}


def csv_rows(events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same events as rows of an ERP export (no event_id column: the gateway derives it)."""
    return [{"occurred_at": e["occurred_at"], **e["payload"]} for e in events]


def csv_body(rows: Sequence[dict[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return out.getvalue().encode()


def observations(events: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per event: tenant, event time (ms) and its metrics (NaN where it has none)."""
    rows = [
        {
            "tenant": e["tenant"],
            "time_ms": int(datetime.fromisoformat(e["occurred_at"]).timestamp() * 1000),
            **metrics_of(e),
        }
        for e in events
    ]
    return pd.DataFrame(rows)


def window_of(time_ms: int, size_s: int) -> int:
    return time_ms - time_ms % (size_s * 1000)


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def close(a: float | None, b: float) -> bool:
    """``a`` (an insight's figure, None for NaN) equals pandas' ``b`` within float tolerance."""
    if b is None or (isinstance(b, float) and math.isnan(b)):
        return a is None
    return a is not None and bool(np.isclose(a, b, rtol=1e-9, atol=1e-9))


def at_minutes(start: datetime, minutes: float) -> datetime:
    return start + timedelta(minutes=minutes)
