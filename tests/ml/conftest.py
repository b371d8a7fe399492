"""Generated supply-chain data for the ml tests (nothing downloaded)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from deploy.local.simulate import firm_events, make_firms, supply_events
from services.ml.features import MlEvent, parse_event
from shared.codec import encode

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
