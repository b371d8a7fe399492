"""The gateway's parsers and CSV mapping as plain functions (no broker)."""

from __future__ import annotations

import orjson
import pytest

from services.ingest.csvmap import (
    CsvError,
    CsvHeaderError,
    UnknownCsvType,
    check_header,
    parse_csv,
    resolve_type,
)
from services.ingest.handlers import (
    RequestError,
    parse_json_array,
    reason_label,
    split_ndjson,
    validate_parsed,
)
from services.ingest.intake import validate_records
from tests.factories import sales_event

HEADER = "occurred_at,order_id,customer_id,product_sku,quantity"


def rows(*lines: str, header: str = HEADER) -> bytes:
    return ("\n".join([header, *lines]) + "\n").encode()


def test_the_query_names_a_known_type_and_version() -> None:
    assert resolve_type("sales_order_line", None) == ("sales_order_line", 1)
    assert resolve_type("sales_order_line", "1") == ("sales_order_line", 1)
    with pytest.raises(CsvError) as missing:
        resolve_type(None, None)
    assert missing.value.status == 400
    with pytest.raises(UnknownCsvType, match="did you mean 'inventory_level'") as unknown:
        resolve_type("inventory_levels", None)
    assert unknown.value.status == 422
    with pytest.raises(UnknownCsvType, match="no version 2"):
        resolve_type("workforce", "2")


def test_header_problems_are_all_reported_at_once_with_suggestions() -> None:
    with pytest.raises(CsvHeaderError) as error:
        check_header(
            ["occured_at", "order_id", "customer", "product_sku", "qty"], "sales_order_line", 1
        )
    message = str(error.value)
    assert "unknown column 'occured_at'" in message and "did you mean 'occurred_at'?" in message
    assert "unknown column 'customer'" in message and "did you mean 'customer_id'?" in message
    assert "missing column 'quantity'" in message and "missing column 'occurred_at'" in message
    layout = check_header(
        [" occurred_at ", "payload.site_id", "product_sku", "on_hand"], "inventory_level", 1
    )
    assert layout.paths == (
        ("envelope", "occurred_at"),
        ("payload", "site_id"),
        ("payload", "product_sku"),
        ("payload", "on_hand"),
    )


def test_csv_event_ids_repeat_for_the_same_body_and_differ_otherwise() -> None:
    body = rows("2026-11-01T08:00:00Z,SO-1,C-1,B,1", "2026-11-01T08:00:00Z,SO-2,C-1,B,2")
    first = [i.data["event_id"] for i in parse_csv(body, "acme", "sales_order_line", 1)]
    again = [i.data["event_id"] for i in parse_csv(bytes(body), "acme", "sales_order_line", 1)]
    rival = [i.data["event_id"] for i in parse_csv(body, "rival", "sales_order_line", 1)]
    other = [i.data["event_id"] for i in parse_csv(body + b"\n", "acme", "sales_order_line", 1)]
    assert first == again and len(set(first)) == 2
    assert not set(first) & set(rival) and not set(first) & set(other)

    given = "6f1b2f1e-0000-4000-8000-000000000001"
    [item] = parse_csv(
        rows(f"{given},2026-11-01T08:00:00Z,SO-1,C-1,B,1", header="event_id," + HEADER),
        "acme",
        "sales_order_line",
        1,
    )
    assert item.data["event_id"] == given


def test_csv_rows_quoting_bom_blank_lines_and_short_rows() -> None:
    body = "\ufeff".encode() + rows(
        '2026-11-01T08:00:00Z,"SO-1, ""rush""","C-1\nsecond line",螺栓,1',
        "",
        "2026-11-01T08:00:00Z,SO-2,C-2,B",
        "2026-11-01T08:00:00Z,SO-3,,B,3",
    )
    items = parse_csv(body, "acme", "sales_order_line", 1)
    assert [i.index for i in items] == [0, 1, 2]
    assert items[0].data["payload"] == {
        "order_id": 'SO-1, "rush"',
        "customer_id": "C-1\nsecond line",
        "product_sku": "螺栓",
        "quantity": 1.0,  # a cell of a number field is converted to a number
    }
    assert items[1].data is None and "wrong number of cells" in (items[1].error or "")
    assert "customer_id" not in items[2].data["payload"]  # empty cell = missing
    intake = validate_records(items, "acme", source_system="csv")
    assert len(intake.accepted) == 1
    assert {(r.index, r.errors[0].field) for r in intake.refused} == {
        (1, ""),
        (2, "payload.customer_id"),
    }
    assert str(intake.refused[0].original).startswith(HEADER)  # what the dead letter keeps


