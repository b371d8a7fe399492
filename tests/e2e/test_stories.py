"""One end-to-end test per user story (BRIEF.md, "Who uses it"), the whole system on the real
local Kafka: the gateway, clean and analytics run in this process (:mod:`tests.e2e.system`), the
operator's demo as the subprocesses it starts. Each scenario reads top to bottom: who publishes
what, what each party sees, and the figures compared with pandas / scikit-learn computed directly
on the same data.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
from aiokafka import TopicPartition
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import StandardScaler

from deploy.local.demo import HEALTH_PORT_OFFSETS
from deploy.local.infra import ROOT
from deploy.local.simulate import load_clock, make_firms
from schemas.insights import (
    NETWORK_TENANT,
    Benchmark,
    ClusterAssignment,
    Correlation,
    Insight,
    Statistics,
)
from schemas.topics import EVENTS_CLEAN, EVENTS_RAW, INSIGHT_TOPICS
from services.analytics.handlers import benchmark_or_none
from services.analytics.settings import load_analytics_settings
from services.ingest.cdc import row_id, run_cdc
from services.ingest.mapping import Mapping, parse_mapping
from shared.codec import encode
from shared.kafka import create_consumer, create_producer, ensure_topics, started
from shared.settings import XietongSettings
from tests.e2e.system import (
    TIMEOUT,
    System,
    close,
    collecting,
    create_topics,
    csv_rows,
    ms,
    observations,
    raw_partitions,
    read_topic,
    register,
    running_system,
    sales,
    stock,
    tenant_names,
)

pytestmark = pytest.mark.integration

WINDOW_S = 600
GRACE_S = 60
ALIGN_S = 60
MIN_POINTS = 3
SEED = 7
N_INIT = 4
K_MAX = 5
METRICS = ["inventory.on_hand", "sales.amount_cny", "sales.quantity"]

ANALYTICS = {
    "analytics_window_seconds": WINDOW_S,
    "analytics_grace_seconds": GRACE_S,
    "analytics_correlation_align_seconds": ALIGN_S,
    "analytics_correlation_min_points": MIN_POINTS,
    # every partition carries the test's firms (or a filler, see tenant_names): none is ever
    # declared idle, so network-wide windows close only when all of them have passed them and
    # no firm can be left out of a benchmark or a cluster fit
    "analytics_idle_partition_seconds": 3600.0,
    "analytics_quiet_partition_seconds": 3600.0,
    "cluster_seed": SEED,
    "cluster_n_init": N_INIT,
    "cluster_k_max": K_MAX,
}

# Event times are in the past (before any demo's "now - 6 h"), a different day per story.
STORY1 = datetime(2025, 3, 3, 8, 0, tzinfo=UTC)
STORY2 = datetime(2025, 3, 4, 8, 0, tzinfo=UTC)
STORY3 = datetime(2025, 3, 5, 8, 0, tzinfo=UTC)

Profile = tuple[float, float, float]
"""(typical quantity, unit price, stock on hand) of a firm."""

PROFILES: list[Profile] = [
    (10.0, 2.0, 500.0),
    (12.0, 2.1, 550.0),
    (50.0, 2.2, 2000.0),
    (55.0, 2.0, 2100.0),
    (200.0, 1.8, 8000.0),
    (190.0, 1.9, 7800.0),
]
"""Three pairs of firms of clearly different size: the clusters the data holds."""


def window_events(
    tenant: str, start: datetime, profile: Profile, rng: random.Random, seq: int
) -> list[dict[str, Any]]:
    """One firm's events in the window starting at ``start``: eight sales (in eight different
    minutes) and three stock counts (in the minutes of sales 1, 4 and 7)."""
    qty, price, on_hand = profile
    events = []
    for i in range(8):
        at = start + timedelta(seconds=30 + 70 * i)
        quantity = round(max(1.0, rng.gauss(qty, qty * 0.2)), 3)
        events.append(sales(tenant, at, quantity, round(price * rng.uniform(0.9, 1.1), 4), seq + i))
        if i % 3 == 1:
            events.append(
                stock(
                    tenant,
                    at + timedelta(seconds=5),
                    round(rng.gauss(on_hand, on_hand * 0.1), 1),
                    seq + i,
                )
            )
    return events


def ticks(tenants: list[str], at: datetime) -> dict[str, dict[str, Any]]:
    """One later sale per firm: moves every partition's event time on, so windows close."""
    return {t: sales(t, at, 1.0, 1.0, 99_999) for t in tenants}


# --------------------------------------------------------------------------- expectations


