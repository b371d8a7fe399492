"""Durable insight history (archive + live tail, paging, the one sharing rule) and replay
(manifests checked, partitions, order and headers kept, limited to what an agreement allows)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from schemas.control import Grant
from schemas.insights import Insight
from services.storage.app import create_app
from services.storage.archive import run_archive
from services.storage.placement import Policy
from services.storage.reader import ArchiveReader
from services.storage.replay import replay
from services.storage.settings import StorageSettings
from services.storage.stores import open_stores
from shared.codec import decode, encode
from shared.control import new_id
from shared.httpauth import REGISTRY_KEY
from shared.kafka import (
    BatchPublisher,
    OutRecord,
    create_consumer,
    create_producer,
    ensure_topics,
    started,
)
from tests.insight_helpers import benchmark, network, statistics

pytestmark = pytest.mark.integration


async def publish(settings: StorageSettings, topic: str, insights: list[Insight]) -> None:
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(
            topic,
            [
                OutRecord(i.tenant.encode(), encode(i), (("xietong-origin", b"test"),))
                for i in insights
            ],
        )


async def test_history_pages_through_archive_and_tail_and_replay_backfills_a_grantee(
    storage_settings: StorageSettings, unique_name: Callable[[str], str]
) -> None:
    topics = {
        "statistics": unique_name("insights.statistics"),
        "benchmark": unique_name("insights.benchmarks"),
    }
    settings = storage_settings.model_copy(
        update={"storage_insight_topics": topics, "storage_topics": list(topics.values())}
    )
    await ensure_topics(settings, topics.values())
    async with network(settings) as net:
        a, b, bank = net.a, net.b, net.bank
        archived_stats = [statistics(a, f"m{i}", mean=i) for i in range(3)]
        others = [statistics(b, "m0"), statistics(b, "m1")]
        await publish(settings, topics["statistics"], archived_stats + others)
        await publish(settings, topics["benchmark"], [benchmark("sales.amount_cny")])
        policy = Policy.load(settings.storage_policy_file)
        async with open_stores(settings) as stores, started(create_producer(settings)) as producer:
            stop = asyncio.Event()
            task = asyncio.create_task(
                run_archive(settings, stores, policy, stop, publisher=BatchPublisher(producer))
            )
            reader = ArchiveReader(stores)
            async with asyncio.timeout(60):
                while True:
                    found = await reader.all_manifests()
                    if sum(f.manifest.record_count for f in found) >= 6:
                        break
                    await asyncio.sleep(0.2)
            stop.set()
            await task
        tail = [statistics(a, "late", mean=9.0), statistics(b, "late")]
        await publish(settings, topics["statistics"], tail)  # not archived: the live tail
        grant = Grant(
            grant_id=new_id(),
            owner=a,
            grantee=bank,
            insight_types=["statistics"],
            created_at=datetime.now(UTC),
        )
        await net.writer.put_grant(grant)

        app = create_app(settings.model_copy(update={"storage_archive": False}))
        async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
            url = str(server.make_url("")).rstrip("/")
            async with asyncio.timeout(30):
                while grant.grant_id not in app[REGISTRY_KEY].grants:
                    await app[REGISTRY_KEY].wait_changed(app[REGISTRY_KEY].version, 1)

            async def history(tenant: str, **query: str) -> list[dict[str, Any]]:
                out: list[dict[str, Any]] = []
                cursor = None
                while True:
                    params = {**query, **({"cursor": cursor} if cursor else {})}
                    async with http.get(
                        url + "/v1/insights/history",
                        params=params,
                        headers={"X-Api-Key": net.keys[tenant]},
                    ) as response:
                        assert response.status == 200, await response.text()
                        page = await response.json()
                    out += page["insights"]
                    cursor = page["next_cursor"]
                    if not cursor:
                        return out

            mine = await history(a, limit="2")
            ids = [i["insight_id"] for i in mine]
            assert len(ids) == len(set(ids)) == 5  # 3 archived + 1 tail + the benchmark
            assert {i["tenant"] for i in mine} == {a, "network"}
            granted = await history(bank, type="statistics", limit="3")
            assert {i["tenant"] for i in granted} == {a}
            assert len(granted) == 4
            assert {i["metric"] for i in granted} >= {"m0", "late"}
            theirs = await history(b, type="statistics")
            assert {i["tenant"] for i in theirs} == {b} and len(theirs) == 3
            only = await history(bank, owner=a, metric="m1")
            assert [i["metric"] for i in only] == ["m1"]
            async with http.get(
                url + "/v1/insights/history",
                params={"type": "nope"},
                headers={"X-Api-Key": net.keys[a]},
            ) as response:
                assert response.status == 400

        # Replay: a backfill of exactly what the bank may see, into a topic of its own.
        target = unique_name("backfill")
        async with open_stores(settings) as stores:
            dry = await replay(
                settings,
                stores,
                topic=topics["statistics"],
                target=target,
                start=None,
                end=None,
                reader=bank,
                grants=[grant],
                dry_run=True,
            )
            assert dry.records == 3 and dry.objects >= 1
            report = await replay(
                settings,
                stores,
                topic=topics["statistics"],
                target=target,
                start=None,
                end=None,
                reader=bank,
                grants=[grant],
            )
            assert report.records == 3 and report.sha256 == dry.sha256
            everything = await replay(
                settings, stores, topic=topics["statistics"], target=None, start=None, end=None
            )
            assert everything.records == 5 and everything.dry_run
            found = (await ArchiveReader(stores).all_manifests(f"{topics['statistics']}/"))[0]
            await found.store.put(found.manifest.key, b"PAR1 not the archived bytes")
            with pytest.raises(ValueError, match="manifest"):
                await replay(
                    settings,
                    stores,
                    topic=topics["statistics"],
                    target=unique_name("x"),
                    start=None,
                    end=None,
                )
        consumer = create_consumer(settings, None)
        got: list[Any] = []
        async with started(consumer):
            consumer.subscribe([target])
            async with asyncio.timeout(30):
                while len(got) < 3:
                    for batch in (await consumer.getmany(timeout_ms=500)).values():
                        got += batch
        assert {decode(r.value)["tenant"] for r in got} == {a}
        assert all(r.headers == (("xietong-origin", b"test"),) for r in got)
        assert all(r.key == a.encode() for r in got)
