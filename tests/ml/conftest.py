"""Generated supply-chain data for the ml tests (nothing downloaded)."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from deploy.local.simulate import firm_events, make_firms, supply_events
from services.ml.features import MlEvent, parse_event
from services.ml.settings import MlSettings, load_ml_settings
from shared.codec import encode
from shared.settings import XietongSettings

START = datetime(2026, 1, 1, tzinfo=UTC)


def supply_envelopes(firms: int = 6, per_firm: int = 300, seed: int = 1) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for firm in make_firms(firms):
        stream = supply_events(firm, start=START, step=timedelta(hours=20), seed=seed)
        out += itertools.islice(stream, per_firm)
    return out


def as_events(envelopes: list[dict[str, Any]]) -> list[MlEvent]:
    return [parse_event(encode(e)) for e in envelopes]


@pytest.fixture(scope="session")
def supply() -> list[MlEvent]:
    return as_events(supply_envelopes())


@pytest.fixture(scope="session")
def sales() -> list[MlEvent]:
    out: list[dict[str, Any]] = []
    for firm in make_firms(6):
        out += itertools.islice(firm_events(firm, start=START, step=timedelta(hours=1)), 1500)
    return as_events([e for e in out if e["type"] == "sales_order_line"])


@pytest.fixture
def ml_settings(
    settings: XietongSettings, s3_settings: XietongSettings, unique_name: Callable[[str], str]
) -> MlSettings:
    return load_ml_settings(
        **{
            **settings.model_dump(),
            "s3_endpoint_url": s3_settings.s3_endpoint_url,
            "s3_access_key_id": s3_settings.s3_access_key_id,
            "s3_secret_access_key": s3_settings.s3_secret_access_key,
            "models_bucket": f"models-{uuid.uuid4().hex[:12]}",
            "ml_group_id": unique_name("ml"),
            "ml_source_topic": unique_name("events.clean"),
            "ml_predictions_topic": unique_name("insights.predictions"),
            "ml_shadow_topic": unique_name("ml.shadow-predictions"),
            "ml_drift_topic": unique_name("insights.model-drift"),
            "ml_dead_letter_topic": unique_name("events.clean.dlq"),
            "ml_models": ["supplier-delay"],
            "ml_batch_wait_ms": 50,
        }
    )
