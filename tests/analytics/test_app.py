"""The analytics service against the real local Kafka broker.

A known data set of clean events from firms of several industries goes in; what comes out is
compared with pandas and scikit-learn computed directly on the same data. Every test uses its own
source topic, consumer groups and internal topic, and tenants no other test uses, and reads the
shared insight topics filtered by its tenants (or, for benchmarks, its industries).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import REGISTRY
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import StandardScaler

from schemas.control import Tenant
from schemas.events import CleanEvent
from schemas.insights import (
    INSIGHT_MODELS,
    NETWORK_TENANT,
    Benchmark,
    ClusterAssignment,
    Correlation,
    Insight,
    Statistics,
)
from schemas.topics import INSIGHT_TOPICS
from services.analytics.app import run_analytics
from services.analytics.handlers import benchmark_or_none
from services.analytics.settings import AnalyticsSettings
from services.analytics.windows import decode_metadata, watermarks_of
from shared.codec import decode, encode
from shared.control import ControlWriter
from shared.kafka import (
    BatchPublisher,
    OutRecord,
    connection_config,
    create_consumer,
    create_producer,
    ensure_topics,
    started,
)
from shared.settings import XietongSettings

pytestmark = pytest.mark.integration

W0 = datetime(2026, 11, 2, 10, tzinfo=UTC)
HOUR = timedelta(hours=1)
PARTITIONS = 3


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Sent:
    tenant: str
    at: datetime
    metrics: dict[str, float]
    counted: bool = True  # False: sent too late for its window


def clean_event(tenant: str, at: datetime, metrics: dict[str, float]) -> CleanEvent:
    event_type = "sales_order_line" if "sales.quantity" in metrics else "inventory_level"
    return CleanEvent(
        event_id=uuid.uuid4(),
        tenant=tenant,
        type=event_type if metrics else "text_document",
        schema_version=1,
        occurred_at=at,
        source={"system": "test", "record_id": str(uuid.uuid4())},  # type: ignore[arg-type]
        payload={},
        metrics=metrics,
    )


def firm_events(
    tenant: str, rng: random.Random, qty: float, price: float, stock: float, start: datetime = W0
) -> list[Sent]:
    """Ten sales (minutes 1, 6, ... 46) and four stock counts (3, 18, 33, 48) in an hour."""
    sent = []
    for i in range(10):
        q = max(1.0, rng.gauss(qty, qty * 0.2))
        at = start + timedelta(minutes=5 * i + 1, seconds=rng.randrange(60))
        sent.append(
            Sent(
                tenant,
                at,
                {"sales.quantity": q, "sales.amount_cny": q * price * rng.uniform(0.9, 1.1)},
            )
        )
        if i % 3 == 0:
            at = start + timedelta(minutes=5 * i + 3)
            sent.append(Sent(tenant, at, {"inventory.on_hand": rng.gauss(stock, stock * 0.1)}))
    return sent


def ticks(tenants: Iterable[str], at: datetime) -> list[Sent]:
    """Events without metrics that move every firm's partition on in event time."""
    return [Sent(t, at, {}, counted=False) for t in tenants]


async def publish(settings: XietongSettings, topic: str, sent: list[Sent]) -> None:
    records = [
        OutRecord(s.tenant.encode(), encode(clean_event(s.tenant, s.at, s.metrics))) for s in sent
    ]
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(topic, records)


async def register(settings: XietongSettings, tenants: dict[str, tuple[str, str]]) -> None:
    async with ControlWriter(settings) as writer:
        for tenant, (industry, region) in tenants.items():
            await writer.put_tenant(
                Tenant(tenant=tenant, name=tenant, industry=industry, region=region, created_at=W0)
            )


@contextlib.asynccontextmanager
async def analytics(settings: AnalyticsSettings, source: str) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_analytics(settings, stop, source=source))
    try:
        yield task
    finally:
        stop.set()
        if not task.done():
            await asyncio.wait_for(task, 60)
        elif not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def collect(
    settings: XietongSettings,
    insight_type: str,
    keep: Callable[[Insight], bool],
    done: Callable[[list[Insight]], bool],
    task: asyncio.Task[None] | None = None,
    timeout: float = 90,
) -> list[Insight]:
    """Insights of a type kept by ``keep``, read from the start until ``done`` says so."""
    model = INSIGHT_MODELS[insight_type]
    got: list[Insight] = []
    async with started(create_consumer(settings, None, INSIGHT_TOPICS[insight_type])) as consumer:
        async with asyncio.timeout(timeout):
            while not done(got):
                if task is not None and task.done():
                    task.result()  # the worker died: show why
                    raise AssertionError("the analytics worker stopped")
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    for record in records:
                        insight = model.model_validate(decode(record.value))
                        if keep(insight):
                            got.append(insight)
    return got


