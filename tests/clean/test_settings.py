"""Clean settings come from the environment (``XIETONG_CLEAN_*``)."""

from __future__ import annotations

import pytest

from services.clean.handlers import CleanRules
from services.clean.settings import DEFAULT_RATES_CNY, load_clean_settings


def test_defaults_cover_the_usual_currencies() -> None:
    settings = load_clean_settings()
    assert set(settings.clean_currency_rates) >= {"CNY", "USD", "EUR", "JPY", "KRW", "GBP", "HKD"}
    assert settings.clean_currency_rates["CNY"] == 1.0


def test_the_environment_sets_rates_horizon_and_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XIETONG_CLEAN_CURRENCY_RATES", '{"USD": 7.3, "CHF": 8.1}')
    monkeypatch.setenv("XIETONG_CLEAN_DEDUPE_HORIZON_DAYS", "2")
    monkeypatch.setenv("XIETONG_CLEAN_OUTLIER_WINDOW", "50")
    monkeypatch.setenv("XIETONG_CLEAN_HTTP_PORT", "9911")
    settings = load_clean_settings()
    rules = CleanRules.from_settings(settings)
    assert rules.rates == {"USD": 7.3, "CHF": 8.1}
    assert rules.horizon_seconds == 2 * 86400
    assert rules.window == 50 and settings.clean_http_port == 9911
    assert DEFAULT_RATES_CNY["USD"] != 7.3  # the defaults themselves are untouched
