"""The analytics work as plain functions over pandas frames, tested without a broker.

- :func:`window_insights`: for every window a batch closed, pandas ``describe()`` of each
  metric (:func:`describe_windows`, grouped calls) and the correlations (below);
- :func:`correlation_insight`: pandas ``corr`` between a firm's metrics over a window, the
  metrics aligned on event-time buckets (``align_s``) because different event types rarely share
  a timestamp;
- :func:`benchmark_or_none`: differentially private quantiles and mean of per-firm values
  across firms (:mod:`.disclosure`), or nothing when fewer than ``k`` firms contributed;
- :func:`fit_clusters`: KMeans over standardised per-firm KPI vectors, ``k`` chosen by
  silhouette;
- :class:`NetworkState`: the cross-firm side — closed per-firm window summaries and the source
  partitions' watermarks, from which benchmarks and cluster refits fall due.

Insight ids are deterministic for a network secret (a keyed hash of what the insight is about,
:func:`.disclosure.keyed_uuid`), so an insight computed twice — after a restart re-reads its
events — is the same insight, not a second one, and nobody without the secret can tell from an
id which insights exist.
"""

from __future__ import annotations

import hashlib
import math
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, cast

import numpy as np
import pandas as pd

from schemas.insights import (
    NETWORK_TENANT,
    Benchmark,
    ClusterAssignment,
    Correlation,
    Insight,
    Provenance,
    Statistics,
)
from schemas.internal import FirmWindowSummary, MetricPartial, PartitionWatermark
from services.analytics.disclosure import (
    Bounds,
    PrivateFigures,
    dp_mean,
    inputs_digest,
    keyed_rng,
    keyed_uuid,
    private_benchmark,
)
from services.analytics.windows import Window

SERVICE = "analytics"


def service_version() -> str:
    try:
        return metadata.version("xietong")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