def complete_fits(
    assignments: list[Insight], firms: set[str]
) -> list[dict[str, ClusterAssignment]]:
    """The fits (by model version) that assigned every one of ``firms``."""
    by_model: dict[str, dict[str, ClusterAssignment]] = {}
    for a in assignments:
        assert isinstance(a, ClusterAssignment)
        by_model.setdefault(a.model_version, {})[a.tenant] = a
    return [fit for fit in by_model.values() if set(fit) == firms]


def latest(insights: list[Insight]) -> dict[uuid.UUID, Insight]:
    """By id (insights are idempotent: the same id may come twice after a restart)."""
    return {i.insight_id: i for i in insights}


def counted_frame(sent: list[Sent]) -> pd.DataFrame:
    rows = [{"tenant": s.tenant, "at": s.at, **s.metrics} for s in sent if s.counted and s.metrics]
    frame = pd.DataFrame(rows)
    frame["window"] = frame["at"].dt.floor("1h")
    return frame


METRICS = ["inventory.on_hand", "sales.amount_cny", "sales.quantity"]


def expected_benchmarks(metal: str, chem: str) -> set[tuple[str, str]]:
    """The benchmarks the scenario must publish: all of metal's (6 firms), none of food's (4),
    and all of chemicals' — one firm dominates its sales value, but whether a benchmark is
    published no longer depends on the values (a private benchmark hides that firm too)."""
    return {
        (metal, "inventory.on_hand"), (metal, "sales.amount_cny"), (metal, "sales.quantity"),
        (chem, "inventory.on_hand"), (chem, "sales.amount_cny"), (chem, "sales.quantity"),
    }  # fmt: skip


def assert_statistics_equal_describe(got: list[Statistics], frame: pd.DataFrame) -> None:
    expected = {
        (str(tenant), pd.Timestamp(cast(Any, window)).to_pydatetime(), metric): group[metric]
        .dropna()
        .describe()
        for (tenant, window), group in frame.groupby(["tenant", "window"])
        for metric in METRICS
        if group[metric].notna().any()
    }
    by_key = {(s.tenant, s.provenance.window_start, s.metric): s for s in got}
    assert set(by_key) == set(expected)
    for key, d in expected.items():
        s = by_key[key]
        assert s.count == d["count"]
        actual = [s.mean, s.std, s.min, s.p25, s.p50, s.p75, s.max]
        wanted = [d[x] for x in ["mean", "std", "min", "25%", "50%", "75%", "max"]]
        for a, w in zip(actual, wanted, strict=True):
            if np.isnan(w):
                assert a is None
            else:
                assert a == pytest.approx(w, rel=1e-9)
        assert s.provenance.window_end == s.provenance.window_start + HOUR  # type: ignore[operator]


# --------------------------------------------------------------------------- the scenario


