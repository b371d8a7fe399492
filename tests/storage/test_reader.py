"""Finding archive objects in both real stores: the manifests of the tenants and days asked for,
whatever the range, and no others."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from services.storage.objects import build_object, manifest_key
from services.storage.reader import ArchiveReader
from services.storage.segments import DAY_MS, ArchivedRecord, day_of
from services.storage.settings import StorageSettings
from services.storage.stores import Store, open_stores
from shared.codec import encode

pytestmark = pytest.mark.integration

FIRST = datetime(2026, 10, 30, tzinfo=UTC)
TENANTS = ("acme", "bolt", "cogs", "dyna")
LABELS = {"sensitivity": "internal", "residency": "any", "tenant": "acme", "kind": "sales"}


async def put_object(store: Store, topic: str, tenant: str, day: int, partition: int) -> str:
    """An object (and its manifest) of three records of ``tenant`` at 01:00 on ``day``."""
    at_ms = int(FIRST.timestamp() * 1000) + day * DAY_MS + 3_600_000
    records = [
        ArchivedRecord(
            offset=100 * day + n,
            timestamp_ms=at_ms,
            key=tenant.encode(),
            value=b"{}",
            headers=(),
            tenant=tenant,
            kind="sales_order_line",
            schema_version=1,
            at_ms=at_ms,
        )
        for n in range(3)
    ]
    data, manifest = build_object(
        topic,
        partition,
        "current",
        records,
        labels={**LABELS, "tenant": tenant},
        store=store.name,
        rule="r",
        written_at=FIRST,
    )
    await store.put(manifest.key, data)
    await store.put(manifest_key(manifest.key), encode(manifest))
    return manifest.key


async def test_the_manifests_of_the_tenants_and_days_asked_for(
    storage_settings: StorageSettings, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("events.clean")
    async with open_stores(storage_settings) as stores:
        written: dict[str, tuple[str, str, str]] = {}  # key -> (store, tenant, date)
        jobs = []
        for tenant in TENANTS[:3]:  # dyna has nothing
            for day in range(5):
                # acme in both stores (a day in each), bolt only public, cogs only private
                store = {"acme": ("public", "private")[day % 2], "bolt": "public"}.get(
                    tenant, "private"
                )
                jobs += [(stores[store], tenant, day, partition) for partition in (0, 1)]
        keys = await asyncio.gather(*(put_object(s, topic, t, d, p) for s, t, d, p in jobs))
        first_ms = int(FIRST.timestamp() * 1000)
        for (store, tenant, day, _), key in zip(jobs, keys, strict=True):
            written[key] = (store.name, tenant, day_of(first_ms + day * DAY_MS))
        # an object under the topic that is no tenant's is not a tenant's manifest
        await stores["public"].put(f"{topic}/stray.manifest.json", b"{}")

        reader = ArchiveReader(stores)
        assert await reader.tenants(topic) == {"acme", "bolt", "cogs"}
        assert {f.manifest.key for f in await reader.all_manifests(f"{topic}/")} == set(written)

        def day(n: int, hours: int = 0) -> datetime:
            return FIRST + timedelta(days=n, hours=hours)

        ranges = [
            (None, None),
            (day(2), None),
            (day(2, 23), None),
            (None, day(3)),  # midnight: day 3 is out
            (None, day(3, 1)),
            (day(1, 5), day(3, 1)),
            (day(4), day(4, 1)),
            (day(7), None),
            (None, day(0)),
            (day(3), day(2)),
        ]
        subsets = [TENANTS, ("acme",), ("cogs", "dyna"), ("acme", "bolt", "dyna"), ("nobody",)]
        for tenants in subsets:
            for start, end in ranges:
                first = day_of(int(start.timestamp() * 1000)) if start else ""
                last = day_of(int(end.timestamp() * 1000) - 1) if end else "9999"
                expected = {
                    key
                    for key, (_, tenant, date) in written.items()
                    if tenant in tenants and first <= date <= last
                }
                found = await reader.manifests(topic, tenants, start, end)
                assert {f.manifest.key for f in found} == expected, (tenants, start, end)
                assert len(found) == len(expected)
                for f in found:
                    assert f.store.name == written[f.manifest.key][0] == f.manifest.store
