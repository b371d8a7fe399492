"""Clean settings come from the environment (``XIETONG_CLEAN_*``)."""

from __future__ import annotations

import pytest

from schemas.topics import REFERENCE_FX_RATES
from services.clean.handlers import CleanRules
from services.clean.settings import load_clean_settings


def test_rates_come_from_the_rates_topic_not_from_settings() -> None:
    settings = load_clean_settings()
    assert settings.clean_rates_topic == REFERENCE_FX_RATES
    assert not hasattr(settings, "clean_currency_rates")


def test_the_environment_sets_rates_topic_horizon_and_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("XIETONG_CLEAN_RATES_TOPIC", "reference.fx-rates-test.v1")
    monkeypatch.setenv("XIETONG_CLEAN_DEDUPE_HORIZON_DAYS", "2")
    monkeypatch.setenv("XIETONG_CLEAN_OUTLIER_WINDOW", "50")
    monkeypatch.setenv("XIETONG_CLEAN_HTTP_PORT", "9911")
    settings = load_clean_settings()
    rules = CleanRules.from_settings(settings)
    assert settings.clean_rates_topic == "reference.fx-rates-test.v1"
    assert rules.horizon_seconds == 2 * 86400
    assert rules.window == 50 and settings.clean_http_port == 9911
