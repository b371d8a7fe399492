"""The intake every way in shares: event times are bounded on the fast and the precise path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from schemas.events import EventTimeBounds
from services.ingest.csvmap import parse_csv
from services.ingest.handlers import split_ndjson, validate_parsed
from services.ingest.intake import (
    EVENT_TIME_REFUSED,
    Incoming,
    validate_json_lines,
    validate_records,
)
from tests.factories import sales_event

RECEIVED = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)

OUT_OF_BOUNDS = [
    "2036-01-01T00:00:00Z",  # ten years ahead
    (RECEIVED + timedelta(hours=1, seconds=1)).isoformat(),  # just past the default hour
    "9999-12-31T23:59:59-05:00",  # has no UTC datetime at all
    "0001-01-01T00:00:00+01:00",  # nor this one
    "1999-12-31T23:59:59+00:00",  # before 2000
    "2000-01-01T07:59:59+08:00",  # the same instant, written in Beijing time
]
IN_BOUNDS = [
    (RECEIVED + timedelta(hours=1)).isoformat(),  # exactly the hour ahead
    "2000-01-01T00:00:00Z",  # the earliest
    "2003-05-17T09:30:00+08:00",  # history: an ERP snapshot, years before any watermark
    (RECEIVED - timedelta(days=400)).isoformat(),
]


def at(occurred_at: str, seq: int = 0, **changes: Any) -> dict[str, Any]:
    return {**sales_event("acme", seq=seq), "occurred_at": occurred_at, **changes}


def only_refusal(intake: Any) -> tuple[str, str]:
    (refused,) = intake.refused
    (error,) = refused.errors
    return error.field, refused.reason


@pytest.mark.parametrize("occurred_at", OUT_OF_BOUNDS)
def test_an_event_time_out_of_bounds_is_refused_on_the_fast_and_the_precise_path(
    occurred_at: str,
) -> None:
    event = at(occurred_at)
    line = [(0, orjson.dumps(event))]
    fast = validate_json_lines(line, "acme", received_at=RECEIVED)
    precise = validate_records([Incoming(0, line[0][1], event)], "acme", received_at=RECEIVED)
    for intake in (fast, precise):
        assert intake.accepted == []
        assert only_refusal(intake) == ("occurred_at", EVENT_TIME_REFUSED)
    assert fast.refused[0].original == line[0][1]  # the dead letter keeps what was sent


@pytest.mark.parametrize("occurred_at", IN_BOUNDS)
def test_history_back_to_the_earliest_and_an_hour_ahead_are_accepted(occurred_at: str) -> None:
    line = orjson.dumps(at(occurred_at))
    assert validate_json_lines([(0, line)], "acme", received_at=RECEIVED).accepted == [line]
    intake = validate_records([Incoming(0, line, at(occurred_at))], "acme", received_at=RECEIVED)
    assert len(intake.accepted) == 1 and intake.refused == []


def test_the_bounds_are_configurable() -> None:
    tight = EventTimeBounds(
        max_ahead=timedelta(minutes=5), earliest=datetime(2026, 1, 1, tzinfo=UTC)
    )
    records = [
        at((RECEIVED + timedelta(minutes=10)).isoformat(), seq=1),
        at("2025-12-31T23:00:00Z", seq=2),
        at((RECEIVED + timedelta(minutes=4)).isoformat(), seq=3),
    ]
    lines = [(i, orjson.dumps(r)) for i, r in enumerate(records)]
    intake = validate_json_lines(lines, "acme", bounds=tight, received_at=RECEIVED)
    assert [r.index for r in intake.refused] == [0, 1]
    assert intake.accepted == [lines[2][1]]


def test_the_gateway_bounds_against_now_and_csv_rows_too() -> None:
    ahead = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    body = b"\n".join(
        orjson.dumps(at(when, seq=i)) for i, when in enumerate([ahead, "2020-01-01T00:00:00Z"])
    )
    intake = validate_parsed(split_ndjson(body), "acme")
    assert [r.index for r in intake.refused] == [0] and len(intake.accepted) == 1

    csv = (
        "order_id,customer_id,product_sku,quantity,occurred_at\n"
        f"SO-1,C-1,BOLT,5,{ahead}\n"
        "SO-2,C-1,BOLT,5,1999-06-30T00:00:00Z\n"
        "SO-3,C-1,BOLT,5,2012-06-30T00:00:00+08:00\n"
    ).encode()
    rows = validate_records(parse_csv(csv, "acme", "sales_order_line", 1), "acme")
    assert [(r.index, r.errors[0].field) for r in rows.refused] == [
        (0, "occurred_at"),
        (1, "occurred_at"),
    ]
    assert len(rows.accepted) == 1