def test_csv_cells_become_the_declared_numbers_and_text_that_is_none_is_refused() -> None:
    """CSV cells are text; the contracts are strict about numbers, so the CSV mapping converts a
    cell to its field's type first, and only what does not read as one is refused."""
    body = rows(
        "2026-11-01T08:00:00Z,SO-1,C-1,B,10,2",
        "2026-11-01T08:00:00Z,SO-2,C-1,B,+2.5e1,3",
        "2026-11-01T08:00:00Z,SO-3,C-1,B,.5,4",
        "2026-11-01T08:00:00Z,SO-4,C-1,B,ten,5",
        "2026-11-01T08:00:00Z,SO-5,C-1,B,true,6",
        "2026-11-01T08:00:00Z,SO-6,C-1,B,nan,7",
        "2026-11-01T08:00:00Z,SO-7,C-1,B,1,2.0",
        "2026-11-01T08:00:00Z,SO-8,C-1,B,1_000,8",
        header=HEADER + ",line_no",
    )
    items = parse_csv(body, "acme", "sales_order_line", 1)
    payloads = [item.data["payload"] for item in items]
    assert [(p["quantity"], p["line_no"]) for p in payloads[:3]] == [(10.0, 2), (25.0, 3), (0.5, 4)]
    assert [p["quantity"] for p in payloads[3:6]] == ["ten", "true", "nan"]  # left as text
    intake = validate_records(items, "acme", source_system="csv")
    assert len(intake.accepted) == 3
    assert sorted((r.index, r.errors[0].field) for r in intake.refused) == [
        (3, "payload.quantity"),
        (4, "payload.quantity"),
        (5, "payload.quantity"),
        (6, "payload.line_no"),
        (7, "payload.quantity"),
    ]


def test_csv_that_is_not_utf8_or_not_csv_refuses_the_request() -> None:
    with pytest.raises(CsvError, match="not UTF-8"):
        parse_csv(
            rows("2026-11-01T08:00:00Z,SO-1,C-1,B,1") + b"\xff\xfe\n", "acme", "sales_order_line", 1
        )
    with pytest.raises(CsvError, match="empty"):
        parse_csv(b"", "acme", "sales_order_line", 1)
    with pytest.raises(CsvError, match="cannot be parsed"):
        parse_csv(rows('2026-11-01T08:00:00Z,"SO-1"x,C,B,1'), "acme", "sales_order_line", 1)


def test_ndjson_indices_are_line_numbers_and_originals_come_back_byte_for_byte() -> None:
    body = bytearray(b'{"a": 1}\r\n\n  \n[1, 2]\n{broken\n"\xe4\xb8\xad"')
    parsed = split_ndjson(body)
    assert [index for index, _ in parsed.lines or ()] == [0, 3, 4, 5]
    # the lines are views into the body, not copies of it: a body is held once
    assert all(isinstance(line, memoryview) and line.obj is body for _, line in parsed.lines or ())
    intake = validate_parsed(parsed, "acme")
    originals = {r.index: r.original for r in intake.refused}
    assert originals[4] == b"{broken"
    assert originals[0] == b'{"a": 1}\r'
    assert [(r.index, r.reason) for r in intake.refused] == [
        (0, "unknown event type"),
        (3, "a record must be a JSON object"),
        (4, "invalid JSON: JSON is malformed: object keys must be strings (byte 1)"),
        (5, "a record must be a JSON object"),
    ]


def test_a_record_with_invalid_utf8_is_refused_on_its_own() -> None:
    good = orjson.dumps(sales_event("acme", seq=1)), orjson.dumps(sales_event("acme", seq=2))
    bad = orjson.dumps(sales_event("acme", seq=3)).replace(b'"test"', b'"\xff\xfetest"')
    for parsed in (
        split_ndjson(bytearray(b"\n".join([good[0], bad, good[1]]))),
        parse_json_array(b"[" + b",".join([good[0], bad, good[1]]) + b"]"),
    ):
        intake = validate_parsed(parsed, "acme")
        assert [bytes(v) for v in intake.accepted] == list(good)
        assert [(r.index, r.reason.split(":")[0]) for r in intake.refused] == [(1, "invalid JSON")]


def test_a_json_body_must_be_an_array_and_elements_keep_their_content() -> None:
    with pytest.raises(RequestError) as error:
        parse_json_array(b'{"type": "x"}')
    assert error.value.status == 400 and "JSON array" in error.value.message
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_json_array(b"[1,")
    parsed = parse_json_array(b'[{"x": "\xe4\xb8\xad"}, 2]')
    refused = validate_parsed(parsed, "acme").refused
    assert orjson.loads(refused[0].original) == {"x": "中"}
    deep = b"[" * 5000 + b"]" * 5000  # deeper than either JSON reader goes: 400, not 500
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_json_array(deep)


def test_metric_labels_for_refusal_reasons_are_bounded() -> None:
    assert reason_label("invalid JSON: unexpected character: line 1 column 7") == "invalid JSON"
    assert len(reason_label("x" * 500)) == 60
