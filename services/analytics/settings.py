"""Settings of the analytics service (environment prefix ``XIETONG_``, e.g.
``XIETONG_ANALYTICS_WINDOW_SECONDS``, ``XIETONG_BENCHMARK_MIN_FIRMS``,
``XIETONG_BENCHMARK_EPSILON``, ``XIETONG_BENCHMARK_BOUNDS``; the network secret
``XIETONG_NETWORK_SECRET`` is in
:mod:`shared.settings`)."""

from __future__ import annotations

from pydantic import Field, model_validator

from schemas.topics import ANALYTICS_FIRM_WINDOWS, EVENTS_CLEAN
from services.analytics.disclosure import Bounds
from shared.settings import XietongSettings

DAY_SECONDS = 86_400

METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    "sales.quantity": (0.0, 1_000.0),
    "sales.amount_cny": (0.0, 100_000.0),
    "inventory.on_hand": (0.0, 50_000.0),
    "inventory.value_cny": (0.0, 5_000_000.0),
    "purchasing.quantity": (0.0, 5_000.0),
    "purchasing.amount_cny": (0.0, 500_000.0),
    "delivery.quantity": (0.0, 5_000.0),
    "delivery.reject_rate": (0.0, 1.0),
    "delivery.delay_days": (-30.0, 60.0),
    "production.quantity": (0.0, 5_000.0),
    "production.scrap_rate": (0.0, 1.0),
    "workforce.headcount": (0.0, 5_000.0),
    "workforce.hours_worked": (0.0, 50_000.0),
    "workforce.absence_rate": (0.0, 1.0),
    "market.price_cny": (0.0, 100_000.0),
}
"""Default declared ranges of per-firm window means: public, chosen from what the metrics are
(rates in [0, 1]) and the size of the network's firms, not from their data. An operator sets
``XIETONG_BENCHMARK_BOUNDS`` (JSON: metric -> [lower, upper]) for its own network."""


