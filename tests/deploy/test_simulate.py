from __future__ import annotations

import itertools
from collections import Counter

import pytest
from pydantic import ValidationError

from deploy.local.simulate import firm_events, make_firms
from schemas.events import validate_event


def test_simulated_firms_publish_valid_events_of_every_type_in_event_time_order() -> None:
    firms = make_firms(6)
    assert len({f.tenant for f in firms}) == 6 and len({f.industry for f in firms}) == 3
    types: Counter[str] = Counter()
    for firm in firms:
        events = list(itertools.islice(firm_events(firm), 400))
        times = [validate_event(e).occurred_at for e in events]
        assert times == sorted(times)
        types.update(e["type"] for e in events)
    assert set(types) == {
        "sales_order_line",
        "inventory_level",
        "production_output",
        "workforce",
        "market_price",
        "text_document",
    }


def test_spoiled_events_are_refused_by_the_contract() -> None:
    events = list(itertools.islice(firm_events(make_firms(1)[0], bad_rate=1.0), 50))
    for event in events:
        with pytest.raises(ValidationError):
            validate_event(event)
