"""Fixtures of the analytics tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.analytics.settings import AnalyticsSettings, load_analytics_settings
from shared.settings import XietongSettings


@pytest.fixture
def analytics_settings(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> AnalyticsSettings:
    return load_analytics_settings(
        **{
            **settings.model_dump(),
            "analytics_group_id": unique_name("analytics"),
            "analytics_network_group_id": unique_name("analytics-network"),
            "analytics_firm_windows_topic": unique_name("analytics.firm-windows"),
            "analytics_window_seconds": 3600,
            "analytics_grace_seconds": 300,
            "analytics_correlation_align_seconds": 300,
            "analytics_idle_partition_seconds": 1.0,
            "cluster_n_init": 4,
            "cluster_k_max": 6,
            "cluster_seed": 7,
        }
    )
