"""Analytics settings from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.analytics.settings import load_analytics_settings


def test_defaults_are_the_briefs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("XIETONG_ANALYTICS_WINDOW_SECONDS", "XIETONG_BENCHMARK_MIN_FIRMS"):
        monkeypatch.delenv(name, raising=False)
    s = load_analytics_settings()
    assert (s.analytics_window_seconds, s.benchmark_min_firms, s.benchmark_max_share_percent) == (
        3600,
        5,
        60.0,
    )
    assert s.window_sizes == (3600,)
    assert (s.cluster_k_min, s.cluster_k_max) == (2, 8)


def test_environment_sets_windows_thresholds_and_kpis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XIETONG_ANALYTICS_WINDOW_SECONDS", "900")
    monkeypatch.setenv("XIETONG_ANALYTICS_DAILY_WINDOW", "true")
    monkeypatch.setenv("XIETONG_BENCHMARK_MIN_FIRMS", "7")
    monkeypatch.setenv("XIETONG_CLUSTER_METRICS", '["sales.quantity", "production.scrap_rate"]')
    s = load_analytics_settings()
    assert s.window_sizes == (900, 86_400)
    assert s.benchmark_min_firms == 7
    assert s.cluster_metrics == ["sales.quantity", "production.scrap_rate"]


def test_an_empty_k_range_is_refused() -> None:
    with pytest.raises(ValidationError):
        load_analytics_settings(cluster_k_min=5, cluster_k_max=3)