async def test_a_known_data_set_comes_out_as_pandas_and_scikit_learn_compute_it(
    analytics_settings: AnalyticsSettings, unique_name: Callable[[str], str]
) -> None:
    s = analytics_settings
    source = unique_name("clean")
    tag = uuid.uuid4().hex[:6]
    rng = random.Random(20261102)
    metal, food, chem = f"metal-{tag}", f"food-{tag}", f"chem-{tag}"
    # three kinds of firm (small, mid, large) so the clusters have something to find
    kinds = [(20.0, 12.0, 500.0), (80.0, 30.0, 3000.0), (200.0, 15.0, 6000.0)]
    firms: dict[str, tuple[str, str]] = {}
    sent: list[Sent] = []
    for industry, region, count in [(metal, "east", 6), (food, "east", 4), (chem, "west", 5)]:
        for i in range(count):
            tenant = f"{industry}-{i}"
            firms[tenant] = (industry, region)
            qty, price, stock = kinds[i % 3]
            if industry == chem and i == 0:
                price *= 100  # one chemicals firm makes most of its segment's sales value
            sent += firm_events(tenant, rng, qty, price, stock)
    first = f"{metal}-0"
    # out of order but within grace: after an event of the next window, one of the window before
    sent.append(
        Sent(
            first,
            W0 + HOUR + timedelta(minutes=1),
            {"sales.quantity": 5.0, "sales.amount_cny": 60.0},
        )
    )
    sent.append(
        Sent(first, W0 + timedelta(minutes=58), {"sales.quantity": 7.0, "sales.amount_cny": 84.0})
    )
    sent += ticks(firms, W0 + 2 * HOUR + timedelta(minutes=10))
    # after the ticks W0 has closed everywhere: this one is late and must not count
    sent.append(
        Sent(
            first,
            W0 + timedelta(minutes=30),
            {"sales.quantity": 1e6, "sales.amount_cny": 1e9},
            counted=False,
        )
    )

    await register(s, firms)
    await ensure_topics(s, [source], partitions=PARTITIONS)
    await publish(s, source, sent)
    late_before = (
        REGISTRY.get_sample_value("xietong_analytics_late_events_total", {"window_seconds": "3600"})
        or 0.0
    )

    frame = counted_frame(sent)
    statistics_expected = sum(
        int(x)
        for x in (
            group[m].notna().any()
            for _, group in frame.groupby(["tenant", "window"])
            for m in METRICS
        )
    )
    ours = set(firms)
    async with analytics(s, source) as task:
        statistics = await collect(
            s, "statistics", lambda i: i.tenant in ours,
            lambda got: len(latest(got)) >= statistics_expected, task,
        )  # fmt: skip
        correlations = await collect(
            s,
            "correlation",
            lambda i: i.tenant in ours,
            lambda got: len(latest(got)) >= len(firms),
            task,
        )
        assignments = await collect(
            s, "cluster_assignment", lambda i: i.tenant in ours,
            lambda got: bool(complete_fits(got, ours)), task,
        )  # fmt: skip
        # benchmarks go out with (just before) the clusters of the same complete window
        wanted = expected_benchmarks(metal, chem)
        benchmarks = await collect(
            s,
            "benchmark",
            lambda i: isinstance(i, Benchmark) and i.industry in (metal, food, chem),
            lambda got: wanted <= {(b.industry, b.metric) for b in got},  # type: ignore[attr-defined]
            task,
        )

    # statistics: describe() per firm, window and metric; the late event is not in them
    assert_statistics_equal_describe(list(latest(statistics).values()), frame)  # type: ignore[arg-type]
    late_after = REGISTRY.get_sample_value(
        "xietong_analytics_late_events_total", {"window_seconds": "3600"}
    )
    assert late_after == late_before + 1

    # correlations: pandas corr of the metrics aligned on 5-minute buckets, W0 of each firm
    for c in latest(correlations).values():
        assert isinstance(c, Correlation)
        assert c.provenance.window_start == W0
        own = frame[(frame["tenant"] == c.tenant) & (frame["window"] == W0)]
        aligned = (
            own.assign(
                bucket=own["at"].map(
                    lambda t: int(t.timestamp()) // s.analytics_correlation_align_seconds
                )
            )[[*METRICS, "bucket"]]
            .groupby("bucket")
            .mean()
        )
        expected = aligned.corr(min_periods=3)
        assert c.metrics == list(expected.columns)
        for row, expected_row in zip(c.matrix, expected.to_numpy(), strict=True):
            for value, w in zip(row, expected_row, strict=True):
                assert (value is None) if np.isnan(w) else value == pytest.approx(w, rel=1e-9)
    assert {c.tenant for c in latest(correlations).values()} == ours

    # benchmarks: metal (6 firms) and chemicals have all three; food (4 firms) none; each is the
    # private release (same key) of exactly the firms' own means over the window
    published = {
        (b.industry, b.metric): b for b in latest(benchmarks).values() if isinstance(b, Benchmark)
    }
    assert set(published) == expected_benchmarks(metal, chem)
    w0 = frame[frame["window"] == W0]
    for (industry, metric), b in published.items():
        per_firm = (
            w0[w0["tenant"].map(lambda t: firms[t][0]) == industry].groupby("tenant")[metric].mean()
        )
        assert b.tenant == NETWORK_TENANT and b.visibility == "public"
        assert b.firms == len(per_firm) == b.provenance.contributing_partners
        assert b.provenance.window_start == W0
        want = benchmark_or_none(
            per_firm.to_dict(),
            k=s.benchmark_min_firms,
            bounds=s.metric_bounds()[metric],
            epsilon=s.benchmark_epsilon,
            key=s.network_key(),
            about=(industry, b.region, metric, 3600, int(W0.timestamp() * 1000)),
        )
        assert want is not None
        assert list(b.quantiles.values()) == pytest.approx(list(want.quantiles.values()))
        assert b.mean == pytest.approx(want.mean, abs=1e-9)
    assert w0[w0["tenant"].str.startswith(food)]["tenant"].nunique() == s.benchmark_min_firms - 1

    # clusters: the newest fit equals scikit-learn on the firms' KPI means with the same seed
    fit = max(complete_fits(assignments, ours), key=lambda f: next(iter(f.values())).model_version)
    newest_end = next(iter(fit.values())).provenance.window_end
    assert newest_end is not None
    assert all(isinstance(a, ClusterAssignment) for a in fit.values())
    period = frame[frame["window"] + HOUR <= newest_end]
    kpis = period.groupby("tenant")[s.cluster_metrics].mean().sort_index()
    scaled = StandardScaler().fit_transform(kpis.to_numpy())
    scores, labels = {}, {}
    for k in range(s.cluster_k_min, min(s.cluster_k_max, len(kpis) - 1) + 1):
        labels[k] = (
            KMeans(n_clusters=k, random_state=s.cluster_seed, n_init=s.cluster_n_init)
            .fit(scaled)
            .labels_
        )
        scores[k] = silhouette_score(scaled, labels[k])
    best = max(scores, key=lambda k: scores[k])
    some = next(iter(fit.values()))
    assert isinstance(some, ClusterAssignment)
    assert some.k == best
    assert some.silhouette == pytest.approx(scores[best], rel=1e-9)
    want = {frozenset(kpis.index[labels[best] == c]) for c in range(best)}
    got: dict[int, set[str]] = {}
    for tenant, assignment in fit.items():
        got.setdefault(assignment.cluster, set()).add(tenant)
        assert assignment.features == s.cluster_metrics
        assert assignment.cluster_sizes == [
            int((labels[best] == label).sum()) for label in range(best)
        ]
    assert {frozenset(v) for v in got.values()} == want
    for label, profile in enumerate(some.profiles):
        members = kpis.loc[sorted(got[label])]
        if len(members) >= s.cluster_min_profile_firms:  # private means, in declared ranges
            bounds = s.metric_bounds()
            assert set(profile) == set(s.cluster_metrics)
            assert all(bounds[m].lower <= v <= bounds[m].upper for m, v in profile.items())
        else:
            assert profile == {}


