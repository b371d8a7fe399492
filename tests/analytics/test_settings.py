"""Analytics settings from the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.analytics import app
from services.analytics.disclosure import Bounds
from services.analytics.settings import load_analytics_settings


def test_defaults_are_the_briefs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("XIETONG_ANALYTICS_WINDOW_SECONDS", "XIETONG_BENCHMARK_MIN_FIRMS"):
        monkeypatch.delenv(name, raising=False)
    s = load_analytics_settings()
    assert (s.analytics_window_seconds, s.benchmark_min_firms, s.benchmark_epsilon) == (
        3600,
        5,
        6.0,
    )
    assert s.metric_bounds()["delivery.reject_rate"] == Bounds(0.0, 1.0)
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


def test_bounds_come_from_the_environment_and_must_be_a_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XIETONG_BENCHMARK_BOUNDS", '{"sales.quantity": [0, 50]}')
    assert load_analytics_settings().metric_bounds() == {"sales.quantity": Bounds(0.0, 50.0)}
    with pytest.raises(ValidationError):
        load_analytics_settings(benchmark_bounds={"sales.quantity": (5.0, 5.0)})


def test_the_service_refuses_to_start_without_the_network_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("XIETONG_NETWORK_SECRET", raising=False)
    with pytest.raises(SystemExit, match=r"^XIETONG_NETWORK_SECRET is not set") as refused:
        app.main()
    assert "\n" not in str(refused.value)
    monkeypatch.setenv("XIETONG_NETWORK_SECRET", "s3cret")
    assert load_analytics_settings().network_key() == b"s3cret"