class AnalyticsSettings(XietongSettings):
    """Windows, benchmark thresholds and clustering of the analytics service."""

    analytics_http_port: int = Field(8082, ge=0, le=65535, description="Health and metrics port.")
    analytics_source_topic: str = Field(EVENTS_CLEAN, min_length=1, description="Clean events in.")
    analytics_group_id: str = Field(
        "analytics", min_length=1, description="Consumer group of the per-firm window loop."
    )
    analytics_network_group_id: str = Field(
        "analytics-network",
        min_length=1,
        description="Consumer group of the cross-firm loop (benchmarks, clusters).",
    )
    analytics_firm_windows_topic: str = Field(
        ANALYTICS_FIRM_WINDOWS,
        min_length=1,
        description="Internal topic of closed per-firm window summaries (one partition).",
    )
    analytics_window_seconds: int = Field(
        3600, ge=1, le=DAY_SECONDS, description="Size of the tumbling event-time windows."
    )
    analytics_daily_window: bool = Field(
        False, description="Also compute daily (UTC) windows next to the main window size."
    )
    analytics_grace_seconds: int = Field(
        300, ge=0, description="How long after its end a window still accepts late events."
    )
    analytics_correlation_align_seconds: int = Field(
        60,
        ge=1,
        description="Metrics are aligned for correlation on event-time buckets of this size.",
    )
    analytics_correlation_min_points: int = Field(
        3, ge=2, description="Aligned points a pair of metrics needs for a correlation."
    )
    analytics_idle_partition_seconds: float = Field(
        30.0,
        ge=0,
        description="A source partition without any event for this long after the worker got it "
        "(and caught up) is reported idle, so network-wide windows do not wait for it.",
    )
    analytics_quiet_partition_seconds: float = Field(
        300.0,
        ge=0,
        description="A firm that has sent nothing for this long (its source partition caught up) "
        "is quiet: its windows that ended by the wall clock are closed, and network-wide windows "
        "stop waiting for it until its next event (a partition whose firms are all quiet is "
        "idle). Summaries of its windows completed meanwhile come too late for benchmarks.",
    )
    analytics_firm_max_lag_seconds: float = Field(
        3600.0,
        ge=0,
        description="A firm whose watermark is more than this behind the median of its "
        "partition's firms (a clock stuck in the past, a firm only back-filling) is not waited "
        "for by network-wide windows; a firm ahead never closes them for the others.",
    )
    analytics_restatement_days: float = Field(
        35.0,
        ge=0,
        description="How long (in a firm's own event time) closed windows are kept on disk, so "
        "that late events (a back-fill, a file drop) restate them as a new revision.",
    )
    analytics_commit_metadata_max_bytes: int = Field(
        4096,
        ge=64,
        description="Most bytes of firm watermarks a commit carries (the broker's "
        "offset.metadata.max.bytes); firms beyond it are kept in the local state store.",
    )
    analytics_retain_windows: int = Field(
        168, ge=1, description="Windows of per-firm summaries the cross-firm loop keeps."
    )

    benchmark_min_firms: int = Field(5, ge=2, description="k: distinct firms a benchmark needs.")
    benchmark_epsilon: float = Field(
        6.0,
        gt=0,
        description="Differential-privacy budget of one benchmark (its five quantiles and mean "
        "together, epsilon/6 each) per segment, metric and window: changing one firm's value "
        "changes the probability of any published benchmark by at most a factor e**epsilon. "
        "Budgets add up over the windows (and window sizes) a firm's events are in.",
    )
    benchmark_bounds: dict[str, tuple[float, float]] = Field(
        default_factory=lambda: dict(METRIC_BOUNDS),
        description="Declared range [lower, upper] of each metric's per-firm value (its mean "
        "over a window), never taken from the data: values outside are clamped, the noise is "
        "scaled to it. Only metrics with a range are benchmarked or shown in cluster profiles.",
    )
    benchmark_metrics: list[str] = Field(
        default_factory=list,
        description="Metrics benchmarked; empty means every metric with declared bounds.",
    )

    cluster_metrics: list[str] = Field(
        default_factory=lambda: ["sales.quantity", "sales.amount_cny", "inventory.on_hand"],
        min_length=1,
        description="KPIs firms are compared on (per-firm means over the recent period).",
    )
    cluster_k_min: int = Field(2, ge=2, description="Fewest clusters tried.")
    cluster_k_max: int = Field(8, ge=2, description="Most clusters tried (also at most firms-1).")
    cluster_seed: int = Field(42, description="random_state of KMeans.")
    cluster_n_init: int = Field(10, ge=1, description="KMeans restarts per k.")
    cluster_period_windows: int = Field(
        24, ge=1, description="Recent windows the per-firm KPI means are taken over."
    )
    cluster_refit_windows: int = Field(
        1, ge=1, description="Refit each time this many more windows are complete network-wide."
    )
    cluster_min_profile_firms: int = Field(
        3,
        ge=1,
        description="A cluster's profile is shown only when it has at least this many firms "
        "(a profile of one or two firms would give their figures away).",
    )
    cluster_profile_epsilon: float = Field(
        6.0,
        gt=0,
        description="Differential-privacy budget of the cluster profiles of one fit (split over "
        "the KPIs; a firm is in one cluster). A firm's events count in every fit whose period "
        "covers them: budgets add up over those fits.",
    )

    @model_validator(mode="after")
    def _k_range(self) -> AnalyticsSettings:
        if self.cluster_k_max < self.cluster_k_min:
            raise ValueError("cluster_k_max must be >= cluster_k_min")
        self.metric_bounds()  # refuses a range that is not finite lower < upper
        return self

    def metric_bounds(self) -> dict[str, Bounds]:
        """The declared ranges of the metrics, as :class:`.disclosure.Bounds`."""
        return {metric: Bounds(lo, hi) for metric, (lo, hi) in self.benchmark_bounds.items()}

    @property
    def window_sizes(self) -> tuple[int, ...]:
        """Window sizes in seconds: the main one first, then the daily one if asked."""
        sizes = [self.analytics_window_seconds]
        if self.analytics_daily_window and DAY_SECONDS not in sizes:
            sizes.append(DAY_SECONDS)
        return tuple(sizes)


def load_analytics_settings(**overrides: object) -> AnalyticsSettings:
    """Read the environment now; keyword arguments win over it."""
    return AnalyticsSettings(**overrides)  # type: ignore[arg-type]