async def committed_watermarks(
    settings: AnalyticsSettings, source: str
) -> dict[int, dict[str, int]]:
    admin = AIOKafkaAdminClient(**connection_config(settings))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.analytics_group_id)
    finally:
        await admin.close()
    grace_ms = settings.analytics_grace_seconds * 1000
    return {
        tp.partition: watermarks_of(decode_metadata(meta.metadata), grace_ms)[0]
        for tp, meta in offsets.items()
        if tp.topic == source and meta.offset >= 0 and meta.metadata
    }


async def test_a_restarted_worker_keeps_its_open_windows_and_does_not_reopen_closed_ones(
    analytics_settings: AnalyticsSettings, unique_name: Callable[[str], str]
) -> None:
    s = analytics_settings
    source = unique_name("clean")
    tag = uuid.uuid4().hex[:6]
    firms = {f"restart-{tag}-{i}": (f"steel-{tag}", "north") for i in range(4)}
    straggler_firm = next(iter(firms))
    rng = random.Random(5)
    hour_before = [e for t in firms for e in firm_events(t, rng, 50.0, 20.0, 900.0, W0 - HOUR)]
    hour_zero = sorted(
        (e for t in firms for e in firm_events(t, rng, 50.0, 20.0, 900.0)), key=lambda e: e.at
    )
    # 09:58 arrives after the 10:00-10:04 events: late, but within grace, so it counts in W-1;
    # the first worker commits W0's first offset, before it, so the restarted worker reads it
    # again — and must not open W-1 again with it
    straggler = Sent(straggler_firm, W0 - timedelta(minutes=2), {"sales.quantity": 3.0})
    early = [e for e in hour_zero if e.at < W0 + timedelta(minutes=4)]
    part_one = [
        *hour_before,
        *early,
        straggler,
        *[e for e in hour_zero if W0 + timedelta(minutes=4) <= e.at < W0 + timedelta(minutes=25)],
    ]
    part_two = [e for e in hour_zero if e.at >= W0 + timedelta(minutes=25)]
    everything = [*hour_before, straggler, *hour_zero]
    await register(s, firms)
    await ensure_topics(s, [source], partitions=PARTITIONS)
    await publish(s, source, part_one)

    # what each firm's committed watermark (floored to the hour) must reach once the first
    # worker read it all
    partition_of = {
        t: DefaultPartitioner()(t.encode(), list(range(PARTITIONS)), list(range(PARTITIONS)))
        for t in firms
    }
    wanted: dict[int, dict[str, int]] = {}
    for e in part_one:
        mark = int((e.at - timedelta(seconds=s.analytics_grace_seconds)).timestamp() * 1000)
        mark -= mark % 3_600_000
        firm_marks = wanted.setdefault(partition_of[e.tenant], {})
        firm_marks[e.tenant] = max(firm_marks.get(e.tenant, mark), mark)

    ours = set(firms)
    async with analytics(s, source) as first:
        # W-1 closes in the first worker (its statistics come out), W0 stays open
        await collect(
            s,
            "statistics",
            lambda i: i.tenant in ours,
            lambda got: len(latest(got)) >= 3 * len(firms),
            first,
        )
        async with asyncio.timeout(60):
            while {
                p: t for p, t in (await committed_watermarks(s, source)).items() if p in wanted
            } != wanted:
                assert not first.done()
                await asyncio.sleep(0.2)
        first.cancel()  # an abrupt end: nothing beyond what was committed survives
        with contextlib.suppress(asyncio.CancelledError):
            await first

    await publish(s, source, [*part_two, *ticks(firms, W0 + 2 * HOUR + timedelta(minutes=10))])
    async with analytics(s, source) as second:
        statistics = await collect(
            s,
            "statistics",
            lambda i: i.tenant in ours,
            lambda got: len(latest(got)) >= 2 * 3 * len(firms),
            second,
        )
    final = latest(statistics)
    assert_statistics_equal_describe(list(final.values()), counted_frame(everything))  # type: ignore[arg-type]
    # an insight published twice (re-read after the restart) is the same insight
    for insight in statistics:
        assert insight.model_dump(exclude={"provenance"}) == final[insight.insight_id].model_dump(
            exclude={"provenance"}
        )
    # every event counted once, those from before the restart too
    assert sum(x.count for x in final.values() if isinstance(x, Statistics)) == sum(
        len(e.metrics) for e in everything
    )