def windowed(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["window"] = frame["time_ms"] - frame["time_ms"] % (WINDOW_S * 1000)
    return frame


def expected_statistics(frame: pd.DataFrame) -> dict[tuple[str, int, str], pd.Series]:
    """pandas ``describe()`` of each firm's metric in each window."""
    out = {}
    for (tenant, window), group in windowed(frame).groupby(["tenant", "window"]):
        for metric in METRICS:
            if metric in group and group[metric].notna().any():
                out[(str(tenant), int(cast(Any, window)), metric)] = (
                    group[metric].dropna().describe()
                )
    return out


def assert_statistics(got: list[Insight], expected: dict[tuple[str, int, str], pd.Series]) -> None:
    by_key = {}
    for s in got:
        assert isinstance(s, Statistics)
        assert s.provenance.window_start is not None
        by_key[(s.tenant, ms(s.provenance.window_start), s.metric)] = s
    assert set(by_key) == set(expected)
    for key, d in expected.items():
        s = by_key[key]
        assert s.count == d["count"], key
        figures = [s.mean, s.std, s.min, s.p25, s.p50, s.p75, s.max]
        wanted = [d[x] for x in ["mean", "std", "min", "25%", "50%", "75%", "max"]]
        assert all(close(a, w) for a, w in zip(figures, wanted, strict=True)), (
            key,
            figures,
            wanted,
        )
        assert s.provenance.window_end - s.provenance.window_start == timedelta(seconds=WINDOW_S)  # type: ignore[operator]


def expected_correlations(frame: pd.DataFrame) -> dict[tuple[str, int], pd.DataFrame]:
    """pandas ``corr`` of each firm's metrics per window, aligned on one-minute buckets."""
    out = {}
    for (tenant, window), group in windowed(frame).groupby(["tenant", "window"]):
        group = group.assign(bucket=group["time_ms"] // (ALIGN_S * 1000))
        aligned = group.groupby("bucket")[[m for m in METRICS if m in group]].mean()
        aligned = aligned.dropna(axis=1, how="all")
        if aligned.shape[1] >= 2 and aligned.shape[0] >= MIN_POINTS:
            out[(str(tenant), int(cast(Any, window)))] = aligned.corr(min_periods=MIN_POINTS)
    return out


def expected_benchmarks(frame: pd.DataFrame) -> dict[tuple[int, str], pd.Series]:
    """Per window and metric: the firms' own means, the values a benchmark aggregates."""
    means = windowed(frame).groupby(["window", "tenant"])[METRICS].mean()
    out = {}
    for window, per_firm in means.groupby(level="window"):
        for metric in METRICS:
            out[(int(cast(Any, window)), metric)] = per_firm[metric].dropna()
    return out


def expected_clusters(frame: pd.DataFrame) -> tuple[int, set[frozenset[str]]]:
    """``k`` and the partition of firms scikit-learn finds on the standardised KPI means."""
    kpis = frame.groupby("tenant")[METRICS].mean().sort_index()
    scaled = StandardScaler().fit_transform(kpis.to_numpy())
    best: tuple[float, int, Any] | None = None
    for k in range(2, min(K_MAX, len(kpis) - 1) + 1):
        labels = KMeans(n_clusters=k, random_state=SEED, n_init=N_INIT).fit(scaled).labels_
        if len(np.unique(labels)) != k:
            continue
        score = float(silhouette_score(scaled, labels))
        if best is None or score > best[0]:
            best = (score, k, labels)
    assert best is not None
    _, k, labels = best
    groups: dict[int, set[str]] = {}
    for tenant, label in zip(kpis.index, labels, strict=True):
        groups.setdefault(int(label), set()).add(str(tenant))
    return k, {frozenset(g) for g in groups.values()}


def at_least(count: int) -> Callable[[list[Insight]], bool]:
    return lambda found: len(found) >= count


def visible_to(reader: str, insights: list[Insight]) -> bool:
    """Everything a tenant was shown is its own or public."""
    return all(i.tenant == reader or i.visibility == "public" for i in insights)


# --------------------------------------------------------------------------- story 1


async def test_partner_firms_get_their_statistics_benchmarks_and_clusters_and_nothing_else(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    """Story 1, the partner firm: six firms of one industry and region publish a known data
    set over HTTP (one of them as CSV exports) and each gets back exactly its own figures, the
    industry benchmark and its cluster — and no rival's private insight, by list or stream."""
    partitions = await raw_partitions(settings)
    industry = f"fasteners-{uuid.uuid4().hex[:6]}"
    firms, fillers = tenant_names("firm", len(PROFILES), partitions)
    members = await register(
        settings,
        [
            *((f, "partner", industry, "east") for f in firms),
            *((f, "partner", "filler", "east") for f in fillers),
        ],
    )
    csv_firm, resending_firm, rival = firms[0], firms[1], firms[2]
    rng = random.Random(20250303)

    rounds = [
        {
            firm: window_events(
                firm, STORY1 + timedelta(seconds=w * WINDOW_S), profile, rng, seq=100 * w
            )
            for firm, profile in zip(firms, PROFILES, strict=True)
        }
        for w in range(3)
    ]
    data = {firm: [e for batch in rounds for e in batch[firm]] for firm in firms}
    frame = observations(e for events in data.values() for e in events)

    async with (
        running_system(settings, unique_name, members, **ANALYTICS) as system,
        collecting(system.stream(rival)) as rival_stream,
    ):
        # Window after window (a partition's event time only moves on), every firm publishes
        # its batch; the CSV firm sends ERP exports, one file per event type.
        sent_csv = b""
        for batch in rounds:
            for firm, events in batch.items():
                if firm == csv_firm:
                    sold = [e for e in events if e["type"] == "sales_order_line"]
                    counted = [e for e in events if e["type"] == "inventory_level"]
                    sent_csv = await system.publish_csv(firm, "sales_order_line", csv_rows(sold))
                    await system.publish_csv(firm, "inventory_level", csv_rows(counted))
                else:
                    await system.publish_json(firm, events)
        # Client retries of the last batch, while its window is still open: the same JSON
        # events, the same CSV file (whose rows get the same derived ids).
        await system.publish_json(resending_firm, rounds[-1][resending_firm])
        resent_rows = sum(e["type"] == "sales_order_line" for e in rounds[-1][csv_firm])
        answer = await system.post(csv_firm, sent_csv, "text/csv", type="sales_order_line")
        assert answer["accepted"] == resent_rows
        # later sales move every partition's event time on: the data's windows close
        tick_at = STORY1 + timedelta(seconds=10 * WINDOW_S + 60)
        for firm, event in ticks(firms + fillers, tick_at).items():
            await system.publish_json(firm, [event])

        # each firm sees describe() of exactly its own data, window by window
        statistics = expected_statistics(frame)
        for firm in firms:
            mine = {k: v for k, v in statistics.items() if k[0] == firm}
            got = await system.wait_for(
                firm,
                at_least(len(mine)),
                types=["statistics"],
            )
            assert all(i.tenant == firm for i in got)
            assert_statistics(got, mine)

        # ... and pandas corr of its metrics
        correlations = expected_correlations(frame)
        for firm in firms:
            mine_corr = {k: v for k, v in correlations.items() if k[0] == firm}
            got = await system.wait_for(firm, at_least(len(mine_corr)), types=["correlation"])
            by_window = {}
            for c in got:
                assert isinstance(c, Correlation) and c.tenant == firm
                assert c.provenance.window_start is not None
                by_window[ms(c.provenance.window_start)] = c
            assert set(by_window) == {w for _, w in mine_corr}
            for (_, window), matrix in mine_corr.items():
                c = by_window[window]
                assert c.metrics == [str(m) for m in matrix.columns]
                for row, wanted in zip(c.matrix, matrix.to_numpy().tolist(), strict=True):
                    assert all(close(a, w) for a, w in zip(row, wanted, strict=True))

        # the public benchmark of the industry: the private release (differentially private,
        # keyed noise) of exactly the six firms' own means — the same figures on any re-run
        benchmarks = expected_benchmarks(frame)
        got = await system.wait_for(
            rival,
            lambda found: (
                sum(isinstance(i, Benchmark) and i.industry == industry for i in found)
                >= len(benchmarks)
            ),
            types=["benchmark"],
        )
        mine_b = {
            (ms(b.provenance.window_start), b.metric): b  # type: ignore[arg-type]
            for b in got
            if isinstance(b, Benchmark) and b.industry == industry
        }
        assert set(mine_b) == set(benchmarks)
        for key, values in benchmarks.items():
            b = mine_b[key]
            assert b.tenant == NETWORK_TENANT and b.visibility == "public"
            assert b.region == "east" and b.firms == len(values) == len(firms)
            defaults = load_analytics_settings(**ANALYTICS)
            want = benchmark_or_none(
                {str(tenant): float(v) for (_, tenant), v in values.items()},
                k=defaults.benchmark_min_firms,
                bounds=defaults.metric_bounds()[key[1]],
                epsilon=defaults.benchmark_epsilon,
                key=settings.network_key(),
                about=(industry, "east", key[1], WINDOW_S, key[0]),
            )
            assert want is not None
            assert all(close(b.quantiles[name], q) for name, q in want.quantiles.items())
            assert close(b.mean, want.mean)

        # every firm gets its cluster: the partition scikit-learn finds on the same KPIs
        k, partition = expected_clusters(frame)
        network_end = ms(tick_at) - GRACE_S * 1000  # the smallest partition watermark
        final_end = network_end - network_end % (WINDOW_S * 1000)
        assignments: dict[str, ClusterAssignment] = {}
        for firm in firms:
            got = await system.wait_for(
                firm,
                lambda found: any(
                    ms(i.provenance.window_end) == final_end  # type: ignore[arg-type]
                    for i in found
                ),
                types=["cluster_assignment"],
            )
            (latest,) = [
                i
                for i in got
                if ms(i.provenance.window_end) == final_end  # type: ignore[arg-type]
            ]
            assert isinstance(latest, ClusterAssignment) and latest.tenant == firm
            assignments[firm] = latest
        assert len({a.model_version for a in assignments.values()}) == 1
        assert {a.k for a in assignments.values()} == {k}
        found_partition: dict[int, set[str]] = {}
        for firm, a in assignments.items():
            found_partition.setdefault(a.cluster, set()).add(firm)
        assert {frozenset(g) for g in found_partition.values()} == partition

        # the retries changed no count: the clean topic holds each event once (read again until
        # every tick is there: a partition's windows close on any firm's tick, so another
        # firm's tick on the same partition may still be on its way through clean)
        wanted = {firm: len(events) + 1 for firm, events in data.items()}
        async with asyncio.timeout(TIMEOUT):
            while True:
                cleaned = await read_topic(
                    settings,
                    system.clean_topic,
                    lambda key: key is not None and key.decode() in data,
                )
                per_firm = pd.Series([e["tenant"] for e in cleaned]).value_counts().to_dict()
                if all(per_firm.get(firm, 0) >= count for firm, count in wanted.items()):
                    break
                await asyncio.sleep(0.2)
        assert per_firm == wanted
        assert system.clean_status.duplicates == len(rounds[-1][resending_firm]) + resent_rows

        # the rival sees its own and public insights only, listed or streamed
        listed = await system.client(rival).insights(limit=1000)
        assert visible_to(rival, listed)
        assert any(i.tenant == rival for i in listed)
        for other in firms:
            if other != rival:
                assert await system.client(rival).insights(owner=other, limit=1000) == []
        assert any(i.tenant == rival for i in rival_stream)
        assert any(isinstance(i, Benchmark) for i in rival_stream)
        assert visible_to(rival, rival_stream)


# --------------------------------------------------------------------------- story 2


def phase(
    firms: list[str], window: int, rng: random.Random, profiles: list[Profile] = PROFILES
) -> dict[str, list[dict[str, Any]]]:
    """Each firm's events in main-size window number ``window`` of story 2."""
    start = STORY2 + timedelta(seconds=window * WINDOW_S)
    return {
        firm: window_events(firm, start, profile, rng, seq=100 * window)
        for firm, profile in zip(firms, profiles, strict=False)
    }


def window_start(window: int, base: datetime) -> int:
    return ms(base + timedelta(seconds=window * WINDOW_S))


async def until(system: System, condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` (checked as the services run); fail after the system timeout."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            system.check_running()
            await asyncio.sleep(0.1)


def stats_of(owner: str, insights: list[Insight], window: int | None = None) -> list[Statistics]:
    return [
        i
        for i in insights
        if isinstance(i, Statistics)
        and i.tenant == owner
        and (window is None or ms(i.provenance.window_start) == window)  # type: ignore[arg-type]
    ]


def benchmark_of(industry: str, insights: list[Insight], window: int) -> list[Benchmark]:
    return [
        i
        for i in insights
        if isinstance(i, Benchmark)
        and i.industry == industry
        and ms(i.provenance.window_start) == window  # type: ignore[arg-type]
    ]


async def test_a_bank_sees_benchmarks_and_only_what_a_firm_granted_until_it_is_revoked(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    """Story 2, the downstream consumer: a bank (tenant kind ``consumer``) subscribed over HTTP
    sees the public benchmarks only; once a firm grants it ``statistics`` it lists and streams
    that firm's statistics (and nothing else of it); after the revocation it gets none."""
    partitions = await raw_partitions(settings)
    industry = f"steel-{uuid.uuid4().hex[:6]}"
    firms, fillers = tenant_names("mill", 5, partitions)
    bank = f"bank-{uuid.uuid4().hex[:8]}"
    members = await register(
        settings,
        [
            *((f, "partner", industry, "north") for f in firms),
            *((f, "partner", "filler", "north") for f in fillers),
            (bank, "consumer", "finance", "north"),
        ],
    )
    lender = firms[0]  # the firm that shares its statistics with the bank
    rng = random.Random(20250304)

    async with running_system(settings, unique_name, members, **ANALYTICS) as system:
        bank_sse = system.stream(bank)
        async with collecting(bank_sse) as bank_stream:
            bank_client = system.client(bank)
            # the firms publish two windows; later sales close them
            for window in (0, 1):
                for firm, events in phase(firms, window, rng).items():
                    await system.publish_json(firm, events)
            for firm, event in ticks(
                firms + fillers, STORY2 + timedelta(seconds=3 * WINDOW_S + 60)
            ).items():
                await system.publish_json(firm, [event])
            await system.wait_for(lender, at_least(2 * len(METRICS)), types=["statistics"])

            # without an agreement: the industry's benchmarks, nothing private of any firm
            await system.wait_for(
                bank,
                lambda found: all(
                    benchmark_of(industry, found, window_start(w, STORY2)) for w in (0, 1)
                ),
                types=["benchmark"],
            )
            await until(
                system, lambda: bool(benchmark_of(industry, bank_stream, window_start(1, STORY2)))
            )
            listed = await bank_client.insights(limit=1000)
            assert listed and all(i.visibility == "public" for i in listed)
            assert await bank_client.insights(owner=lender, limit=1000) == []
            assert bank_stream and all(i.visibility == "public" for i in bank_stream)

            # the firm grants its statistics: the bank lists those already computed ...
            grant = await system.client(lender).grant(bank, ["statistics"], purpose="credit line")
            assert (await bank_client.shares())["received"][0]["grant_id"] == grant.grant_id
            granted = await bank_client.insights(owner=lender, limit=1000)
            assert granted and all(
                isinstance(i, Statistics) and i.tenant == lender for i in granted
            )
            assert {ms(i.provenance.window_start) for i in granted} >= {  # type: ignore[arg-type]
                window_start(w, STORY2) for w in (0, 1)
            }
            # ... and receives the new ones on its open stream (but not the firm's correlations)
            for firm, events in phase([lender], 5, rng).items():
                await system.publish_json(firm, events)
            await system.publish_json(
                lender, [sales(lender, STORY2 + timedelta(seconds=7 * WINDOW_S + 60), 1.0, 1.0, 9)]
            )
            w5 = window_start(5, STORY2)
            await until(
                system,
                lambda: {s.metric for s in stats_of(lender, bank_stream, w5)} == set(METRICS),
            )
            await system.wait_for(
                lender,
                lambda found: any(
                    ms(c.provenance.window_start) == w5  # type: ignore[arg-type]
                    for c in found
                ),
                types=["correlation"],
            )
            assert not any(isinstance(i, Correlation) for i in bank_stream)
            assert await bank_client.insights(types=["correlation"], owner=lender) == []

            # the firm revokes: the list is empty again, the open stream is told and gets no more
            await system.client(lender).revoke(grant.grant_id)
            assert await bank_client.insights(owner=lender, limit=1000) == []
            await until(system, lambda: any(n.event == "grant_revoked" for n in bank_sse.notices))
            delivered_before = len(stats_of(lender, bank_stream))
            for firm, events in phase(firms, 9, rng).items():
                await system.publish_json(firm, events)
            for firm, event in ticks(
                firms + fillers, STORY2 + timedelta(seconds=11 * WINDOW_S + 60)
            ).items():
                await system.publish_json(firm, [event])
            w9 = window_start(9, STORY2)
            await system.wait_for(
                lender, lambda f: len(stats_of(lender, f, w9)) == len(METRICS), types=["statistics"]
            )
            # a benchmark computed only after those statistics were served: when the bank has it,
            # its stream has been offered everything before it
            for firm, event in ticks(
                firms + fillers, STORY2 + timedelta(seconds=13 * WINDOW_S + 60)
            ).items():
                await system.publish_json(firm, [event])
            w11 = window_start(11, STORY2)
            await until(system, lambda: bool(benchmark_of(industry, bank_stream, w11)))
            assert len(stats_of(lender, bank_stream)) == delivered_before
            assert not stats_of(lender, bank_stream, w9)
            assert await bank_client.insights(owner=lender, limit=1000) == []


# --------------------------------------------------------------------------- story 3


def connect_decimal(value: Decimal, scale: int) -> str:
    """How Debezium writes a NUMERIC in JSON: base64 of the big-endian unscaled integer."""
    unscaled = int(value.scaleb(scale))
    size = max(1, (unscaled.bit_length() + 8) // 8)
    return base64.b64encode(unscaled.to_bytes(size, "big", signed=True)).decode()


ROW_FIELDS: list[dict[str, Any]] = [
    {"type": "string", "optional": False, "field": "order_no"},
    {"type": "int32", "optional": False, "field": "line_no"},
    {"type": "string", "optional": True, "field": "customer"},
    {"type": "string", "optional": True, "field": "sku"},
    {
        "type": "bytes",
        "optional": True,
        "name": "org.apache.kafka.connect.data.Decimal",
        "version": 1,
        "parameters": {"scale": "3", "connect.decimal.precision": "12"},
        "field": "qty",
    },
    {"type": "int64", "optional": True, "field": "price_cents"},
    {"type": "string", "optional": True, "field": "cur"},
    {
        "type": "int64",
        "optional": True,
        "name": "io.debezium.time.MicroTimestamp",
        "version": 1,
        "field": "ordered_at",
    },
]


def debezium_schema() -> dict[str, Any]:
    """The ``schema`` part of Debezium's PostgreSQL change events (JsonConverter)."""
    row = {
        "type": "struct",
        "fields": ROW_FIELDS,
        "optional": True,
        "name": "erp.public.sales_lines.Value",
    }
    return {
        "type": "struct",
        "name": "erp.public.sales_lines.Envelope",
        "optional": False,
        "fields": [
            {**row, "field": "before"},
            {**row, "field": "after"},
            {
                "type": "struct",
                "optional": False,
                "name": "io.debezium.connector.postgresql.Source",
                "field": "source",
                "fields": [
                    {"type": "string", "optional": False, "field": "connector"},
                    {"type": "string", "optional": False, "field": "schema"},
                    {"type": "string", "optional": False, "field": "table"},
                    {"type": "int64", "optional": True, "field": "lsn"},
                ],
            },
            {"type": "string", "optional": False, "field": "op"},
            {"type": "int64", "optional": True, "field": "ts_ms"},
        ],
    }


@dataclass(frozen=True)
class Row:
    """A row of the ERP's ``public.sales_lines`` table."""

    order_no: str
    qty: Decimal
    price_cents: int
    ordered_at: datetime

    def image(self) -> dict[str, Any]:
        return {
            "order_no": self.order_no,
            "line_no": 1,
            "customer": "C-311",
            "sku": "REBAR-12",
            "qty": connect_decimal(self.qty, 3),
            "price_cents": self.price_cents,
            "cur": "RMB",
            "ordered_at": ms(self.ordered_at) * 1000,
        }


def change(op: str, row: Row, lsn: int, before: Row | None = None) -> tuple[bytes, bytes]:
    """A Debezium PostgreSQL change event (key, value) as the connector writes it to Kafka; a
    delete (``d``) carries the whole row as its ``before`` image (REPLICA IDENTITY FULL)."""
    if op == "d":
        before = row
    payload = {
        "before": before.image() if before is not None else None,
        "after": None if op == "d" else row.image(),
        "source": {
            "version": "2.7.3.Final",
            "connector": "postgresql",
            "name": "erp",
            "ts_ms": 1_741_000_000_000 + lsn,
            "snapshot": "true" if op == "r" else "false",
            "db": "erpdb",
            "schema": "public",
            "table": "sales_lines",
            "txId": 900 + lsn,
            "lsn": lsn,
        },
        "op": op,
        "ts_ms": 1_741_000_000_500 + lsn,
    }
    key = encode({"order_no": row.order_no, "line_no": 1})
    return key, encode({"schema": debezium_schema(), "payload": payload})


def erp_mapping(tenant: str, topic: str) -> Mapping:
    """The integration engineer's mapping: the sales lines table onto ``sales_order_line``."""
    return parse_mapping(
        {
            "tenant": tenant,
            "topics": [topic],
            "tables": {
                "public.sales_lines": {
                    "event_type": "sales_order_line",
                    "record_id": ["order_no", "line_no"],
                    "occurred_at": {"column": "ordered_at"},
                    "timezone": "UTC",
                    "fields": {
                        "order_id": "order_no",
                        "line_no": "line_no",
                        "customer_id": "customer",
                        "product_sku": "sku",
                        "quantity": "qty",
                        "unit": {"constant": "pcs"},
                        "unit_price": {"column": "price_cents", "divide": 100},
                        "currency": {"column": "cur", "values": {"RMB": "CNY"}},
                    },
                }
            },
        }
    )


def row_frame(tenant: str, rows: list[Row]) -> pd.DataFrame:
    """The metrics of the rows as the table holds them (what statistics must describe)."""
    return pd.DataFrame(
        [
            {
                "tenant": tenant,
                "time_ms": ms(r.ordered_at),
                "sales.quantity": float(r.qty),
                "sales.amount_cny": float(r.qty) * float(Decimal(r.price_cents) / 100),
            }
            for r in rows
        ]
    )


async def test_erp_changes_stream_through_cdc_into_statistics_and_corrections_restate_rows(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    """Story 3, the ERP integration engineer: Debezium change events of a PostgreSQL table go
    through the CDC connector (configured by a mapping) into raw, clean and the firm's
    statistics. An update of a row arrives once (Debezium delivered it twice) as a correction of
    the row and replaces it in the statistics; a delete removes a row; a row deleted and
    inserted again with the same key counts with its new values."""
    tenant = f"erp-{uuid.uuid4().hex[:8]}"
    members = await register(settings, [(tenant, "partner", "rebar", "west")])
    topic = unique_name("erp.public.sales_lines")
    await create_topics(settings, [topic], partitions=1)  # one table, one ordered log
    mapping = erp_mapping(tenant, topic)
    rng = random.Random(20250305)

    def window_rows(w: int) -> list[Row]:
        start = STORY3 + timedelta(seconds=w * WINDOW_S)
        return [
            Row(
                f"SO-{w}{i:02d}",
                Decimal(str(round(rng.uniform(5, 80), 3))),
                rng.randrange(150, 400),
                start + timedelta(seconds=40 + 90 * i),
            )
            for i in range(6)
        ]

    table = {w: window_rows(w) for w in range(3)}
    original, deleted = table[1][2], table[2][4]
    updated = Row(original.order_no, original.qty + Decimal("7.250"), 333, original.ordered_at)
    messages = [change("r", r, 10 + i) for i, r in enumerate(table[0])]  # the initial snapshot
    messages += [change("c", r, 100 + i) for i, r in enumerate(table[1])]
    update = change("u", updated, 200, before=original)
    messages += [update, update]  # Debezium re-delivers after a connector restart
    messages += [change("c", r, 300 + i) for i, r in enumerate(table[2])]
    messages.append(change("d", deleted, 400))
    cycled = table[2][1]
    cycled_again = Row(cycled.order_no, cycled.qty + Decimal("2.500"), 250, cycled.ordered_at)
    messages += [change("d", cycled, 410), change("c", cycled_again, 420)]
    later = Row("SO-900", Decimal("1.000"), 100, STORY3 + timedelta(seconds=10 * WINDOW_S))
    messages.append(change("c", later, 500))  # the day goes on: the windows close
    # the table as it holds the rows now
    current = [r for rows in table.values() for r in rows if r != deleted]
    current[current.index(original)] = updated
    current[current.index(cycled)] = cycled_again
    expected = expected_statistics(row_frame(tenant, current))

    async with running_system(settings, unique_name, members, **ANALYTICS) as system:
        stop = asyncio.Event()
        cdc = asyncio.create_task(run_cdc(settings, mapping, stop, group=unique_name("ingest-cdc")))
        system.tasks.append(cdc)
        try:
            async with started(create_producer(settings)) as producer:
                for key, value in messages:  # in order, as Debezium writes the table's log
                    await producer.send_and_wait(topic, value, key=key)
            got = await system.wait_for(tenant, at_least(len(expected)), types=["statistics"])
        finally:
            stop.set()
            await asyncio.wait_for(cdc, TIMEOUT)
        cleaned = await read_topic(settings, system.clean_topic, lambda key: key == tenant.encode())
        duplicates = system.clean_status.duplicates

    # the firm's statistics equal describe() of the table's rows, window by window
    assert_statistics(got, expected)

    # on the clean topic: each change once (the update, the deletes, the second insert too)
    assert len(cleaned) == 3 * 6 + 1 + 2 + 1 + 1
    assert duplicates == 1  # the re-delivered update
    by_operation: dict[str, list[dict[str, Any]]] = {}
    for event in cleaned:
        by_operation.setdefault(event["source"]["operation"], []).append(event)
    (correction,), removals = by_operation["update"], by_operation["delete"]
    row = str(row_id(tenant, "public.sales_lines", f"{original.order_no}/1"))
    assert correction["corrects"] == row != correction["event_id"]
    assert correction["payload"]["quantity"] == float(updated.qty)
    # money stays exact: the cents divided by 100 as a decimal string, never a float
    assert Decimal(correction["payload"]["unit_price"]) == Decimal(updated.price_cents) / 100
    assert [e["corrects"] for e in cleaned].count(row) == 2  # its create and its update
    assert [e["corrects"] for e in removals] == [
        str(row_id(tenant, "public.sales_lines", f"{r.order_no}/1")) for r in (deleted, cycled)
    ]


# --------------------------------------------------------------------------- story 4


def free_port_block(size: int) -> int:
    """The first of ``size`` consecutive ports that are free on 127.0.0.1 right now."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20_000, 60_000)
        sockets = []
        try:
            for port in range(base, base + size):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError(f"no {size} consecutive free ports")


async def end_offsets(settings: XietongSettings, topics: list[str]) -> dict[TopicPartition, int]:
    await ensure_topics(settings, topics)
    async with started(create_producer(settings)) as producer:
        tps = [
            TopicPartition(t, p) for t in topics for p in sorted(await producer.partitions_for(t))
        ]
    async with started(create_consumer(settings, None)) as consumer:
        return dict(await consumer.end_offsets(tps))


async def records_since(
    settings: XietongSettings, marks: dict[TopicPartition, int], tenants: set[str]
) -> dict[str, int]:
    """Per topic: records after ``marks`` (up to the current end) keyed by one of ``tenants``."""
    ends = await end_offsets(settings, sorted({tp.topic for tp in marks}))
    counts = dict.fromkeys((tp.topic for tp in marks), 0)
    keys = {t.encode() for t in tenants}
    async with started(create_consumer(settings, None)) as consumer:
        todo = [tp for tp in marks if ends[tp] > marks[tp]]
        consumer.assign(todo)
        for tp in todo:
            consumer.seek(tp, marks[tp])
        remaining = set(todo)
        async with asyncio.timeout(TIMEOUT):
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=200, max_records=10_000)
                for tp, records in batch.items():
                    counts[tp.topic] += sum(
                        1 for r in records if r.offset < ends[tp] and r.key in keys
                    )
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
    return counts


def checkout_run_listing() -> tuple[set[str], bytes | None]:
    """The checkout's ``.run/``: its entries and its logs' (a ``make demo`` beside the suite
    keeps writing its stores under ``state/`` and appending to its logs, so neither the stores'
    files nor sizes are compared), and the demo's keys, which a demo run rewrites."""
    run = ROOT / ".run"
    entries = {p.name for p in run.iterdir()} if run.exists() else set()
    if (run / "logs").is_dir():
        entries |= {f"logs/{p.name}" for p in (run / "logs").iterdir()}
    keys = run / "demo-keys.json"
    return entries, keys.read_bytes() if keys.exists() else None


@pytest.mark.slow
async def test_the_operator_runs_the_demo_and_events_flow_through_every_stage(
    settings: XietongSettings, tmp_path: Path
) -> None:
    """Story 4, the operator: ``python -m deploy.local.demo`` starts every service as a
    process against the broker, registers simulated firms and lets them publish through the
    gateway; it stops by itself after ``--duration`` and exits 0, and in the meantime the
    firms' events reached the raw and clean topics and came back as insights. It keeps its
    logs, state, keys and clock in the run folder it is given: the checkout's ``.run/`` (which a
    ``make demo`` may be using) is left as it was."""
    before = checkout_run_listing()
    run = tmp_path / "run"
    firms = {f.tenant for f in make_firms(5)}
    watched = [EVENTS_RAW, EVENTS_CLEAN, *sorted(set(INSIGHT_TOPICS.values()))]
    marks = await end_offsets(settings, watched)
    gateway_port = free_port_block(1)
    # workers get base + their offset; a service the table does not list gets base + its length
    health_base = free_port_block(len(HEALTH_PORT_OFFSETS) + 1)
    env = {
        **os.environ,
        "XIETONG_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "XIETONG_KAFKA_PARTITIONS": str(settings.kafka_partitions),
        "XIETONG_LOG_FORMAT": "text",
        "XIETONG_NETWORK_SECRET": settings.network_key().decode(),
        "XIETONG_RUN_DIR": str(run),
    }
    output = tmp_path / "demo.out"
    with output.open("wb") as out:
        demo = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "deploy.local.demo",
            "--duration",
            "25",
            "--firms",
            "5",
            "--rate",
            "200",
            "--gateway-port",
            str(gateway_port),
            "--health-port-base",
            str(health_base),
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            code = await asyncio.wait_for(demo.wait(), 400)
        except TimeoutError:
            demo.kill()
            await demo.wait()
            raise
    tail = output.read_text(errors="replace")[-3000:]
    assert code == 0, tail
    assert "demo stopped" in tail

    counts = await records_since(settings, marks, firms)
    assert counts[EVENTS_RAW] > 0, (counts, tail)
    assert 0 < counts[EVENTS_CLEAN] <= counts[EVENTS_RAW], (counts, tail)
    insights = {t: n for t, n in counts.items() if t.startswith("insights.")}
    assert sum(insights.values()) > 0, (counts, tail)

    assert checkout_run_listing() == before
    assert (run / "logs" / "ingest.log").exists() and (run / "state").is_dir()
    assert set(json.loads((run / "demo-keys.json").read_text())) == firms
    assert set(load_clock(run / "demo-clock.json")) == firms
