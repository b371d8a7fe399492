"""The events every row measures with, and the topics they sit in.

Events follow the real contract (``sales_order_line`` v1, as a partner publishes them), about
370 bytes each as compact JSON, spread over several tenants so that they land on every
partition. Every repeat gets fresh event ids (cleaning de-duplicates on them) but both sides of
a pair read byte-identical records from two topics filled the same way.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from shared.kafka import BatchPublisher, OutRecord, connection_config, create_producer, started
from shared.settings import XietongSettings

TENANTS = (
    "acme",
    "bolt-works",
    "zhongshan_steel",
    "delta-gears",
    "hangzhou_textile",
    "nordic-pumps",
    "suzhou_chips",
    "ruhr-castings",
)
SKUS = ("BOLT-M8", "NUT-M8", "GEAR-42", "PUMP-7", "CHIP-A3")
_EPOCH = datetime(2026, 11, 1, 8, 0, tzinfo=UTC)


def sales_event(seq: int) -> dict[str, Any]:
    """One valid ``sales_order_line`` event; one in twenty lacks its unit price (fill policy)."""
    tenant = TENANTS[seq % len(TENANTS)]
    order = f"SO-{seq:07d}"
    return {
        "event_id": str(uuid.uuid4()),
        "tenant": tenant,
        "type": "sales_order_line",
        "schema_version": 1,
        "occurred_at": (_EPOCH + timedelta(seconds=seq)).isoformat(),
        "source": {"system": "erp", "record_id": f"{order}/1"},
        "payload": {
            "order_id": order,
            "line_no": 1,
            "customer_id": f"C-{seq % 97:03d}",
            "product_sku": SKUS[seq % len(SKUS)],
            "quantity": float(1 + seq % 40),
            "unit": "pcs",
            "unit_price": None if seq % 20 == 19 else round(2.5 + (seq % 13) * 0.75, 2),
            "currency": "CNY",
        },
    }


def make_events(count: int) -> list[dict[str, Any]]:
    return [sales_event(i) for i in range(count)]


def to_records(events: Sequence[dict[str, Any]]) -> list[OutRecord]:
    """Key = tenant (as the platform partitions), value = compact JSON."""
    return [OutRecord(event["tenant"].encode(), orjson.dumps(event)) for event in events]


def unique_topic(prefix: str) -> str:
    return f"bench.{prefix}.t{uuid.uuid4().hex[:10]}.v1"


async def create_topics(
    settings: XietongSettings, names: Sequence[str], *, partitions: int, append_time: bool = True
) -> None:
    """Fresh topics; with ``append_time`` the broker stamps each record when it appends it
    (``LogAppendTime``), which is how every row reads "when the last output was acknowledged"."""
    configs = {"message.timestamp.type": "LogAppendTime"} if append_time else {}
    admin = AIOKafkaAdminClient(**connection_config(settings))
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, partitions, settings.kafka_replication_factor, topic_configs=configs)
                for name in names
            ]
        )
        # Creation returns before the partitions have leaders; a send then would be retried
        # (inside a measurement). Wait until every partition has one.
        async with asyncio.timeout(30):
            while True:
                described = await admin.describe_topics(list(names))
                if all(
                    topic.get("error_code", 0) == 0
                    and len(topic["partitions"]) == partitions
                    and all(p["leader"] >= 0 for p in topic["partitions"])
                    for topic in described
                ):
                    break
                await asyncio.sleep(0.05)
    finally:
        await admin.close()
    # The controller names a leader before that broker serves the partition; a list-offsets
    # request goes to the leader itself and is retried until it answers.
    consumer = AIOKafkaConsumer(**connection_config(settings), enable_auto_commit=False)
    async with started(consumer):
        await consumer._client.force_metadata_update()
        await consumer.end_offsets([TopicPartition(n, p) for n in names for p in range(partitions)])


async def prefill(
    settings: XietongSettings, topics: Sequence[str], records: Sequence[OutRecord]
) -> None:
    """Write the same records into each topic (not measured)."""
    async with started(create_producer(settings)) as producer:
        publisher = BatchPublisher(producer)
        for topic in topics:
            for start in range(0, len(records), 5000):
                await publisher.publish(topic, records[start : start + 5000])
