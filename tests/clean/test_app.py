"""The clean hop against the real local Kafka broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas.events import CleanEvent
from schemas.insights import DeadLetter
from schemas.reference import FxRate
from schemas.topics import dlq
from services.clean.app import HopStatus, run_clean
from services.clean.handlers import REROUTED_HEADER, CleanRules, CleanState
from services.clean.settings import CleanSettings, load_clean_settings
from shared.codec import decode, encode
from shared.kafka import (
    BatchPublisher,
    KafkaHealth,
    OutRecord,
    connection_config,
    create_consumer,
    create_producer,
    ensure_topics,
    partition_of,
    started,
)
from shared.rates import RatesReader, demo_rates, publish_rates
from shared.settings import XietongSettings
from tests.factories import sales_event
from tests.kafka_helpers import read_records

pytestmark = pytest.mark.integration

TENANTS = ("acme", "bolt-works", "zhongshan_steel", "delta")


@pytest.fixture
async def clean_settings(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> CleanSettings:
    """The hop's settings, with a rates topic of the test's own holding the demo's rates."""
    rates_topic = unique_name("rates")
    await publish_rates(settings, demo_rates(), rates_topic)
    return load_clean_settings(
        **{
            **settings.model_dump(),
            "kafka_fetch_max_records": 100,
            "clean_rates_topic": rates_topic,
        }
    )


@pytest.fixture
def topics(unique_name: Callable[[str], str]) -> tuple[str, str]:
    return unique_name("raw"), unique_name("clean")


async def publish(settings: XietongSettings, topic: str, events: list[Any]) -> None:
    """Publish dicts (encoded) or raw bytes, keyed by tenant, as ingest does."""
    records = []
    for event in events:
        if isinstance(event, bytes):
            records.append(OutRecord(b"acme", event))
        else:
            records.append(OutRecord(event["tenant"].encode(), encode(event)))
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(topic, records)


async def total_records(settings: XietongSettings, topic: str) -> int:
    async with started(create_consumer(settings, None)) as consumer:
        tps = [TopicPartition(topic, p) for p in await partitions(consumer, topic)]
        ends = await consumer.end_offsets(tps)
        begins = await consumer.beginning_offsets(tps)
    return sum(ends[tp] - begins[tp] for tp in tps)


async def partitions(consumer: AIOKafkaConsumer, topic: str) -> list[int]:
    async with asyncio.timeout(10):
        while True:
            found = consumer.partitions_for_topic(topic)
            if found:
                return sorted(found)
            await consumer._client.force_metadata_update()  # a topic just created