async def test_four_firms_give_no_benchmark_and_five_do(
    analytics_settings: AnalyticsSettings, unique_name: Callable[[str], str]
) -> None:
    s = analytics_settings
    source = unique_name("clean")
    tag = uuid.uuid4().hex[:6]
    four, five = f"four-{tag}", f"five-{tag}"
    firms = {f"{four}-{i}": (four, "south") for i in range(4)} | {
        f"{five}-{i}": (five, "south") for i in range(5)
    }
    rng = random.Random(9)
    sent = [e for t in firms for e in firm_events(t, rng, 30.0 + rng.random() * 10, 10.0, 400.0)]
    sent += ticks(firms, W0 + 2 * HOUR)
    await register(s, firms)
    await ensure_topics(s, [source], partitions=PARTITIONS)
    await publish(s, source, sent)
    ours = set(firms)
    async with analytics(s, source) as task:
        # the clusters come after the benchmarks of the same window: once they are there,
        # every benchmark of the window has been published
        await collect(
            s,
            "cluster_assignment",
            lambda i: i.tenant in ours,
            lambda got: len(got) >= len(firms),
            task,
        )
        benchmarks = await collect(
            s, "benchmark", lambda i: isinstance(i, Benchmark) and i.industry in (four, five),
            lambda got: len(latest(got)) >= 3, task,
        )  # fmt: skip
    industries = {b.industry for b in benchmarks if isinstance(b, Benchmark)}
    assert industries == {five}


