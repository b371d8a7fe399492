from __future__ import annotations

import itertools
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from deploy.local.simulate import (
    event_moment,
    firm_events,
    load_clock,
    make_firms,
    resume_start,
    save_clock,
)
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


def test_the_clock_starts_where_the_saved_state_says(tmp_path: Path) -> None:
    """A second demo run continues each firm's event time where the first stopped, so none of
    its events falls behind a window analytics already closed for that firm."""
    firm = make_firms(1)[0]
    stopped_at = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)
    save_clock(tmp_path / "demo-clock.json", {firm.tenant: stopped_at})
    clock = load_clock(tmp_path / "demo-clock.json")
    assert clock == {firm.tenant: stopped_at}

    fresh = datetime(2026, 1, 1, tzinfo=UTC)
    start = resume_start(clock, firm.tenant, fresh)
    assert start == stopped_at
    events = list(itertools.islice(firm_events(firm, start=start), 20))
    assert all(validate_event(e).occurred_at > stopped_at for e in events)
    # a firm the last run did not have, or a clock older than the fresh start, starts fresh
    assert resume_start(clock, "other-firm", fresh) == fresh
    assert resume_start(clock, firm.tenant, stopped_at.replace(year=2040)).year == 2040


def test_a_missing_or_broken_clock_file_means_a_first_run(tmp_path: Path) -> None:
    assert load_clock(tmp_path / "absent.json") == {}
    (tmp_path / "broken.json").write_text("{not json")
    assert load_clock(tmp_path / "broken.json") == {}


def test_a_spoiled_event_that_lost_its_offset_still_tells_its_utc_time() -> None:
    event = next(firm_events(make_firms(1)[0]))
    moment = event_moment(event)
    spoiled = event_moment({**event, "occurred_at": event["occurred_at"][:19]})  # and its fraction
    assert moment - timedelta(seconds=1) < spoiled <= moment
