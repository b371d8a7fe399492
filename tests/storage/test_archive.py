"""The archive against the real broker and both real S3 stores: every record in exactly one
object, in the store its labels say, checked against its manifest — also after a hard stop in
the middle — and what cannot be archived in the dead-letter topic."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from schemas.topics import dlq
from services.storage.archive import ArchiveStatus, run_archive
from services.storage.objects import ArchiveMismatch, Manifest, manifest_key
from services.storage.placement import Policy
from services.storage.reader import ArchiveReader
from services.storage.settings import StorageSettings
from services.storage.stores import Store, open_stores
from shared.codec import decode, encode
from shared.kafka import (
    BatchPublisher,
    OutRecord,
    create_consumer,
    create_producer,
    ensure_topics,
    started,
)

pytestmark = pytest.mark.integration

START = datetime(2026, 11, 1, 8, tzinfo=UTC)


def clean_event(tenant: str, n: int, kind: str = "sales_order_line", late: bool = False) -> bytes:
    moment = START + timedelta(minutes=n) - (timedelta(days=1) if late else timedelta())
    return encode(
        {
            "event_id": f"00000000-0000-4000-8000-{n:012d}",
            "tenant": tenant,
            "type": kind,
            "schema_version": 1,
            "occurred_at": moment.isoformat(),
            "payload": {"n": n},
            "metrics": {},
        }
    )


def records(count: int) -> list[OutRecord]:
    out = []
    for n in range(count):
        tenant = ["acme", "bolt", "cogs"][n % 3]
        kind = "text_document" if n % 10 == 0 else "sales_order_line"
        out.append(
            OutRecord(
                tenant.encode(),
                clean_event(tenant, n, kind, late=n % 20 == 7),
                (("xietong-test", str(n).encode()),),
            )
        )
    return out


async def archived(stores: dict[str, Store], topic: str) -> dict[str, list[tuple[str, Manifest]]]:
    """Every manifest of ``topic`` per store."""
    reader = ArchiveReader(stores)
    out: dict[str, list[tuple[str, Manifest]]] = {}
    for found in await reader.all_manifests(f"{topic}/"):
        out.setdefault(found.store.name, []).append((found.manifest.key, found.manifest))
    return out


async def held_offsets(stores: dict[str, Store], topic: str) -> Counter[tuple[int, int]]:
    reader = ArchiveReader(stores)
    held: Counter[tuple[int, int]] = Counter()
    for found in await reader.all_manifests(f"{topic}/"):
        for record in await reader.records(found):
            held[(found.manifest.partition, record.offset)] += 1
    return held


async def until(check: Callable[[], object], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not await check():  # type: ignore[misc]  # noqa: ASYNC110 - polling S3
            await asyncio.sleep(0.2)


async def produce(settings: StorageSettings, topic: str, items: list[OutRecord]) -> None:
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(topic, items)


async def test_every_record_lands_once_in_its_store_with_a_matching_manifest(
    storage_settings: StorageSettings, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("events.clean")
    await ensure_topics(storage_settings, [topic, dlq(topic)])
    items = records(300)
    bad = OutRecord(b"acme", b"not json at all")
    await produce(storage_settings, topic, [*items[:150], bad, *items[150:]])
    policy = Policy.load(storage_settings.storage_policy_file)
    async with open_stores(storage_settings) as stores:
        stop = asyncio.Event()
        status = ArchiveStatus()
        async with started(create_producer(storage_settings)) as producer:
            task = asyncio.create_task(
                run_archive(
                    storage_settings,
                    stores,
                    policy,
                    stop,
                    topics=[topic],
                    status=status,
                    publisher=BatchPublisher(producer),
                )
            )

            async def all_there() -> bool:
                assert not task.done() or task.exception() is None
                return sum((await held_offsets(stores, topic)).values()) >= 300

            await until(all_there)
            stop.set()
            await task
        held = await held_offsets(stores, topic)
        assert len(held) == 300 and set(held.values()) == {1}
        by_store = await archived(stores, topic)
        for store_name, manifests in by_store.items():
            for key, manifest in manifests:
                assert manifest.store == store_name
                assert key.startswith(
                    f"{topic}/tenant={manifest.tenant}/date={manifest.date}/"
                    f"partition={manifest.partition}/"
                )
                assert key.endswith(f"/{manifest.first_offset:020d}.parquet")
                assert manifest.record_count == sum(b - a + 1 for a, b in manifest.offsets)
                if "text_document" in manifest.kinds:
                    assert store_name == "private"
                    assert manifest.rule == "personal-or-china-resident-stays-private"
                    assert manifest.labels["sensitivity"] == "personal"
                else:
                    assert store_name == "public"
        assert {"public", "private"} <= set(by_store)
        assert any(m.lane == "late" for _, m in by_store["public"])
        # a replay would restore the headers and values bit for bit
        reader = ArchiveReader(stores)
        found = (await reader.all_manifests(f"{topic}/"))[0]
        first = (await reader.records(found))[0]
        assert first.headers[0][0] == "xietong-test"
        assert decode(first.value)["tenant"] == found.manifest.tenant
        # an object that does not match its manifest is refused, not read
        store = stores[found.manifest.store]
        await store.put(found.manifest.key, b"tampered")
        with pytest.raises(ArchiveMismatch):
            await reader.records(found)
        assert await store.get_or_none(manifest_key(found.manifest.key)) is not None
    consumer = create_consumer(storage_settings, None)
    async with started(consumer):
        consumer.subscribe([dlq(topic)])
        letters = []
        async with asyncio.timeout(30):
            while not letters:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    letters += [decode(r.value) for r in batch]
    assert letters[0]["original"] == "not json at all"
    assert letters[0]["reason"].startswith("not archivable")
    assert status.dead_letters == 1


async def test_a_hard_stop_mid_archive_then_a_restart_leaves_no_duplicate_and_no_gap(
    storage_settings: StorageSettings, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("events.clean")
    await ensure_topics(storage_settings, [topic, dlq(topic)])
    policy = Policy.load(storage_settings.storage_policy_file)
    items = records(600)
    async with (
        open_stores(storage_settings) as stores,
        started(create_producer(storage_settings)) as producer,
    ):
        publisher = BatchPublisher(producer)

        async def archive_for_a_while(feed: list[OutRecord]) -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(
                run_archive(
                    storage_settings, stores, policy, stop, topics=[topic], publisher=publisher
                )
            )
            for start in range(0, len(feed), 50):
                await produce(storage_settings, topic, feed[start : start + 50])
                await asyncio.sleep(0.3)  # time-based flushes happen in between
            task.cancel()  # a crash: no final flush, no final commit
            with contextlib.suppress(asyncio.CancelledError):
                await task

        await archive_for_a_while(items[:300])
        await archive_for_a_while(items[300:])
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_archive(storage_settings, stores, policy, stop, topics=[topic], publisher=publisher)
        )

        async def complete() -> bool:
            return len(await held_offsets(stores, topic)) >= 600

        await until(complete)
        stop.set()
        await task
        held = await held_offsets(stores, topic)
    assert len(held) == 600
    assert set(held.values()) == {1}, "a record archived twice"