async def test_the_network_side_rebuilds_its_state_after_a_restart(
    analytics_settings: AnalyticsSettings, unique_name: Callable[[str], str]
) -> None:
    s = analytics_settings
    source = unique_name("clean")
    tag = uuid.uuid4().hex[:6]
    industry = f"glass-{tag}"
    firms = {f"{industry}-{i}": (industry, "east") for i in range(6)}
    kinds = [(20.0, 12.0, 500.0), (80.0, 30.0, 3000.0), (200.0, 15.0, 6000.0)]
    rng = random.Random(11)
    hour_zero = [e for i, t in enumerate(firms) for e in firm_events(t, rng, *kinds[i % 3])]
    # after the restart only half of the firms send more: the others' figures must come from
    # the state the restarted worker rebuilt
    hour_one = [
        e
        for i, t in enumerate(firms)
        if i % 2 == 0
        for e in firm_events(t, rng, *kinds[i % 3], W0 + HOUR)
    ]
    ours = set(firms)
    await register(s, firms)
    await ensure_topics(s, [source], partitions=PARTITIONS)
    await publish(s, source, [*hour_zero, *ticks(firms, W0 + HOUR + timedelta(minutes=10))])
    async with analytics(s, source) as first:
        fits = await collect(
            s, "cluster_assignment", lambda i: i.tenant in ours,
            lambda got: bool(complete_fits(got, ours)), first,
        )  # fmt: skip
    assert len(complete_fits(fits, ours)) == 1

    await publish(s, source, [*hour_one, *ticks(firms, W0 + 2 * HOUR + timedelta(minutes=10))])
    async with analytics(s, source) as second:
        fits = await collect(
            s, "cluster_assignment", lambda i: i.tenant in ours,
            lambda got: len(complete_fits(got, ours)) >= 2, second,
        )  # fmt: skip
        benchmarks = await collect(
            s, "benchmark", lambda i: isinstance(i, Benchmark) and i.industry == industry,
            lambda got: len(latest(got)) >= 3, second,
        )  # fmt: skip
    newest = max(complete_fits(fits, ours), key=lambda f: next(iter(f.values())).model_version)
    some = next(iter(newest.values()))
    assert some.provenance.window_end == W0 + 2 * HOUR
    assert some.provenance.event_count == len(hour_zero) + len(hour_one)
    kpis = counted_frame([*hour_zero, *hour_one]).groupby("tenant")[s.cluster_metrics].mean()
    scaled = StandardScaler().fit_transform(kpis.sort_index().to_numpy())
    labels = KMeans(n_clusters=some.k, random_state=s.cluster_seed, n_init=s.cluster_n_init).fit(
        scaled
    )
    assert [newest[t].cluster for t in sorted(kpis.index)] == [int(x) for x in labels.labels_]
    # W0 had six firms: benchmarked once, before the restart; W1 had three: never
    assert {b.provenance.window_start for b in benchmarks} == {W0}
    assert len(latest(benchmarks)) == 3


async def test_a_firm_dating_an_event_2036_leaves_another_firms_windows_working_after_a_restart(
    analytics_settings: AnalyticsSettings, unique_name: Callable[[str], str]
) -> None:
    s = analytics_settings
    source = unique_name("clean")
    tag = uuid.uuid4().hex[:6]
    ahead, on_time = f"ahead-{tag}", f"ontime-{tag}"
    rng = random.Random(2036)
    before = [
        *firm_events(on_time, rng, 50.0, 20.0, 900.0),
        Sent(ahead, datetime(2036, 1, 1, tzinfo=UTC), {"sales.quantity": 1.0}),
        *firm_events(on_time, rng, 50.0, 20.0, 900.0, W0 + HOUR)[:4],
    ]
    after = [
        *firm_events(on_time, rng, 50.0, 20.0, 900.0, W0 + HOUR)[4:],
        *ticks([on_time], W0 + 2 * HOUR + timedelta(minutes=10)),
    ]
    await register(s, {ahead: (f"clock-{tag}", "east"), on_time: (f"clock-{tag}", "east")})
    await ensure_topics(s, [source], partitions=1)  # both firms on one partition
    await publish(s, source, before)
    late = ("xietong_analytics_late_events_total", {"window_seconds": "3600"})
    late_before = REGISTRY.get_sample_value(*late) or 0.0

    def of_on_time(i: Insight) -> bool:
        return i.tenant == on_time

    async with analytics(s, source) as first:
        await collect(s, "statistics", of_on_time, lambda got: len(latest(got)) >= 3, first)
        async with asyncio.timeout(60):  # the firm's watermark is committed
            while on_time not in (await committed_watermarks(s, source)).get(0, {}):
                assert not first.done()
                await asyncio.sleep(0.2)
    await publish(s, source, after)
    async with analytics(s, source) as second:
        statistics = await collect(
            s, "statistics", of_on_time, lambda got: len(latest(got)) >= 6, second
        )
    # nothing of on_time's came late
    assert (REGISTRY.get_sample_value(*late) or 0.0) == late_before
    expected = counted_frame([e for e in [*before, *after] if e.tenant == on_time])
    assert_statistics_equal_describe(list(latest(statistics).values()), expected)  # type: ignore[arg-type]
