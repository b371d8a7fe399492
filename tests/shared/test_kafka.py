"""The shared producer and consumer helpers against the real local Kafka broker."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable

import pytest

from schemas.topics import dlq
from shared.codec import decode, encode
from shared.deadletter import dead_letter_record, split_valid_events
from shared.kafka import (
    Batch,
    BatchPublisher,
    OutRecord,
    create_consumer,
    create_producer,
    ensure_topics,
    run_batch_loop,
    started,
)
from shared.settings import XietongSettings
from tests.factories import sales_event

pytestmark = pytest.mark.integration


async def consume_all(
    settings: XietongSettings, topic: str, count: int, group: str | None = None
) -> list:
    """Read ``count`` records of ``topic`` from the beginning (fails after 30 s)."""
    got: list = []
    async with started(create_consumer(settings, group, topic)) as consumer:
        async with asyncio.timeout(30):
            while len(got) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    got.extend(records)
    return got


async def test_envelopes_come_back_through_a_consumer_group_in_order_per_tenant(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("events")
    await ensure_topics(settings, [topic])
    tenants = ["acme", "bolt-works", "zhongshan_steel"]
    sent = [sales_event(tenant, seq=i) for i in range(200) for tenant in tenants]
    async with started(create_producer(settings)) as producer:
        published = await BatchPublisher(producer).publish(
            topic, [OutRecord(e["tenant"].encode(), encode(e)) for e in sent]
        )
    assert published == len(sent)

    records = await consume_all(settings, topic, len(sent), group=unique_name("group"))
    by_tenant: dict[str, list[str]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for record in records:
        event = decode(record.value)
        assert record.key == event["tenant"].encode()
        by_tenant[event["tenant"]].append(event["event_id"])
        partitions[event["tenant"]].add(record.partition)
    for tenant in tenants:
        assert by_tenant[tenant] == [e["event_id"] for e in sent if e["tenant"] == tenant]
        assert len(partitions[tenant]) == 1  # the key is the tenant: one partition per firm


async def test_a_malformed_message_goes_to_its_dead_letter_topic_and_the_consumer_goes_on(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    source, output = unique_name("events"), unique_name("checked")
    await ensure_topics(settings, [source, output, dlq(source)])
    good_before, good_after = sales_event(seq=1), sales_event(seq=2)
    missing_quantity = sales_event(seq=3)
    del missing_quantity["payload"]["quantity"]
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(
            source,
            [
                OutRecord(b"acme", encode(good_before)),
                OutRecord(b"acme", b"{not json"),
                OutRecord(b"acme", encode(missing_quantity)),
                OutRecord(b"acme", encode(good_after)),
            ],
        )

        publisher = BatchPublisher(producer)
        stop = asyncio.Event()
        handled = 0

        async def handle(batch: Batch) -> None:
            nonlocal handled
            records = [r for rs in batch.values() for r in rs]
            good, bad = split_valid_events(records, service="test")
            await publisher.publish_many(
                {
                    output: [OutRecord(r.key, r.value) for r, _ in good],
                    dlq(source): [dead_letter_record(letter) for letter in bad],
                }
            )
            handled += len(records)
            if handled >= 4:
                stop.set()

        async with started(create_consumer(settings, unique_name("group"), source)) as consumer:
            await asyncio.wait_for(
                run_batch_loop(consumer, handle, stop, max_records=100, timeout_ms=100), 30
            )

    passed = [decode(r.value)["event_id"] for r in await consume_all(settings, output, 2)]
    assert passed == [good_before["event_id"], good_after["event_id"]]
    letters = [decode(r.value) for r in await consume_all(settings, dlq(source), 2)]
    assert letters[0]["original"] == "{not json"
    assert letters[0]["source_topic"] == source and letters[0]["source_offset"] == 1
    assert "quantity" in {e["field"] for e in letters[1]["errors"]} or any(
        e["field"] == "payload.quantity" for e in letters[1]["errors"]
    )
    assert letters[1]["source_offset"] == 2 and letters[1]["tenant"] == "acme"


async def test_committed_offsets_resume_where_the_group_stopped(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    topic, group = unique_name("events"), unique_name("group")
    await ensure_topics(settings, [topic], partitions=1)
    events = [sales_event(seq=i) for i in range(10)]
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(
            topic, [OutRecord(b"acme", encode(e)) for e in events[:6]]
        )

    async def handle_one_batch(batch: Batch) -> None:
        stop.set()

    stop = asyncio.Event()
    async with started(create_consumer(settings, group, topic)) as consumer:
        await asyncio.wait_for(
            run_batch_loop(consumer, handle_one_batch, stop, max_records=6, timeout_ms=200), 30
        )

    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(
            topic, [OutRecord(b"acme", encode(e)) for e in events[6:]]
        )
    rest = await consume_all(settings, topic, 4, group=group)
    assert [decode(r.value)["event_id"] for r in rest] == [e["event_id"] for e in events[6:]]