class Hop:
    """A clean hop running in a task; ``await hop.stop()`` drains, commits and returns."""

    def __init__(self, settings: CleanSettings, source: str, target: str, group: str) -> None:
        self.stop_event = asyncio.Event()
        self.status = HopStatus()
        self.task = asyncio.create_task(
            run_clean(
                settings,
                self.stop_event,
                source=source,
                target=target,
                group_id=group,
                status=self.status,
            )
        )

    async def until(self, condition: Callable[[HopStatus], bool], timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not condition(self.status):
                if self.task.done():
                    self.task.result()
                    raise AssertionError("the hop stopped")
                await asyncio.sleep(0.05)

    async def stop(self) -> HopStatus:
        self.stop_event.set()
        return await asyncio.wait_for(self.task, 30)


def by_id(records: list[ConsumerRecord[bytes, bytes]]) -> dict[str, CleanEvent]:
    events = [CleanEvent.model_validate_json(record.value) for record in records]
    return {str(event.event_id): event for event in events}


async def test_events_come_out_clean_with_canonical_values_and_metrics(
    clean_settings: CleanSettings, topics: tuple[str, str]
) -> None:
    raw, clean = topics
    await ensure_topics(clean_settings, [raw])
    dollars_per_tonne = sales_event(
        "acme", seq=1, quantity=2, unit_price=500, unit="t", currency="USD"
    )
    no_region = sales_event("acme", seq=2, quantity=3, unit_price=10)
    no_price = sales_event("bolt-works", seq=3, quantity=4, unit_price=None)
    carried = sales_event("acme", seq=4, quantity=1, unit_price=None, unit="kg")
    shanghai = sales_event("bolt-works", seq=5, quantity=5, unit_price=2, occurred_at=None)
    shanghai["occurred_at"] = "2026-11-01T16:00:00+08:00"
    events = [dollars_per_tonne, no_region, no_price, carried, shanghai]
    await publish(clean_settings, raw, events)

    hop = Hop(clean_settings, raw, clean, f"clean-{uuid.uuid4().hex[:8]}")
    try:
        got = by_id(await read_records(clean_settings, clean, len(events)))
    finally:
        status = await hop.stop()

    assert set(got) == {e["event_id"] for e in events}
    first = got[dollars_per_tonne["event_id"]]
    assert first.payload["unit"] == "kg" and first.payload["quantity"] == 2000
    assert first.payload["currency"] == "CNY"
    assert first.payload["unit_price"] == "3.55"  # 500 USD/t x 7.10 / 1000, exactly
    assert first.amounts == {"sales.amount_cny": "7100"}
    assert first.metrics == {"sales.quantity": 2000, "sales.amount_cny": 7100}
    assert [(c.field, c.rate, c.rate_source) for c in first.conversions] == [
        ("unit_price", "7.1", "demo seed (not a reference rate)")
    ]
    assert set(first.quality.converted) == {"unit", "quantity", "unit_price", "currency"}
    assert first.quality.filled == ["region"]  # the factory leaves region out

    assert got[no_region["event_id"]].payload["region"] == "unknown"
    assert "region" in got[no_region["event_id"]].quality.filled

    no_price_out = got[no_price["event_id"]]  # nothing to carry forward yet for this tenant
    assert (
        no_price_out.payload["unit_price"] is None
        and "sales.amount_cny" not in no_price_out.metrics
    )

    carried_out = got[carried["event_id"]]  # the tenant's last price of the SKU, in CNY per kg
    assert carried_out.payload["unit_price"] == "3.55"
    assert "unit_price" in carried_out.quality.filled
    assert carried_out.amounts["sales.amount_cny"] == "3.55"

    utc = got[shanghai["event_id"]]
    assert utc.occurred_at.isoformat() == "2026-11-01T08:00:00+00:00"
    assert "occurred_at" in utc.quality.converted
    assert status.records_in == len(events) and status.records_out == len(events)


async def test_an_event_id_published_twice_comes_out_once(
    clean_settings: CleanSettings, topics: tuple[str, str]
) -> None:
    raw, clean = topics
    await ensure_topics(clean_settings, [raw])
    events = [sales_event(TENANTS[i % 4], seq=i) for i in range(300)]
    retried = events[::3]
    await publish(clean_settings, raw, events[:150] + retried + events[150:] + retried)

    hop = Hop(clean_settings, raw, clean, f"clean-{uuid.uuid4().hex[:8]}")
    try:
        await hop.until(lambda s: s.records_in == len(events) + 2 * len(retried))
    finally:
        status = await hop.stop()

    assert status.duplicates == 2 * len(retried)
    assert await total_records(clean_settings, clean) == len(events)
    got = by_id(await read_records(clean_settings, clean, len(events)))
    assert set(got) == {e["event_id"] for e in events}


async def test_a_restart_mid_stream_neither_loses_nor_double_counts(
    clean_settings: CleanSettings, topics: tuple[str, str]
) -> None:
    raw, clean = topics
    await ensure_topics(clean_settings, [raw])
    group = f"clean-{uuid.uuid4().hex[:8]}"
    first = [sales_event(TENANTS[i % 4], seq=i) for i in range(1200)]
    second = [sales_event(TENANTS[i % 4], seq=i) for i in range(1200, 2000)]
    await publish(clean_settings, raw, first)

    hop = Hop(clean_settings, raw, clean, group)
    try:
        await hop.until(lambda s: s.batches >= 3)
    finally:
        stopped = await hop.stop()
    assert 0 < stopped.records_in <= len(first)

    await publish(clean_settings, raw, second + first[:100])  # and a client retrying some
    hop = Hop(clean_settings, raw, clean, group)
    try:
        await hop.until(lambda s: s.records_out + stopped.records_out >= len(first) + len(second))
        await hop.until(lambda s: s.duplicates >= 100)
    finally:
        await hop.stop()

    assert await total_records(clean_settings, clean) == len(first) + len(second)
    got = by_id(await read_records(clean_settings, clean, len(first) + len(second)))
    assert set(got) == {e["event_id"] for e in first + second}


async def test_a_crash_between_publish_and_commit_creates_no_duplicates(
    clean_settings: CleanSettings, topics: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first worker publishes everything but never commits (as if it died each time just
    before committing); the second reads the whole raw topic again and must emit nothing new."""
    raw, clean = topics
    await ensure_topics(clean_settings, [raw])
    group = f"clean-{uuid.uuid4().hex[:8]}"
    events = [sales_event(TENANTS[i % 4], seq=i, quantity=1 + i % 7) for i in range(600)]
    await publish(clean_settings, raw, events)

    async def no_commit(self: AIOKafkaConsumer, offsets: Any = None) -> None:
        return None

    with monkeypatch.context() as patch:
        patch.setattr(AIOKafkaConsumer, "commit", no_commit)
        hop = Hop(clean_settings, raw, clean, group)
        try:
            await hop.until(lambda s: s.records_out == len(events))
        finally:
            await hop.stop()

    hop = Hop(clean_settings, raw, clean, group)  # the same disk: the ids are on it
    try:
        await hop.until(lambda s: s.records_in == len(events))
    finally:
        status = await hop.stop()
    assert status.restored == 0
    assert status.duplicates == len(events) and status.records_out == 0
    assert await total_records(clean_settings, clean) == len(events)


async def test_a_worker_with_a_new_disk_rebuilds_its_state_from_the_clean_topic(
    clean_settings: CleanSettings, topics: tuple[str, str], tmp_path: Path
) -> None:
    """As above, but the second worker's state dir is empty (a new machine, a lost disk)."""
    raw, clean = topics
    await ensure_topics(clean_settings, [raw])
    group = f"clean-{uuid.uuid4().hex[:8]}"
    events = [sales_event(TENANTS[i % 4], seq=i, quantity=1 + i % 7) for i in range(600)]
    await publish(clean_settings, raw, events)

    async def no_commit(self: AIOKafkaConsumer, offsets: Any = None) -> None:
        return None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AIOKafkaConsumer, "commit", no_commit)
        hop = Hop(clean_settings, raw, clean, group)
        try:
            await hop.until(lambda s: s.records_out == len(events))
        finally:
            await hop.stop()

    new_disk = clean_settings.model_copy(update={"state_dir": str(tmp_path / "new-disk")})
    hop = Hop(new_disk, raw, clean, group)
    try:
        await hop.until(lambda s: s.records_in == len(events))
    finally:
        status = await hop.stop()
    assert status.restored == len(events)
    assert status.duplicates == len(events) and status.records_out == 0
    assert await total_records(clean_settings, clean) == len(events)


async def test_a_store_left_behind_is_caught_up_with_what_another_worker_cleaned_since(
    clean_settings: CleanSettings, topics: tuple[str, str], tmp_path: Path
) -> None:
    """Worker A cleans, stops; worker B (another disk) cleans more; A starts again on its old
    store: it reads back only B's records, and knows every id."""
    raw, clean = topics
    await ensure_topics(clean_settings, [raw])
    group = f"clean-{uuid.uuid4().hex[:8]}"
    events = [sales_event(TENANTS[i % 4], seq=i) for i in range(600)]
    elsewhere = clean_settings.model_copy(update={"state_dir": str(tmp_path / "b")})

    async def clean_on(settings: CleanSettings, chunk: list[dict[str, Any]]) -> None:
        await publish(clean_settings, raw, chunk)
        hop = Hop(settings, raw, clean, group)
        try:
            await hop.until(lambda s: s.records_out == len(chunk))
        finally:
            await hop.stop()

    await clean_on(clean_settings, events[:300])
    await clean_on(elsewhere, events[300:])

    await publish(clean_settings, raw, events)  # every one again
    hop = Hop(clean_settings, raw, clean, group)
    try:
        await hop.until(lambda s: s.records_in == len(events))
    finally:
        status = await hop.stop()
    assert status.restored == 300  # worker B's records, not the whole topic
    assert status.duplicates == len(events) and status.records_out == 0
    assert await total_records(clean_settings, clean) == len(events)


async def test_a_store_is_not_trusted_against_a_clean_topic_created_again(
    clean_settings: CleanSettings, topics: tuple[str, str], tmp_path: Path
) -> None:
    """A fresh local broker (or a deleted topic) under the same name: the old store's checkpoint
    may lie within the new topic's offsets, but the record below it is another one."""
    raw, clean = topics
    await ensure_topics(clean_settings, [raw])
    await publish(clean_settings, raw, [sales_event(TENANTS[i % 4], seq=i) for i in range(40)])
    hop = Hop(clean_settings, raw, clean, f"clean-{uuid.uuid4().hex[:8]}")
    try:
        await hop.until(lambda s: s.records_out == 40)
    finally:
        await hop.stop()

    admin = AIOKafkaAdminClient(**connection_config(clean_settings))
    await admin.start()
    try:
        await admin.delete_topics([raw, clean, dlq(raw)])
        async with asyncio.timeout(60):
            while True:
                if not {raw, clean} & set(await admin.list_topics()):
                    break
                await asyncio.sleep(0.2)
    finally:
        await admin.close()
    async with asyncio.timeout(60):
        while True:  # the broker may still be finishing the deletion
            try:
                await ensure_topics(clean_settings, [raw])
                break
            except KafkaError:
                await asyncio.sleep(0.5)

    events = [sales_event(TENANTS[i % 4], seq=i) for i in range(200)]
    await publish(clean_settings, raw, events)
    elsewhere = clean_settings.model_copy(update={"state_dir": str(tmp_path / "other")})
    hop = Hop(elsewhere, raw, clean, f"clean-{uuid.uuid4().hex[:8]}")
    try:
        await hop.until(lambda s: s.records_out == len(events))
    finally:
        await hop.stop()

    await publish(clean_settings, raw, events)  # retried: all duplicates
    hop = Hop(clean_settings, raw, clean, f"clean-{uuid.uuid4().hex[:8]}")
    try:
        await hop.until(lambda s: s.records_in == 2 * len(events))
    finally:
        status = await hop.stop()
    assert status.restored == len(events)  # rebuilt, not caught up from the old checkpoint
    assert status.duplicates == 2 * len(events) and status.records_out == 0


async def test_the_same_event_on_two_partitions_is_cleaned_once_on_its_tenants_partition(
    clean_settings: CleanSettings, topics: tuple[str, str]
) -> None:
    """A partner writing to the raw topic itself, with whatever partitioner: the copies of an
    event_id meet on the partition murmur2 of the tenant picks, and only that one is cleaned."""
    raw, clean = topics
    await ensure_topics(clean_settings, [raw])
    events = [sales_event(TENANTS[i % 4], seq=i) for i in range(40)]
    async with started(create_producer(clean_settings)) as producer:
        for event in events:  # each event to two different partitions, explicitly
            home = partition_of(event["tenant"].encode(), 3)
            for partition in (home, (home + 1) % 3):
                await producer.send(
                    raw, encode(event), key=event["tenant"].encode(), partition=partition
                )
            await producer.send(raw, encode(event), key=b"not-the-tenant", partition=home)
        await producer.flush()

    hop = Hop(clean_settings, raw, clean, f"clean-{uuid.uuid4().hex[:8]}")
    try:
        await hop.until(lambda s: s.records_out == len(events) and s.duplicates >= len(events))
        await hop.until(lambda s: s.duplicates == 2 * len(events))  # the re-routed copies too
    finally:
        status = await hop.stop()

    assert status.rerouted == 2 * len(events)
    assert await total_records(clean_settings, clean) == len(events)
    records = await read_records(clean_settings, clean, len(events))
    assert {str(CleanEvent.model_validate_json(r.value).event_id) for r in records} == {
        e["event_id"] for e in events
    }
    assert all(r.partition == partition_of(r.key, 3) for r in records)
    moved = [r for r in await read_records(clean_settings, raw, 5 * len(events))]
    headers = [dict(r.headers) for r in moved if r.headers]
    assert len(headers) == 2 * len(events)
    assert all(h[REROUTED_HEADER].decode().startswith(f"{raw}/") for h in headers)


async def test_an_event_from_a_librdkafka_client_and_from_ours_is_cleaned_once(
    clean_settings: CleanSettings, topics: tuple[str, str]
) -> None:
    """confluent-kafka's default partitioner (consistent_random: crc32 of the key) puts "acme"
    on another partition of three than murmur2 (Java's default and ours) does."""
    from confluent_kafka import Producer

    raw, clean = topics
    await ensure_topics(clean_settings, [raw])
    events = [sales_event("acme", seq=i) for i in range(20)]
    producer = Producer({"bootstrap.servers": clean_settings.kafka_bootstrap_servers})
    delivered: list[int] = []
    for event in events:
        producer.produce(
            raw,
            encode(event),
            key=b"acme",
            on_delivery=lambda error, message: delivered.append(message.partition()),
        )
    assert producer.flush(30) == 0
    assert set(delivered) == {2} and partition_of(b"acme", 3) == 0  # the two disagree
    await publish(clean_settings, raw, events)  # a retry of each through ingest's producer

    hop = Hop(clean_settings, raw, clean, f"clean-{uuid.uuid4().hex[:8]}")
    try:
        await hop.until(lambda s: s.records_out == len(events) and s.duplicates == len(events))
    finally:
        status = await hop.stop()
    assert status.rerouted == len(events)
    assert await total_records(clean_settings, clean) == len(events)


async def test_bad_records_go_to_the_dead_letter_topic_and_the_hop_goes_on(
    clean_settings: CleanSettings, topics: tuple[str, str]
) -> None:
    raw, clean = topics
    await ensure_topics(clean_settings, [raw])
    good_before, good_after = sales_event(seq=1), sales_event(seq=2)
    no_quantity = sales_event(seq=3)
    del no_quantity["payload"]["quantity"]
    unknown_currency = sales_event(seq=4, currency="XAU")
    purchase_without_price = {
        **sales_event(seq=5),
        "type": "purchase_order",
        "payload": {"po_id": "PO-1", "supplier_id": "S-1", "product_sku": "BOLT-M8", "quantity": 5},
    }
    events: list[Any] = [
        good_before,
        b"{not json",
        no_quantity,
        unknown_currency,
        purchase_without_price,
        good_after,
    ]
    await publish(clean_settings, raw, events)

    hop = Hop(clean_settings, raw, clean, f"clean-{uuid.uuid4().hex[:8]}")
    try:
        got = by_id(await read_records(clean_settings, clean, 2))
        letters = [
            DeadLetter.model_validate_json(record.value)
            for record in await read_records(clean_settings, dlq(raw), 4)
        ]
    finally:
        status = await hop.stop()

    assert set(got) == {good_before["event_id"], good_after["event_id"]}
    assert status.dead_letters == 4
    by_offset = {letter.source_offset or 0: letter for letter in letters}
    assert sorted(by_offset) == [1, 2, 3, 4]  # all on one partition: the tenant is the key
    assert all(letter.source_topic == raw and letter.service == "clean" for letter in letters)
    assert by_offset[1].original == "{not json"
    assert any(error.field == "payload.quantity" for error in by_offset[2].errors)
    assert by_offset[3].reason == "no XAU rate on or before 2026-11-01"
    assert decode(by_offset[3].original)["event_id"] == unknown_currency["event_id"]
    assert [error.field for error in by_offset[4].errors] == ["payload.unit_price"]
    assert Counter(letter.tenant for letter in letters) == Counter({"acme": 4})


async def test_workers_joining_and_leaving_the_group_mid_stream_clean_every_event_once(
    clean_settings: CleanSettings, topics: tuple[str, str], tmp_path: Path
) -> None:
    raw, clean = topics
    other_machine = clean_settings.model_copy(update={"state_dir": str(tmp_path / "second")})
    await ensure_topics(clean_settings, [raw])
    group = f"clean-{uuid.uuid4().hex[:8]}"
    tenants = [f"firm-{i}" for i in range(12)]  # spread over the three partitions
    events = [sales_event(tenants[i % 12], seq=i) for i in range(3000)]
    chunks = [events[i : i + 250] for i in range(0, len(events), 250)]

    first = Hop(clean_settings, raw, clean, group)
    second: Hop | None = None
    try:
        for number, chunk in enumerate(chunks):
            await publish(clean_settings, raw, chunk + chunks[max(0, number - 1)][:20])  # retries
            if number == 3:
                second = Hop(other_machine, raw, clean, group)  # the group rebalances
            if number == 7:
                await first.stop()  # and again: the second worker takes every partition
            await asyncio.sleep(0.1)
        assert second is not None
        async with asyncio.timeout(60):
            while True:
                if await total_records(clean_settings, clean) >= len(events):
                    break
                await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # anything extra would have arrived by now
    finally:
        if not first.task.done():
            await first.stop()
        if second is not None:
            await second.stop()

    assert second.status.restored > 0
    assert await total_records(clean_settings, clean) == len(events)
    got = by_id(await read_records(clean_settings, clean, len(events)))
    assert set(got) == {e["event_id"] for e in events}


@pytest.mark.parametrize("disk", ["kept", "new"])
async def test_carry_forward_and_outlier_history_survive_a_restart(
    clean_settings: CleanSettings, topics: tuple[str, str], tmp_path: Path, disk: str
) -> None:
    """Kept on the store's disk, or rebuilt from the clean topic when the disk is new."""
    raw, clean = topics
    await ensure_topics(clean_settings, [raw])
    group = f"clean-{uuid.uuid4().hex[:8]}"
    history = [sales_event("acme", seq=i, quantity=10 + i % 3, unit_price=6.0) for i in range(30)]
    await publish(clean_settings, raw, history)
    hop = Hop(clean_settings, raw, clean, group)
    try:
        await hop.until(lambda s: s.records_out == len(history))
    finally:
        await hop.stop()

    unpriced_spike = sales_event("acme", seq=30, quantity=500, unit_price=None)
    await publish(clean_settings, raw, [unpriced_spike])
    restarted = clean_settings
    if disk == "new":
        restarted = clean_settings.model_copy(update={"state_dir": str(tmp_path / "new")})
    hop = Hop(restarted, raw, clean, group)
    try:
        await hop.until(lambda s: s.records_out == 1)
    finally:
        status = await hop.stop()

    assert status.restored == (len(history) if disk == "new" else 0)
    got = by_id(await read_records(clean_settings, clean, len(history) + 1))
    after = got[unpriced_spike["event_id"]]
    assert after.payload["unit_price"] == "6" and "unit_price" in after.quality.filled
    assert after.quality.outliers == ["sales.quantity", "sales.amount_cny"]


async def test_money_stays_exact_and_each_event_gets_the_rate_of_its_date(
    clean_settings: CleanSettings, topics: tuple[str, str], unique_name: Callable[[str], str]
) -> None:
    """Against the broker: dated EUR rates published on the rates topic, one of them while the
    hop runs; a 20-digit price read exactly; no rate on or before the date -> dead letter."""
    raw, clean = topics
    rates_topic = unique_name("rates")  # no demo rates: EUR has only the two below
    clean_settings = clean_settings.model_copy(update={"clean_rates_topic": rates_topic})
    await ensure_topics(clean_settings, [raw])
    eur = [
        FxRate(currency="EUR", date=day, cny_per_unit=rate, source="PBOC central parity")  # type: ignore[arg-type]
        for day, rate in (("2026-11-29", "7.6512"), ("2026-11-30", "7.7012"))
    ]
    await publish_rates(clean_settings, eur[:1], rates_topic)

    def euro_sale(seq: int, day: str, price: Any = 0.1) -> dict[str, Any]:
        sale = sales_event("acme", seq=seq, quantity=3, unit_price=price, currency="GBP")
        sale["payload"]["currency"] = "EUR"
        sale["occurred_at"] = f"{day}T10:00:00+00:00"
        return sale

    on_29 = euro_sale(1, "2026-11-29")
    exact = sales_event("acme", seq=2, quantity=2, unit_price=1.0)
    long_price = encode(exact).replace(
        b'"unit_price":1.0', b'"unit_price":12345678901234567890.123456789'
    )
    hop = Hop(clean_settings, raw, clean, f"clean-{uuid.uuid4().hex[:8]}")
    try:
        await publish(clean_settings, raw, [on_29, long_price])
        await hop.until(lambda s: s.records_out == 2)
        await publish_rates(clean_settings, eur[1:], rates_topic)  # while the hop runs
        on_30 = euro_sale(3, "2026-11-30")
        too_early = euro_sale(4, "2026-11-28")
        await publish(clean_settings, raw, [on_30, too_early])
        await hop.until(lambda s: s.records_out == 3 and s.dead_letters == 1)
    finally:
        await hop.stop()

    got = by_id(await read_records(clean_settings, clean, 3))
    first, second = got[on_29["event_id"]], got[on_30["event_id"]]
    assert [(c.rate, c.rate_date.isoformat()) for c in first.conversions] == [
        ("7.6512", "2026-11-29")
    ]
    assert [(c.rate, c.rate_date.isoformat()) for c in second.conversions] == [
        ("7.7012", "2026-11-30")
    ]
    assert first.amounts["sales.amount_cny"] == "2.29536"  # 3 x 0.1 x 7.6512, no rounding
    assert second.amounts["sales.amount_cny"] == "2.31036"
    long = got[exact["event_id"]]
    assert long.payload["unit_price"] == "12345678901234567890.123456789"
    assert long.amounts["sales.amount_cny"] == "24691357802469135780.246913578"

    (letter,) = [
        DeadLetter.model_validate_json(r.value)
        for r in await read_records(clean_settings, dlq(raw), 1)
    ]
    assert letter.reason == "no EUR rate on or before 2026-11-28"
    assert decode(letter.original)["event_id"] == too_early["event_id"]


async def test_a_batch_in_hand_waits_out_unreadable_rates_and_says_so(
    clean_settings: CleanSettings, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    # Before: a batch naming a foreign currency waited 30 s for the rates topic, then raised,
    # and clean stopped ("stopping without commit"): an outage with such a batch in hand ended
    # the service. Now it waits as long as it takes, readiness saying why, then goes on.
    rates_topic = unique_name("rates")
    reader = RatesReader(clean_settings, rates_topic)
    await reader.start()
    await reader.stop()  # as when the broker is away: the reader can confirm nothing
    rate = FxRate(currency="EUR", date="2026-11-29", cny_per_unit="7.6512", source="PBOC")  # type: ignore[arg-type]
    await publish_rates(clean_settings, [rate], rates_topic)
    state = CleanState(CleanRules.from_settings(clean_settings), tmp_path, partitions=1)
    state.follow_rates(reader)
    health = KafkaHealth.of(clean_settings)
    sale = sales_event("acme", seq=1)
    sale["payload"]["currency"] = "EUR"
    record = ConsumerRecord(
        "raw", 0, 0, int(time.time() * 1000), 0, b"acme", encode(sale), None, 0, 0, []
    )
    waiting = asyncio.create_task(
        state.rates_caught_up({"raw": [record]}, health=health, attempt_seconds=0.2)
    )
    try:
        await asyncio.sleep(2)
        assert not waiting.done()
        assert health.trouble is not None
        await reader.start()  # the broker is back
        async with asyncio.timeout(30):
            await waiting
        assert state.rates.rate_for("EUR", date(2026, 11, 29)) is not None
    finally:
        waiting.cancel()
        await reader.stop()
        state.close()
