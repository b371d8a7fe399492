"""The analytics computations against pandas and scikit-learn, without a broker."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from sklearn.preprocessing import StandardScaler

from schemas.events import CleanEvent
from schemas.insights import NETWORK_TENANT, Benchmark, ClusterAssignment, Insight, Statistics
from services.analytics.app import parse_clean_event
from services.analytics.disclosure import Bounds
from services.analytics.handlers import (
    NetworkConfig,
    NetworkState,
    Origin,
    benchmark_or_none,
    correlation_insight,
    describe_metrics,
    firm_summary,
    fit_clusters,
    insight_id,
    statistics_insights,
    watermark_mark,
    window_insights,
)
from services.analytics.windows import Window
from shared.codec import encode

NOW = datetime(2026, 11, 25, tzinfo=UTC)
KEY = b"test-network-secret"
ORIGIN = Origin(source_topics=("events.clean.v1",), service_version="test", network_key=KEY)
T0 = int(datetime(2026, 11, 2, 10, tzinfo=UTC).timestamp() * 1000)
HOUR_MS = 3_600_000


def sample_window(seed: int = 1, tenant: str = "acme") -> Window:
    rng = random.Random(seed)
    window = Window(3600, tenant, T0, first_offset=0)
    for minute in range(60):
        qty = rng.uniform(1, 100)
        row: dict[str, float] = {
            "sales.quantity": qty,
            "sales.amount_cny": qty * 12.5 + rng.gauss(0, 30),
        }
        if minute % 3 == 0:
            row = {"inventory.on_hand": 1000 - minute * 7 + rng.gauss(0, 5)}
        window.times_ms.append(T0 + minute * 60_000 + rng.randrange(0, 59_000))
        window.rows.append(row)
    window.schema_versions = {"sales_order_line": 1, "inventory_level": 1}
    return window


# --------------------------------------------------------------------------- statistics


def test_statistics_equal_pandas_describe_of_each_metric() -> None:
    window = sample_window()
    insights = statistics_insights(window, ORIGIN, NOW)
    assert sorted(i.metric for i in insights) == [
        "inventory.on_hand",
        "sales.amount_cny",
        "sales.quantity",
    ]
    for insight in insights:
        series = pd.Series([r[insight.metric] for r in window.rows if insight.metric in r])
        expected = series.describe()
        assert insight.count == expected["count"]
        for field, stat in [("mean", "mean"), ("std", "std"), ("min", "min"), ("p25", "25%"),
                            ("p50", "50%"), ("p75", "75%"), ("max", "max")]:  # fmt: skip
            assert getattr(insight, field) == pytest.approx(expected[stat], rel=1e-12)
        assert insight.tenant == "acme"
        assert insight.provenance.event_count == insight.count
        assert insight.provenance.window_end is not None
        assert insight.provenance.window_start is not None
        assert (insight.provenance.window_end - insight.provenance.window_start).seconds == 3600
        assert insight.insight_id == insight_id(KEY, "statistics", "acme", insight.metric, 3600, T0)


def test_a_single_value_has_no_standard_deviation() -> None:
    stats = describe_metrics([{"x": 4.0}])
    assert stats["x"]["count"] == 1
    assert stats["x"]["std"] is None
    assert stats["x"]["50%"] == 4.0


def test_insight_ids_are_deterministic_and_distinct() -> None:
    a = statistics_insights(sample_window(1), ORIGIN, NOW)
    b = statistics_insights(sample_window(2), ORIGIN, datetime.now(UTC))
    assert [i.insight_id for i in a] == [i.insight_id for i in b]
    assert len({i.insight_id for i in a}) == len(a)
    other = statistics_insights(sample_window(1, tenant="bolt"), ORIGIN, NOW)
    assert not {i.insight_id for i in a} & {i.insight_id for i in other}


def test_insight_ids_are_keyed_by_the_network_secret() -> None:
    # an id must not tell a tenant which insights exist for a rival: without the secret it
    # cannot be computed from what it is about (it was a uuid5 of public parts)
    parts = ("statistics", "rival", "sales.amount_cny", 3600, T0)
    assert insight_id(KEY, *parts) == insight_id(KEY, *parts)
    assert insight_id(KEY, *parts) != insight_id(b"another-secret", *parts)
    assert insight_id(KEY, *parts) != insight_id(KEY, "statistics", "rival", "x", 3600, T0)
    uuid5 = __import__("uuid").uuid5
    old = uuid5(
        __import__("uuid").UUID("5b3e2f0e-7a51-4f3c-9d0a-6c1f3b2a9e11"),
        "|".join(str(p) for p in parts),
    )
    assert insight_id(KEY, *parts) != old
    assert insight_id(KEY, *parts).version == 8
    other = Origin(("events.clean.v1",), "test", b"another-secret")
    mine = statistics_insights(sample_window(1), ORIGIN, NOW)
    theirs = statistics_insights(sample_window(1), other, NOW)
    assert not {i.insight_id for i in mine} & {i.insight_id for i in theirs}


# --------------------------------------------------------------------------- correlation


def test_correlation_equals_pandas_corr_on_the_aligned_metrics() -> None:
    window = sample_window()
    insight = correlation_insight(window, ORIGIN, NOW, align_s=300, min_points=3)
    assert insight is not None
    frame = pd.DataFrame(window.rows)
    frame["bucket"] = [t // 300_000 for t in window.times_ms]
    expected = frame.groupby("bucket").mean().sort_index(axis=1).corr(min_periods=3)
    assert insight.metrics == list(expected.columns)
    for i, row in enumerate(expected.to_numpy()):
        for j, value in enumerate(row):
            assert insight.matrix[i][j] == pytest.approx(value, rel=1e-9)
    # quantity and amount move together; inventory falls through the hour
    at = insight.metrics.index
    assert (insight.matrix[at("sales.quantity")][at("sales.amount_cny")] or 0.0) > 0.9


def test_pairs_with_too_few_aligned_points_are_null() -> None:
    window = Window(3600, "acme", T0, 0)
    for minute, row in enumerate(
        [{"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 4.1}, {"a": 3.0, "b": 5.9}, {"a": 4.0, "c": 1.0}]
    ):
        window.times_ms.append(T0 + minute * 60_000)
        window.rows.append(row)
    insight = correlation_insight(window, ORIGIN, NOW, align_s=60, min_points=3)
    assert insight is not None
    assert insight.metrics == ["a", "b", "c"]
    assert insight.matrix[0][1] == pytest.approx(np.corrcoef([1, 2, 3], [2, 4.1, 5.9])[0, 1])
    assert insight.matrix[0][2] is None and insight.matrix[2][2] is None


def test_no_correlation_with_one_metric_or_fewer_than_three_points() -> None:
    one_metric = Window(3600, "acme", T0, 0, [T0, T0 + 60_000, T0 + 120_000], [{"a": 1.0}] * 3)
    assert correlation_insight(one_metric, ORIGIN, NOW, align_s=60, min_points=3) is None
    two_points = Window(3600, "acme", T0, 0, [T0, T0 + 60_000], [{"a": 1.0, "b": 2.0}] * 2)
    assert correlation_insight(two_points, ORIGIN, NOW, align_s=60, min_points=3) is None


# --------------------------------------------------------------------------- benchmarks


WIDE = Bounds(0.0, 1000.0)


def figures(values: dict[str, float], about: tuple[object, ...] = ("s", "m", 1)) -> Any:
    return benchmark_or_none(values, k=5, bounds=WIDE, epsilon=6.0, key=KEY, about=about)


def test_benchmark_needs_k_firms_and_its_figures_stay_in_the_declared_range() -> None:
    values = {f"f{i}": 100.0 + 10 * i for i in range(5)}
    assert figures(dict(list(values.items())[:4])) is None
    got = figures(values)
    assert got is not None
    assert got.firms == 5
    assert list(got.quantiles) == ["p10", "p25", "p50", "p75", "p90"]
    quantiles = list(got.quantiles.values())
    assert quantiles == sorted(quantiles)
    assert all(0.0 <= q <= 1000.0 for q in [*quantiles, got.mean])
    # values outside the declared range count as its ends
    assert figures({**values, "f0": -5e9}) == figures({**values, "f0": 0.0})


def test_the_same_inputs_give_the_same_figures_and_other_inputs_fresh_noise() -> None:
    values = {f"f{i}": 100.0 + 10 * i for i in range(5)}
    assert figures(values) == figures(dict(reversed(values.items())))  # a re-run republishes it
    assert figures(values) != figures(values, about=("s", "m", 2))  # another window
    moved = figures({**values, "f4": 141.0})
    assert moved is not None
    assert figures(values).mean - moved.mean != pytest.approx(-1.0 / 5)  # not the same noise
    other_key = benchmark_or_none(values, k=5, bounds=WIDE, epsilon=6.0, key=b"x", about=("s",))
    assert other_key != figures(values, about=("s",))


def test_a_dominant_firm_no_longer_decides_whether_a_benchmark_is_published() -> None:
    # the old p-percent rule suppressed on the values, so its silence said something about them
    assert figures({"big": 700.0, "a": 100.0, "b": 100.0, "c": 50.0, "d": 50.0}) is not None


def test_firms_without_a_finite_value_do_not_count() -> None:
    values = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": math.nan}
    assert figures(values) is None
    assert figures({**values, "e": 5.0}) is not None


# --------------------------------------------------------------------------- clusters


def blobs(seed: int = 3) -> tuple[pd.DataFrame, dict[str, int]]:
    """Firms from three well separated groups of KPIs (units very different per KPI)."""
    rng = np.random.default_rng(seed)
    centres = [(100.0, 1_000.0, 5_000.0), (400.0, 9_000.0, 800.0), (900.0, 3_000.0, 20_000.0)]
    rows, truth = {}, {}
    for g, centre in enumerate(centres):
        for i in range(4 + g):
            firm = f"g{g}-firm{i}"
            rows[firm] = rng.normal(centre, [10.0, 100.0, 400.0])
            truth[firm] = g
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=["q", "amount", "stock"])
    return frame.sample(frac=1.0, random_state=1), truth


def partition(firms: list[str], labels: list[int]) -> set[frozenset[str]]:
    groups: dict[int, set[str]] = {}
    for firm, label in zip(firms, labels, strict=True):
        groups.setdefault(label, set()).add(firm)
    return {frozenset(g) for g in groups.values()}


def test_clusters_equal_sklearn_with_the_same_seed_and_recover_the_groups() -> None:
    kpis, truth = blobs()
    fit = fit_clusters(kpis, k_min=2, k_max=8, seed=11, n_init=5)
    assert fit is not None
    assert fit.k == 3
    assert partition(fit.firms, fit.labels) == partition(list(truth), list(truth.values()))

    ordered = kpis.sort_index()
    scaler = StandardScaler().fit(ordered.to_numpy())
    scaled = scaler.transform(ordered.to_numpy())
    scores = {
        k: silhouette_score(
            scaled, KMeans(n_clusters=k, random_state=11, n_init=5).fit(scaled).labels_
        )
        for k in range(2, 9)
    }
    assert fit.k == max(scores, key=lambda k: scores[k])
    assert fit.silhouette == pytest.approx(scores[fit.k])
    direct = KMeans(n_clusters=fit.k, random_state=11, n_init=5).fit(scaled)
    assert fit.labels == [int(x) for x in direct.labels_]
    assert fit.values == ordered.to_numpy().tolist()
    assert fit.features == ["q", "amount", "stock"]
    assert sorted(fit.sizes) == [4, 5, 6]


def test_too_few_firms_or_missing_kpis_give_no_fit() -> None:
    kpis, _ = blobs()
    assert fit_clusters(kpis.iloc[:2], k_min=2, k_max=8, seed=1, n_init=2) is None
    gappy = kpis.copy()
    gappy.iloc[3:, 0] = np.nan
    assert fit_clusters(gappy, k_min=2, k_max=8, seed=1, n_init=2) is not None  # 3 complete
    assert fit_clusters(gappy.iloc[1:], k_min=2, k_max=8, seed=1, n_init=2) is None


# --------------------------------------------------------------------------- network state


def config(**overrides: Any) -> NetworkConfig:
    values: dict[str, Any] = {
        "main_size_s": 3600,
        "retain_windows": 48,
        "benchmark_min_firms": 5,
        "benchmark_epsilon": 6.0,
        "benchmark_bounds": {"q": Bounds(0.0, 1000.0), "amount": Bounds(0.0, 20_000.0)},
        "benchmark_metrics": (),
        "cluster_metrics": ("q", "amount"),
        "cluster_k_min": 2,
        "cluster_k_max": 4,
        "cluster_seed": 5,
        "cluster_n_init": 3,
        "cluster_period_windows": 24,
        "cluster_refit_windows": 1,
        "cluster_min_profile_firms": 3,
        "cluster_profile_epsilon": 6.0,
        **overrides,
    }
    return NetworkConfig(**values)


def summary(tenant: str, values: dict[str, list[float]], start_ms: int = T0) -> dict[str, Any]:
    window = Window(3600, tenant, start_ms, 0)
    n = max(len(v) for v in values.values())
    for i in range(n):
        window.times_ms.append(start_ms + i)
        window.rows.append({m: v[i] for m, v in values.items() if i < len(v)})
    window.schema_versions = {"sales_order_line": 1}
    return firm_summary(window, "events.clean.v1")


def segments(tenant: str) -> tuple[str, str] | None:
    return (
        None
        if tenant.startswith("x")
        else (("metal", "east") if tenant < "m" else ("food", "west"))
    )


def published(
    values: dict[str, float], metric: str = "q", start_ms: int = T0, size_s: int = 3600, k: int = 5
) -> Any:
    """What the network publishes for these per-firm values of metal/east (the same key)."""
    bounds = config().benchmark_bounds[metric]
    about = ("metal", "east", metric, size_s, start_ms)
    return benchmark_or_none(values, k=k, bounds=bounds, epsilon=6.0, key=KEY, about=about)


def test_benchmarks_wait_for_every_partition_and_are_never_revised() -> None:
    state = NetworkState(config(), ORIGIN)
    firms = ["a1", "a2", "a3", "a4", "a5", "a6"]
    for firm in firms[:5]:
        assert state.apply(summary(firm, {"q": [float(len(firm) + ord(firm[1]))]}), segments) == []
    assert state.apply(watermark_mark("events.clean.v1", 0, 2, T0 + 2 * HOUR_MS), segments) == []
    # partition 1 has not reported yet: nothing is complete
    out = state.apply(watermark_mark("events.clean.v1", 1, 2, T0 + HOUR_MS), segments)
    benchmarks = [i for i in out if isinstance(i, Benchmark)]
    assert [(b.metric, b.industry, b.region, b.firms) for b in benchmarks] == [
        ("q", "metal", "east", 5)
    ]
    b = benchmarks[0]
    assert b.tenant == NETWORK_TENANT and b.visibility == "public"
    assert b.provenance.contributing_partners == 5
    # the private figures of exactly the five firms' means
    want = published({f: float(2 + ord(f[1])) for f in firms[:5]})
    assert (b.quantiles, b.mean) == (want.quantiles, want.mean)
    # a sixth firm's summary for the completed window is ignored: no revision to difference
    assert state.apply(summary("a6", {"q": [1.0]}), segments) == []
    assert state.apply(watermark_mark("events.clean.v1", 1, 2, T0 + 3 * HOUR_MS), segments) == []
    assert state.ignored_late == 1


def test_an_idle_partition_is_not_waited_for_and_unknown_segments_are_left_out() -> None:
    state = NetworkState(config(benchmark_min_firms=2), ORIGIN)
    for firm, value in [("a1", 1.0), ("a2", 1.5), ("x1", 100.0)]:
        state.apply(summary(firm, {"q": [value]}), segments)
    state.apply(watermark_mark("t", 0, 2, T0 + HOUR_MS), segments)
    out = state.apply(watermark_mark("t", 1, 2, None), segments)
    want = published({"a1": 1.0, "a2": 1.5}, k=2)
    assert [(b.firms, b.mean) for b in out if isinstance(b, Benchmark)] == [(2, want.mean)]


def test_a_quiet_partition_is_not_waited_for_until_it_speaks_again() -> None:
    state = NetworkState(config(benchmark_min_firms=2), ORIGIN)
    topic = "events.clean.v1"
    for firm, value in [("a1", 1.0), ("a2", 1.2)]:
        state.apply(summary(firm, {"q": [value]}), segments)
        state.apply(summary(firm, {"q": [value]}, T0 + HOUR_MS), segments)

    def windows(out: list[Any]) -> list[tuple[datetime, int]]:
        return [(b.provenance.window_start, b.firms) for b in out if isinstance(b, Benchmark)]

    assert state.apply(watermark_mark(topic, 0, 2, T0 + HOUR_MS + 1), segments) == []
    assert state.apply(watermark_mark(topic, 1, 2, T0 + HOUR_MS // 2), segments) == []
    # partition 1 had events, then went quiet: the first window no longer waits for it
    first = datetime.fromtimestamp(T0 / 1000, UTC)
    assert windows(state.apply(watermark_mark(topic, 1, 2, None), segments)) == [(first, 2)]
    # it speaks again, behind the rest: the network waits for it again, nothing is redone
    assert state.apply(watermark_mark(topic, 1, 2, T0 + HOUR_MS // 2), segments) == []
    assert state.network_watermark() == T0 + HOUR_MS // 2
    assert state.apply(watermark_mark(topic, 0, 2, T0 + 2 * HOUR_MS), segments) == []
    second = datetime.fromtimestamp((T0 + HOUR_MS) / 1000, UTC)
    out = state.apply(watermark_mark(topic, 1, 2, T0 + 2 * HOUR_MS), segments)
    assert windows(out) == [(second, 2)]


def test_clusters_are_refitted_on_complete_windows_and_hide_small_profiles() -> None:
    state = NetworkState(config(cluster_refit_windows=2), ORIGIN)
    kpis, truth = blobs()
    for firm, row in kpis.iterrows():
        # two windows per firm: the KPI is the mean over both (count-weighted)
        state.apply(
            summary(str(firm), {"q": [row["q"] - 1, row["q"] + 1], "amount": [row["amount"]]}),
            segments,
        )
        state.apply(
            summary(str(firm), {"q": [row["q"]], "amount": [row["amount"]]}, T0 + HOUR_MS), segments
        )
    out = state.apply(watermark_mark("t", 0, 1, T0 + 2 * HOUR_MS), segments)
    assigned = [i for i in out if isinstance(i, ClusterAssignment)]
    assert sorted(a.tenant for a in assigned) == sorted(truth)
    expected = fit_clusters(kpis[["q", "amount"]], k_min=2, k_max=4, seed=5, n_init=3)
    assert expected is not None
    labels = {a.tenant: a.cluster for a in assigned}
    assert partition(list(labels), list(labels.values())) == partition(
        expected.firms, expected.labels
    )
    first = assigned[0]
    assert first.provenance.contributing_partners == len(truth)
    assert first.provenance.event_count == 3 * len(truth)
    assert all(a.model_version == first.model_version for a in assigned)
    # one more complete window is not enough for a refit every two windows
    state.apply(summary("g0-firm0", {"q": [1.0], "amount": [1.0]}, T0 + 2 * HOUR_MS), segments)
    later = state.apply(watermark_mark("t", 0, 1, T0 + 3 * HOUR_MS), segments)
    assert not [i for i in later if isinstance(i, ClusterAssignment)]

    tiny = NetworkState(config(cluster_min_profile_firms=5), ORIGIN)
    for firm, row in kpis.iterrows():
        tiny.apply(summary(str(firm), {"q": [row["q"]], "amount": [row["amount"]]}), segments)
    hidden = tiny.apply(watermark_mark("t", 0, 1, T0 + HOUR_MS), segments)
    one = next(i for i in hidden if isinstance(i, ClusterAssignment))
    assert [bool(p) for p in one.profiles] == [size >= 5 for size in one.cluster_sizes]
    # shown profiles are private means in the KPIs' declared ranges, the same on a re-run
    again = NetworkState(config(cluster_min_profile_firms=5), ORIGIN)
    for firm, row in kpis.iterrows():
        again.apply(summary(str(firm), {"q": [row["q"]], "amount": [row["amount"]]}), segments)
    rerun = again.apply(watermark_mark("t", 0, 1, T0 + HOUR_MS), segments)
    assert [i.model_dump(exclude={"provenance"}) for i in rerun] == [
        i.model_dump(exclude={"provenance"}) for i in hidden
    ]
    for profile in one.profiles:
        if profile:
            assert set(profile) == {"q", "amount"}
            assert 0 <= profile["q"] <= 1000 and 0 <= profile["amount"] <= 20_000


# --------------------------------------------------------------------------- decoding


def test_parse_clean_event_reads_a_clean_event_and_refuses_junk() -> None:
    event = CleanEvent.model_validate(
        {
            "event_id": "6f1c1c8e-1f8e-4b55-9a3f-0a6f0f7d2f10",
            "tenant": "acme",
            "type": "sales_order_line",
            "schema_version": 1,
            "occurred_at": "2026-11-02T10:15:00+08:00",
            "source": {"system": "erp", "record_id": "1"},
            "payload": {"quantity": 3},
            "metrics": {"sales.quantity": 3, "sales.amount_cny": 37.5},
        }
    )
    parsed = parse_clean_event(42, encode(event))
    assert parsed.tenant == "acme" and parsed.offset == 42
    assert parsed.time_ms == int(datetime(2026, 11, 2, 2, 15, tzinfo=UTC).timestamp() * 1000)
    assert parsed.metrics == {"sales.quantity": 3.0, "sales.amount_cny": 37.5}
    for junk in [b"{", b"[]", b'{"tenant": "a"}', None]:
        with pytest.raises(ValueError):
            parse_clean_event(0, junk)
    bad_metric = encode({**event.model_dump(mode="json"), "metrics": {"x": "many"}})
    with pytest.raises(ValueError, match="not a number"):
        parse_clean_event(0, bad_metric)


def test_a_batch_of_windows_gives_what_each_window_gives_alone() -> None:
    windows = [
        sample_window(seed, tenant)
        for seed, tenant in [(1, "firm-a"), (2, "firm-b"), (3, "firm-c")]
    ]
    windows.append(Window(3600, "firm-d", T0, 0, [T0], [{"x": 1.0}]))  # one value, one metric
    batch = window_insights(windows, ORIGIN, NOW, align_s=300, min_points=3)
    alone: list[Insight] = []
    for window in windows:
        alone += statistics_insights(window, ORIGIN, NOW)
        correlation = correlation_insight(window, ORIGIN, NOW, align_s=300, min_points=3)
        if correlation is not None:
            alone.append(correlation)
    assert len(batch) == len(alone) == 3 * 4 + 1
    for got, want in zip(batch, alone, strict=True):
        assert got.model_dump() == want.model_dump()
    # and both equal pandas on each window's own frame
    for window in windows:
        frame = pd.DataFrame(window.rows)
        for insight in (
            i for i in batch if isinstance(i, Statistics) and i.tenant == window.tenant
        ):
            assert insight.mean == pytest.approx(frame[insight.metric].mean(), rel=1e-12)
            assert insight.p75 == pytest.approx(frame[insight.metric].quantile(0.75), rel=1e-12)


def test_daily_windows_are_benchmarked_on_their_own_and_not_clustered() -> None:
    state = NetworkState(config(benchmark_min_firms=2), ORIGIN)
    day = 86_400
    start = T0 - T0 % (day * 1000)
    for firm, value in [("a1", 1.0), ("a2", 3.0), ("a3", 2.0)]:
        message = summary(firm, {"q": [value], "amount": [value]})
        state.apply(message, segments)
        state.apply({**message, "size_s": day, "start_ms": start}, segments)
    hourly = state.apply(watermark_mark("t", 0, 1, T0 + HOUR_MS), segments)
    assert {(b.provenance.window_end - b.provenance.window_start).total_seconds()  # type: ignore[operator]
            for b in hourly if isinstance(b, Benchmark)} == {3600}  # fmt: skip
    assert len([i for i in hourly if isinstance(i, ClusterAssignment)]) == 3
    daily = state.apply(watermark_mark("t", 0, 1, start + day * 1000), segments)
    assert {(b.metric, b.firms) for b in daily if isinstance(b, Benchmark)} == {
        ("q", 3),
        ("amount", 3),
    }
    assert not [i for i in daily if isinstance(i, ClusterAssignment)]