def insight_id(key: bytes, *parts: object) -> uuid.UUID:
    """The id of an insight about ``parts`` (type, tenant, metric, window ...) under the network
    secret ``key``: deterministic, but unpredictable without the key."""
    return keyed_uuid(key, *parts)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def finite(value: Any) -> float | None:
    """A plain float, or None for NaN, infinities and missing values."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class Origin:
    """What every insight of one run says about where it comes from."""

    source_topics: tuple[str, ...]
    service_version: str
    network_key: bytes = field(repr=False)
    """The network secret: keys insight ids and the benchmark noise."""

    def provenance(
        self,
        *,
        start_ms: int | None,
        end_ms: int | None,
        partners: int,
        events: int,
        schema_versions: Mapping[str, int],
        produced_at: datetime,
    ) -> Provenance:
        return Provenance(
            window_start=None if start_ms is None else from_ms(start_ms),
            window_end=None if end_ms is None else from_ms(end_ms),
            contributing_partners=partners,
            event_count=events,
            source_topics=list(self.source_topics),
            schema_versions=dict(schema_versions),
            service=SERVICE,
            service_version=self.service_version,
            produced_at=produced_at,
        )


# --------------------------------------------------------------------------- per firm


def metric_frame(rows: Iterable[Mapping[str, float]]) -> pd.DataFrame:
    """One row per event, one column per metric (sorted), NaN where an event lacks a metric."""
    frame = pd.DataFrame.from_records(list(rows)).astype(float)
    return frame.reindex(columns=sorted(frame.columns))


def long_frame(windows: Sequence[Window]) -> pd.DataFrame:
    """All values of ``windows`` in one frame: ``win`` (index in ``windows``), ``time_ms``,
    ``metric``, ``value`` — so that one pandas call serves every window closed in a batch."""
    win: list[int] = []
    times: list[int] = []
    metrics: list[str] = []
    values: list[float] = []
    for i, window in enumerate(windows):
        for time_ms, row in zip(window.times_ms, window.rows, strict=True):
            for metric, value in row.items():
                win.append(i)
                times.append(time_ms)
                metrics.append(metric)
                values.append(value)
    return pd.DataFrame(
        {
            "win": np.asarray(win, dtype=np.int64),
            "time_ms": np.asarray(times, dtype=np.int64),
            "metric": metrics,
            "value": np.asarray(values, dtype=float),
        }
    )


Described = dict[str, dict[str, float | None]]
"""metric -> describe() statistic (count, mean, std, min, 25%, 50%, 75%, max) -> value."""


def describe_windows(windows: Sequence[Window]) -> list[Described]:
    """pandas ``describe()`` of every metric of every window, in one grouped call."""
    out: list[Described] = [{} for _ in windows]
    long = long_frame(windows)
    if long.empty:
        return out
    # what describe() computes, as grouped aggregations (groupby().describe() runs per group)
    grouped = long.groupby(["win", "metric"], sort=True)["value"]
    moments = grouped.agg(["count", "mean", "std", "min", "max"])
    quartiles = grouped.quantile(np.array([0.25, 0.5, 0.75])).unstack()
    described = pd.concat(
        [moments[["count", "mean", "std", "min"]], quartiles, moments[["max"]]], axis=1
    )
    columns = ["count", "mean", "std", "min", "25%", "50%", "75%", "max"]
    for (win, metric), row in zip(described.index, described.to_numpy().tolist(), strict=True):
        out[int(win)][str(metric)] = dict(zip(columns, map(finite, row), strict=True))
    return out


def describe_metrics(rows: Iterable[Mapping[str, float]]) -> Described:
    """``describe()`` of every metric: count, mean, std (ddof=1), min, 25%, 50%, 75%, max."""
    window = Window(0, "", 0, 0)
    for row in rows:
        window.times_ms.append(0)
        window.rows.append(dict(row))
    return describe_windows([window])[0]


def build_statistics(
    window: Window, described: Described, origin: Origin, produced_at: datetime
) -> list[Statistics]:
    insights = []
    for metric, d in described.items():
        count = int(d["count"] or 0)
        if count == 0:
            continue
        insights.append(
            Statistics(
                insight_id=insight_id(
                    origin.network_key,
                    "statistics",
                    window.tenant,
                    metric,
                    window.size_s,
                    window.start_ms,
                ),
                tenant=window.tenant,
                provenance=origin.provenance(
                    start_ms=window.start_ms,
                    end_ms=window.end_ms,
                    partners=1,
                    events=count,
                    schema_versions=window.schema_versions,
                    produced_at=produced_at,
                ),
                metric=metric,
                count=count,
                mean=d["mean"],
                std=d["std"],
                min=d["min"],
                p25=d["25%"],
                p50=d["50%"],
                p75=d["75%"],
                max=d["max"],
            )
        )
    return insights


def statistics_insights(window: Window, origin: Origin, produced_at: datetime) -> list[Statistics]:
    """One :class:`Statistics` per metric of a closed firm window."""
    return build_statistics(window, describe_windows([window])[0], origin, produced_at)


def aligned_windows(windows: Sequence[Window], align_s: int) -> list[pd.DataFrame]:
    """Per window: its metrics (columns, sorted) averaged per event-time bucket of ``align_s``
    seconds (rows): the aligned points correlations are computed on."""
    long = long_frame(windows)
    out = [pd.DataFrame() for _ in windows]
    if long.empty:
        return out
    long["bucket"] = long["time_ms"] // (align_s * 1000)
    means = long.groupby(["win", "bucket", "metric"], sort=True)["value"].mean()
    wide = means.unstack("metric")
    for win, frame in wide.groupby(level="win", sort=False):
        out[int(cast(Any, win))] = frame.droplevel("win").dropna(axis=1, how="all")
    return out


def aligned_metrics(
    times_ms: Iterable[int], rows: Iterable[Mapping[str, float]], align_s: int
) -> pd.DataFrame:
    """Metrics averaged per event-time bucket of ``align_s`` seconds: the aligned points."""
    window = Window(0, "", 0, 0, list(times_ms), [dict(r) for r in rows])
    return aligned_windows([window], align_s)[0]


def correlate(aligned: pd.DataFrame, min_points: int) -> tuple[list[str], list[list[float | None]]]:
    """Pairwise Pearson correlation (pandas ``corr``); null where fewer than ``min_points``."""
    matrix = aligned.corr(method="pearson", min_periods=min_points)
    metrics = [str(c) for c in matrix.columns]
    return metrics, [[finite(v) for v in row] for row in matrix.to_numpy().tolist()]


def build_correlation(
    window: Window,
    aligned: pd.DataFrame,
    origin: Origin,
    produced_at: datetime,
    *,
    min_points: int,
) -> Correlation | None:
    if aligned.shape[1] < 2 or aligned.shape[0] < min_points:
        return None
    metrics, matrix = correlate(aligned, min_points)
    return Correlation(
        insight_id=insight_id(
            origin.network_key, "correlation", window.tenant, window.size_s, window.start_ms
        ),
        tenant=window.tenant,
        provenance=origin.provenance(
            start_ms=window.start_ms,
            end_ms=window.end_ms,
            partners=1,
            events=len(window.rows),
            schema_versions=window.schema_versions,
            produced_at=produced_at,
        ),
        metrics=metrics,
        matrix=matrix,
    )


def correlation_insight(
    window: Window, origin: Origin, produced_at: datetime, *, align_s: int, min_points: int
) -> Correlation | None:
    """Correlations between a firm's metrics over a window, when there is anything to correlate:
    at least two metrics and ``min_points`` aligned points."""
    aligned = aligned_windows([window], align_s)[0]
    return build_correlation(window, aligned, origin, produced_at, min_points=min_points)


def window_insights(
    windows: Sequence[Window],
    origin: Origin,
    produced_at: datetime,
    *,
    align_s: int,
    min_points: int,
) -> list[Insight]:
    """Statistics and correlations of every window closed in a batch (grouped pandas calls)."""
    insights: list[Insight] = []
    described = describe_windows(windows)
    aligned = aligned_windows(windows, align_s)
    for window, stats, points in zip(windows, described, aligned, strict=True):
        insights += build_statistics(window, stats, origin, produced_at)
        correlation = build_correlation(window, points, origin, produced_at, min_points=min_points)
        if correlation is not None:
            insights.append(correlation)
    return insights


def firm_summary(window: Window, source_topic: str) -> dict[str, Any]:
    """What the cross-firm side needs of a closed firm window: per metric count and sum."""
    sums: dict[str, list[float]] = {}
    for row in window.rows:
        for metric, value in row.items():
            acc = sums.setdefault(metric, [0, 0.0])
            acc[0] += 1
            acc[1] += value
    # Built through the contract of the internal topic, so what is sent is what AsyncAPI says.
    return FirmWindowSummary(
        tenant=window.tenant,
        size_s=window.size_s,
        start_ms=window.start_ms,
        event_count=len(window.rows),
        metrics={m: MetricPartial(count=int(c), sum=s) for m, (c, s) in sorted(sums.items())},
        schema_versions=window.schema_versions,
        source_topic=source_topic,
    ).model_dump(mode="json")


def watermark_mark(
    source_topic: str, partition: int, partitions: int, watermark_ms: int | None
) -> dict[str, Any]:
    """How far a source partition's windows are closed for the network (sent after its window
    summaries): the smallest watermark of its firms that are waited for; ``watermark_ms`` None
    marks a partition that never had an event or whose firms are all quiet (idle)."""
    return PartitionWatermark(
        source_topic=source_topic,
        partition=partition,
        partitions=partitions,
        watermark_ms=watermark_ms,
    ).model_dump(mode="json")


# --------------------------------------------------------------------------- benchmarks


def benchmark_or_none(
    per_firm_values: Mapping[str, float],
    *,
    k: int,
    bounds: Bounds,
    epsilon: float,
    key: bytes,
    about: Sequence[object],
) -> PrivateFigures | None:
    """Quantiles (p10..p90) and mean of per-firm values, together ``epsilon``-differentially
    private (:func:`.disclosure.private_benchmark`, values clamped to ``bounds``) — or None when
    fewer than ``k`` firms have a finite value. Whether it is published depends only on how many
    firms contributed, never on their values. The noise is drawn from a PRNG keyed by ``key``,
    ``about`` (what the benchmark is: segment, metric, window) and the exact inputs, so the same
    inputs give the same figures."""
    values = {
        firm: min(max(float(v), bounds.lower), bounds.upper)
        for firm, v in per_firm_values.items()
        if finite(v) is not None
    }
    if len(values) < k:
        return None
    rng = keyed_rng(key, "benchmark", *about, inputs_digest(values))
    return private_benchmark(values, bounds, epsilon, rng)


# --------------------------------------------------------------------------- clusters


@dataclass(frozen=True)
class ClusterFit:
    firms: list[str]
    labels: list[int]
    k: int
    silhouette: float
    features: list[str]
    values: list[list[float]]
    """Per firm (order of ``firms``): its KPI values in original units (order of ``features``)."""
    sizes: list[int]


def fit_clusters(
    kpis: pd.DataFrame, *, k_min: int, k_max: int, seed: int, n_init: int
) -> ClusterFit | None:
    """KMeans over standardised KPI vectors (rows: firms, columns: KPIs, firms sorted), ``k``
    with the best mean silhouette in ``k_min..min(k_max, n-1)`` (ties: the smaller ``k``).

    Firms missing a KPI are left out. None when fewer than three firms, or no ``k`` gives
    ``k`` non-empty clusters.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    data = kpis.astype(float).replace([np.inf, -np.inf], np.nan).dropna().sort_index()
    n = len(data)
    upper = min(k_max, n - 1)
    if n < 3 or upper < k_min:
        return None
    scaled = StandardScaler().fit_transform(data.to_numpy())
    best: tuple[float, int, np.ndarray[Any, Any]] | None = None
    for k in range(k_min, upper + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate firms: fewer points
            labels = KMeans(n_clusters=k, random_state=seed, n_init=n_init).fit(scaled).labels_
        if len(np.unique(labels)) != k:
            continue
        score = float(silhouette_score(scaled, labels))
        if best is None or score > best[0]:
            best = (score, k, labels)
    if best is None:
        return None
    score, k, labels = best
    return ClusterFit(
        firms=[str(f) for f in data.index],
        labels=[int(label) for label in labels],
        k=k,
        silhouette=score,
        features=[str(c) for c in data.columns],
        values=data.to_numpy(dtype=float).tolist(),
        sizes=[int(s) for s in np.bincount(labels, minlength=k)],
    )


def private_profiles(
    fit: ClusterFit,
    *,
    model_version: str,
    min_profile_firms: int,
    bounds: Mapping[str, Bounds],
    epsilon: float,
    key: bytes,
) -> list[dict[str, float]]:
    """Per cluster: the mean of each KPI over its firms in original units, ``epsilon``-
    differentially private per fit (:func:`.disclosure.dp_mean`, ``epsilon`` split over the
    KPIs; a firm is in one cluster, so clusters do not add up), the values clamped to the KPI's
    declared ``bounds``. KPIs without declared bounds are left out, and so is the whole profile
    of a cluster smaller than ``min_profile_firms``. The noise is keyed like a benchmark's."""
    bounded = [(i, f) for i, f in enumerate(fit.features) if f in bounds]
    profiles: list[dict[str, float]] = []
    for cluster, size in enumerate(fit.sizes):
        members = [v for v, label in zip(fit.values, fit.labels, strict=True) if label == cluster]
        profile: dict[str, float] = {}
        if size >= min_profile_firms and bounded:
            share = epsilon / len(bounded)
            for i, feature in bounded:
                column = {
                    firm: min(max(v[i], bounds[feature].lower), bounds[feature].upper)
                    for firm, v, label in zip(fit.firms, fit.values, fit.labels, strict=True)
                    if label == cluster
                }
                rng = keyed_rng(
                    key, "cluster_profile", model_version, cluster, feature, inputs_digest(column)
                )
                profile[feature] = dp_mean([v[i] for v in members], bounds[feature], share, rng)
        profiles.append(profile)
    return profiles


def cluster_insights(
    fit: ClusterFit,
    *,
    model_version: str,
    profiles: list[dict[str, float]],
    provenance: Provenance,
    key: bytes,
) -> list[ClusterAssignment]:
    """Every clustered firm's :class:`ClusterAssignment`, with the (private) ``profiles``."""
    return [
        ClusterAssignment(
            insight_id=insight_id(key, "cluster_assignment", firm, model_version),
            tenant=firm,
            provenance=provenance,
            cluster=label,
            k=fit.k,
            silhouette=finite(fit.silhouette),
            features=fit.features,
            profiles=profiles,
            cluster_sizes=fit.sizes,
            model_version=model_version,
        )
        for firm, label in zip(fit.firms, fit.labels, strict=True)
    ]


# --------------------------------------------------------------------------- network side


@dataclass(frozen=True)
class FirmSummary:
    tenant: str
    size_s: int
    start_ms: int
    event_count: int
    metrics: dict[str, tuple[int, float]]
    schema_versions: dict[str, int]

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> FirmSummary:
        return cls(
            tenant=str(message["tenant"]),
            size_s=int(message["size_s"]),
            start_ms=int(message["start_ms"]),
            event_count=int(message["event_count"]),
            metrics={
                str(m): (int(v["count"]), float(v["sum"])) for m, v in message["metrics"].items()
            },
            schema_versions={str(t): int(v) for t, v in message["schema_versions"].items()},
        )

    def mean(self, metric: str) -> float | None:
        count, total = self.metrics.get(metric, (0, 0.0))
        return total / count if count else None


Segment = tuple[str, str]
"""(industry, region) of a firm."""


def merge_versions(summaries: Iterable[FirmSummary]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for summary in summaries:
        for event_type, version in summary.schema_versions.items():
            merged[event_type] = max(merged.get(event_type, 0), version)
    return merged


@dataclass
class NetworkConfig:
    main_size_s: int
    retain_windows: int
    benchmark_min_firms: int
    benchmark_epsilon: float
    benchmark_bounds: dict[str, Bounds]
    benchmark_metrics: tuple[str, ...]
    cluster_metrics: tuple[str, ...]
    cluster_k_min: int
    cluster_k_max: int
    cluster_seed: int
    cluster_n_init: int
    cluster_period_windows: int
    cluster_refit_windows: int
    cluster_min_profile_firms: int
    cluster_profile_epsilon: float


@dataclass
class NetworkState:
    """Closed per-firm window summaries and source watermarks; decides what falls due.

    A window is *complete* network-wide when every partition of the source topic has closed it
    (the smallest of their watermarks passed its end); a partition that never had an event, or
    had events but has gone quiet, is reported idle and not waited for until its next watermark.
    Its benchmarks are computed then, once,
    and never revised: a revision as more firms arrive would let anyone difference two
    aggregates and read a single firm's figure. Summaries that arrive for an already complete
    window are ignored (and counted). Clusters are refitted each time ``cluster_refit_windows``
    more main-size windows are complete, on the last ``cluster_period_windows`` of them.
    """

    config: NetworkConfig
    origin: Origin
    summaries: dict[tuple[int, int], dict[str, FirmSummary]] = field(default_factory=dict)
    watermarks: dict[tuple[str, int], int] = field(default_factory=dict)
    idle: set[tuple[str, int]] = field(default_factory=set)
    partitions: dict[str, int] = field(default_factory=dict)
    complete_through: dict[int, int] = field(default_factory=dict)
    last_fit_end_ms: int | None = None
    ignored_late: int = 0

    def network_watermark(self) -> int | None:
        """The smallest watermark of the source partitions that are not idle; None until all
        have reported (or when all are idle: then nothing new can be complete)."""
        for topic, count in self.partitions.items():
            for partition in range(count):
                if (topic, partition) not in self.watermarks and (
                    topic,
                    partition,
                ) not in self.idle:
                    return None
        active = [mark for source, mark in self.watermarks.items() if source not in self.idle]
        return min(active) if active else None

    def apply(
        self,
        message: Mapping[str, Any],
        segment_of: Callable[[str], Segment | None],
        *,
        emit: bool = True,
        produced_at: datetime | None = None,
    ) -> list[Insight]:
        """Take one message of the internal topic; return the insights that fell due."""
        if message.get("kind") == "window":
            summary = FirmSummary.from_message(message)
            done = self.complete_through.get(summary.size_s)
            if done is not None and summary.start_ms + summary.size_s * 1000 <= done:
                self.ignored_late += 1
                return []
            key = (summary.size_s, summary.start_ms)
            self.summaries.setdefault(key, {})[summary.tenant] = summary
            return []
        if message.get("kind") != "watermark":
            return []
        source = (str(message["source_topic"]), int(message["partition"]))
        self.partitions[source[0]] = max(
            int(message["partitions"]), self.partitions.get(source[0], 0)
        )
        if message["watermark_ms"] is None:  # never had an event, or has gone quiet
            if source in self.idle:
                return []
            self.idle.add(source)
        else:
            mark = int(message["watermark_ms"])
            resumed = source in self.idle
            if mark <= self.watermarks.get(source, mark - 1) and not resumed:
                return []
            self.idle.discard(source)
            self.watermarks[source] = max(mark, self.watermarks.get(source, mark))
        return self._due(segment_of, emit=emit, produced_at=produced_at or datetime.now(UTC))

    def _due(
        self, segment_of: Callable[[str], Segment | None], *, emit: bool, produced_at: datetime
    ) -> list[Insight]:
        watermark = self.network_watermark()
        if watermark is None:
            return []
        insights: list[Insight] = []
        due = sorted(
            key
            for key in self.summaries
            if key[0] * 1000 + key[1] <= watermark
            and key[0] * 1000 + key[1] > self.complete_through.get(key[0], -(2**62))
        )
        for size_s, start_ms in due:
            end_ms = start_ms + size_s * 1000
            self.complete_through[size_s] = max(self.complete_through.get(size_s, end_ms), end_ms)
            if emit:
                insights += self.benchmarks(size_s, start_ms, segment_of, produced_at)
        size = self.config.main_size_s
        complete_end = watermark - watermark % (size * 1000)
        step = self.config.cluster_refit_windows * size * 1000
        if any(key[0] == size for key in due) and (
            self.last_fit_end_ms is None or complete_end - self.last_fit_end_ms >= step
        ):
            self.last_fit_end_ms = complete_end
            if emit:
                insights += self.clusters(complete_end, produced_at)
        self._forget(watermark)
        return insights

    def _forget(self, watermark: int) -> None:
        for size_s, start_ms in list(self.summaries):
            keep = max(self.config.retain_windows, self.config.cluster_period_windows)
            if start_ms + (keep + 1) * size_s * 1000 <= watermark:
                del self.summaries[(size_s, start_ms)]

    def benchmarks(
        self,
        size_s: int,
        start_ms: int,
        segment_of: Callable[[str], Segment | None],
        produced_at: datetime,
    ) -> list[Benchmark]:
        """Benchmarks of one complete window: per segment (industry, region) and metric with
        declared bounds, those that pass :func:`benchmark_or_none`. A firm's value is its mean
        of the metric over the window; firms without a registered industry and region are left
        out."""
        by_segment: dict[Segment, list[FirmSummary]] = {}
        for tenant, summary in self.summaries.get((size_s, start_ms), {}).items():
            segment = segment_of(tenant)
            if segment is not None:
                by_segment.setdefault(segment, []).append(summary)
        wanted = set(self.config.benchmark_metrics)
        bounds = self.config.benchmark_bounds
        key = self.origin.network_key
        out: list[Benchmark] = []
        for (industry, region), firms in sorted(by_segment.items()):
            metrics = sorted(
                {m for s in firms for m in s.metrics if m in bounds and (not wanted or m in wanted)}
            )
            for metric in metrics:
                values = {s.tenant: s.mean(metric) for s in firms if s.mean(metric) is not None}
                about = (industry, region, metric, size_s, start_ms)
                figures = benchmark_or_none(
                    values,  # type: ignore[arg-type]  # Nones filtered just above
                    k=self.config.benchmark_min_firms,
                    bounds=bounds[metric],
                    epsilon=self.config.benchmark_epsilon,
                    key=key,
                    about=about,
                )
                if figures is None:
                    continue
                contributing = [s for s in firms if s.tenant in values]
                out.append(
                    Benchmark(
                        insight_id=insight_id(key, "benchmark", *about),
                        tenant=NETWORK_TENANT,
                        visibility="public",
                        provenance=self.origin.provenance(
                            start_ms=start_ms,
                            end_ms=start_ms + size_s * 1000,
                            partners=figures.firms,
                            events=sum(s.metrics[metric][0] for s in contributing),
                            schema_versions=merge_versions(contributing),
                            produced_at=produced_at,
                        ),
                        metric=metric,
                        industry=industry,
                        region=region,
                        firms=figures.firms,
                        quantiles=figures.quantiles,
                        mean=figures.mean,
                    )
                )
        return out

    def kpis(self, end_ms: int) -> tuple[pd.DataFrame, list[FirmSummary]]:
        """Per-firm means of the cluster metrics over the last ``cluster_period_windows``
        main-size windows ending at ``end_ms`` (count-weighted: the mean over the events)."""
        size_ms = self.config.main_size_s * 1000
        first = end_ms - self.config.cluster_period_windows * size_ms
        used = [
            s
            for (size_s, start), firms in self.summaries.items()
            if size_s == self.config.main_size_s and first <= start and start + size_ms <= end_ms
            for s in firms.values()
        ]
        totals: dict[str, dict[str, list[float]]] = {}
        for s in used:
            for metric in self.config.cluster_metrics:
                count, total = s.metrics.get(metric, (0, 0.0))
                acc = totals.setdefault(s.tenant, {}).setdefault(metric, [0.0, 0.0])
                acc[0] += count
                acc[1] += total
        rows = {
            tenant: {m: (t / c if c else math.nan) for m, (c, t) in by_metric.items()}
            for tenant, by_metric in totals.items()
        }
        frame = pd.DataFrame.from_dict(
            rows, orient="index", columns=list(self.config.cluster_metrics)
        )
        return frame.sort_index(), used

    def clusters(self, end_ms: int, produced_at: datetime) -> list[ClusterAssignment]:
        kpis, used = self.kpis(end_ms)
        c = self.config
        fit = fit_clusters(
            kpis,
            k_min=c.cluster_k_min,
            k_max=c.cluster_k_max,
            seed=c.cluster_seed,
            n_init=c.cluster_n_init,
        )
        if fit is None:
            return []
        clustered = set(fit.firms)
        used = [s for s in used if s.tenant in clustered]
        digest = hashlib.sha256(kpis.loc[fit.firms].to_csv().encode()).hexdigest()[:12]
        model_version = f"{from_ms(end_ms).strftime('%Y%m%dT%H%M%SZ')}-{digest}"
        provenance = self.origin.provenance(
            start_ms=end_ms - c.cluster_period_windows * c.main_size_s * 1000,
            end_ms=end_ms,
            partners=len(fit.firms),
            events=sum(s.event_count for s in used),
            schema_versions=merge_versions(used),
            produced_at=produced_at,
        )
        profiles = private_profiles(
            fit,
            model_version=model_version,
            min_profile_firms=c.cluster_min_profile_firms,
            bounds=c.benchmark_bounds,
            epsilon=c.cluster_profile_epsilon,
            key=self.origin.network_key,
        )
        return cluster_insights(
            fit,
            model_version=model_version,
            profiles=profiles,
            provenance=provenance,
            key=self.origin.network_key,
        )
