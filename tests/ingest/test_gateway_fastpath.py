"""The gateway's fast validation path (NDJSON lines and JSON array elements checked from their
bytes by the msgspec mirrors of the contracts) accepts and refuses exactly what the precise path
does."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from schemas.events import (
    EVENT_MODELS,
    SalesOrderLine,
    _event_model,
    decode_exact,
    validate_event,
)
from services.ingest.handlers import split_ndjson
from services.ingest.intake import (
    FAST_PATH_MISSES,
    ForeignTenant,
    Incoming,
    event_adapter,
    validate_json_lines,
    validate_records,
)
from tests.factories import sales_event


def lines_of(records: list[Any]) -> list[tuple[int, bytes]]:
    return [(index, orjson.dumps(record)) for index, record in enumerate(records)]


def precise(lines: list[tuple[int, bytes]], tenant: str) -> Any:
    items = []
    for index, line in lines:
        try:
            items.append(Incoming(index, line, decode_exact(line)))
        except ValueError as error:
            items.append(Incoming(index, line, None, f"invalid JSON: {error}"))
    return validate_records(items, tenant)


def events_of(intake: Any) -> list[Any]:
    """The accepted records as the raw topic gets them, read back through their contract."""
    return [validate_event(orjson.loads(value)) for value in intake.accepted]


def without(record: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: value for name, value in record.items() if name not in names}


def text_event(tenant: str, text: str) -> dict[str, Any]:
    return {
        **without(sales_event(tenant), "payload"),
        "type": "text_document",
        "payload": {"kind": "customer_feedback", "language": "zh", "text": text},
    }


MIXED: list[Any] = [
    sales_event("acme", seq=1),
    text_event("acme", "交货准时，质量很好"),
    without(sales_event("acme", seq=2), "tenant"),
    without(sales_event("acme", seq=3), "source"),
    {**sales_event("acme", seq=4), "tenant": None},
    {**sales_event("acme", seq=5), "type": "sales_forecast"},
    {**sales_event("acme", seq=6), "schema_version": "1"},
    {**sales_event("acme", seq=7), "schema_version": 2},
    sales_event("acme", seq=8, quantity=-1),
    {**sales_event("acme", seq=9), "occurred_at": "2026-11-01T08:00:00"},
    {**sales_event("acme", seq=10), "payload": {"order_id": "SO-1"}},
    [1, 2],
    "中",
    sales_event("acme", seq=11, unit_price=None),
    {**sales_event("acme", seq=12), "extra": 1},
]


def test_lines_accept_and_refuse_exactly_what_the_precise_path_does() -> None:
    lines = [*lines_of(MIXED), (len(MIXED), b"{broken"), (len(MIXED) + 1, b'{"a": NaN}')]
    fast = validate_json_lines(lines, "acme")
    slow = precise(lines, "acme")
    accepted = events_of(fast)
    assert [e.model_dump() for e in accepted] == [e.model_dump() for e in events_of(slow)]
    assert len(accepted) == 6
    stamped = accepted[2]
    assert stamped.tenant == "acme" and str(stamped.event_id) == MIXED[2]["event_id"]
    assert accepted[3].source.system == "http"
    assert fast.accepted[0] == lines[0][1]  # a record that needs nothing goes as it was sent
    assert [(r.index, r.reason, r.errors) for r in fast.refused] == [
        (r.index, r.reason, r.errors) for r in slow.refused
    ]
    assert {r.index for r in fast.refused} == {5, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16}
    assert dict(lines)[15] == fast.refused[-2].original  # a refused line keeps its bytes


def test_a_foreign_tenant_refuses_the_batch_at_the_same_index_on_both_paths() -> None:
    records = [sales_event("acme", seq=1), {"type": "nonsense"}, sales_event("rival", seq=2)]
    for validate in (validate_json_lines, precise):
        with pytest.raises(ForeignTenant) as error:
            validate(lines_of(records), "acme")
        assert error.value.index == 2 and "'rival'" in str(error.value)
    broken = [{**sales_event("rival", seq=3), "payload": None}]
    with pytest.raises(ForeignTenant):
        validate_json_lines(lines_of(broken), "acme")


def test_a_batch_that_misses_the_fast_path_still_stamps_every_record() -> None:
    records = [without(sales_event("acme", seq=i), "tenant") for i in range(FAST_PATH_MISSES * 3)]
    intake = validate_json_lines(lines_of(records), "acme", source_system="sdk")
    accepted = events_of(intake)
    assert [str(e.event_id) for e in accepted] == [r["event_id"] for r in records]
    assert {e.tenant for e in accepted} == {"acme"} and not intake.refused


def test_the_union_picks_the_model_of_the_type_and_the_version() -> None:
    v2 = _event_model("sales_order_line", 2, SalesOrderLine)
    adapter = event_adapter({**EVENT_MODELS, ("sales_order_line", 2): v2})
    event = sales_event("acme")
    assert type(adapter.validate_json(orjson.dumps(event))) is EVENT_MODELS[("sales_order_line", 1)]
    assert type(adapter.validate_python({**event, "schema_version": 2})) is v2
    text = text_event("acme", "ok")
    assert type(adapter.validate_python(text)) is EVENT_MODELS[("text_document", 1)]


def test_split_ndjson_keeps_line_numbers_and_skips_blank_lines() -> None:
    parsed = split_ndjson(bytearray(b'{"a": 1}\r\n\n  \n[1, 2]\n{broken\n\x0c\n"x"'))
    assert parsed.lines == [(0, b'{"a": 1}\r'), (3, b"[1, 2]"), (4, b"{broken"), (6, b'"x"')]
    originals = {
        r.index: r.original for r in validate_json_lines(parsed.lines or [], "acme").refused
    }
    assert originals[4] == b"{broken" and parsed.items == []
