"""Raw partner events through the real clean hop into analytics, on the real broker: the
contract between the two services (metric names, event time, keys) holds end to end."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Callable
from datetime import timedelta

import pandas as pd
import pytest

from schemas.insights import Statistics
from services.analytics.app import run_analytics
from services.analytics.settings import AnalyticsSettings
from services.clean.app import run_clean
from shared.codec import encode
from shared.kafka import BatchPublisher, OutRecord, create_producer, ensure_topics, started
from tests.analytics.test_app import W0, collect, latest
from tests.factories import sales_event

pytestmark = pytest.mark.integration


async def test_raw_sales_come_out_as_statistics_of_their_quantities_and_amounts(
    analytics_settings: AnalyticsSettings, unique_name: Callable[[str], str]
) -> None:
    s = analytics_settings
    raw, clean = unique_name("raw"), unique_name("clean")
    await ensure_topics(s, [raw, clean], partitions=3)
    rng = random.Random(3)
    tenants = [f"pipe-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    events = [
        sales_event(
            tenant,
            seq=i,
            quantity=float(rng.randint(1, 50)),
            unit_price=round(rng.uniform(5, 20), 2),
            occurred_at=W0 + timedelta(minutes=i * 4 + rng.random()),
        )
        for tenant in tenants
        for i in range(15)
    ]
    # a later sale of every firm closes the first hour
    events += [
        sales_event(t, seq=100, occurred_at=W0 + timedelta(hours=2, minutes=10)) for t in tenants
    ]
    async with started(create_producer(s)) as producer:
        await BatchPublisher(producer).publish(
            raw, [OutRecord(e["tenant"].encode(), encode(e)) for e in events]
        )

    stop = asyncio.Event()
    clean_task = asyncio.create_task(
        run_clean(s, stop, source=raw, target=clean, group_id=unique_name("clean"))
    )
    analytics_task = asyncio.create_task(run_analytics(s, stop, source=clean))
    try:
        statistics = await collect(
            s,
            "statistics",
            lambda i: i.tenant in tenants,
            lambda got: len(latest(got)) >= 2 * len(tenants),
            analytics_task,
        )
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(clean_task, analytics_task), 60)

    first_hour = pd.DataFrame(
        [
            {
                "tenant": e["tenant"],
                "sales.quantity": e["payload"]["quantity"],
                "sales.amount_cny": e["payload"]["quantity"] * e["payload"]["unit_price"],
            }
            for e in events
            if e["payload"]["order_id"] != "SO-000100"
        ]
    )
    got = {
        (x.tenant, x.metric): x for x in latest(statistics).values() if isinstance(x, Statistics)
    }
    assert set(got) == {(t, m) for t in tenants for m in ("sales.quantity", "sales.amount_cny")}
    for (tenant, metric), x in got.items():
        expected = first_hour[first_hour["tenant"] == tenant][metric].describe()
        assert x.provenance.window_start == W0
        assert x.count == expected["count"]
        assert [x.mean, x.std, x.min, x.p25, x.p50, x.p75, x.max] == pytest.approx(
            [expected[k] for k in ["mean", "std", "min", "25%", "50%", "75%", "max"]], rel=1e-9
        )
