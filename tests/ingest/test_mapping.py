"""The declarative ERP mapping: loading, checking against the contracts, value conversions."""

from __future__ import annotations

import base64
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from services.ingest.mapping import (
    FieldMapping,
    MappingError,
    MappingFailure,
    RecordMapping,
    convert_value,
    decode_connect_decimal,
    load_mapping,
    parse_mapping,
)

EXAMPLES = sorted((Path(__file__).parents[2] / "deploy" / "mappings").glob("*.yaml"))
UTC_ZONE = ZoneInfo("UTC")


def connect_decimal(value: str, scale: int) -> str:
    unscaled = int(Decimal(value).scaleb(scale))
    size = max(1, (unscaled.bit_length() + 8) // 8)
    return base64.b64encode(unscaled.to_bytes(size, "big", signed=True)).decode()


def sales_mapping(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "order_id": "order_no",
        "customer_id": "customer",
        "product_sku": "sku",
        "quantity": "qty",
    }
    return {
        "tenant": "acme",
        "tables": {"lines": {"event_type": "sales_order_line", "fields": {**base, **fields}}},
    }


def test_the_shipped_example_mappings_are_valid() -> None:
    assert len(EXAMPLES) >= 3
    tenants = {load_mapping(path).tenant for path in EXAMPLES}
    assert tenants == {"acme", "bolt-works"}


def test_a_misspelled_payload_field_is_refused_with_the_known_fields() -> None:
    with pytest.raises(MappingError) as caught:
        parse_mapping(sales_mapping(quantitty="qty2"))
    message = str(caught.value)
    assert "quantitty" in message and "unit_price" in message and "tables.lines" in message


def test_a_required_payload_field_left_unmapped_is_refused() -> None:
    data = sales_mapping()
    del data["tables"]["lines"]["fields"]["customer_id"]
    with pytest.raises(MappingError, match="customer_id"):
        parse_mapping(data)


def test_an_unknown_event_type_or_version_is_refused() -> None:
    data = sales_mapping()
    data["tables"]["lines"]["schema_version"] = 9
    with pytest.raises(MappingError, match="unknown event type 'sales_order_line' version 9"):
        parse_mapping(data)


def test_a_field_needs_exactly_one_of_column_or_constant() -> None:
    with pytest.raises(MappingError, match="exactly one"):
        parse_mapping(sales_mapping(unit={"column": "uom", "constant": "kg"}))
    with pytest.raises(MappingError, match="exactly one"):
        parse_mapping(sales_mapping(unit={"divide": 100}))


def test_topics_without_tables_and_a_bad_tenant_are_refused() -> None:
    with pytest.raises(MappingError, match="tables"):
        parse_mapping({"tenant": "acme", "topics": ["erp.public.x"]})
    with pytest.raises(MappingError, match="tenant"):
        parse_mapping({**sales_mapping(), "tenant": "Not A Tenant"})


def test_an_unreadable_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("tenant: [unclosed", encoding="utf-8")
    with pytest.raises(MappingError, match=r"broken\.yaml"):
        load_mapping(path)


def test_a_record_maps_onto_the_payload_with_conversions() -> None:
    spec = parse_mapping(
        sales_mapping(
            line_no="pos",
            unit={"constant": "kg"},
            unit_price={"column": "price_cents", "divide": 100},
            currency={"column": "cur", "values": {"RMB": "CNY"}},
            region={"column": "region", "default": "north"},
        )
    ).tables["lines"]
    row = {
        "order_no": 40017,  # an integer key column feeds a text field
        "pos": 2,
        "customer": "C-9",
        "sku": "BOLT-M8",
        "qty": "12.5",
        "price_cents": 1999,
        "cur": "RMB",
        "region": "",
    }
    assert spec.payload_of(row) == {
        "order_id": "40017",
        "line_no": 2,
        "customer_id": "C-9",
        "product_sku": "BOLT-M8",
        "quantity": 12.5,  # no conversion asked: read as the number the contract declares
        "unit": "kg",
        "unit_price": Decimal("19.99"),  # money stays a Decimal: every digit kept
        "currency": "CNY",
        "region": "north",
    }
    assert spec.record_id_of(row) is None


def test_text_and_divided_values_of_number_fields_become_the_declared_type() -> None:
    """The contracts take no "10" for a number: a CSV cell or a decimal in string mode is read
    as its field's type, a divided integer feeds an integer field, and what is none fails."""
    spec = parse_mapping(sales_mapping(line_no={"column": "pos", "divide": 10})).tables["lines"]
    row = {"order_no": "SO-1", "customer": "C", "sku": "S", "qty": " 7 ", "pos": 20}
    payload = spec.payload_of(row)
    assert payload["quantity"] == 7.0 and type(payload["quantity"]) is float
    assert payload["line_no"] == 2 and type(payload["line_no"]) is int
    for field, changes in [
        ("quantity", {"qty": "seven"}),
        ("quantity", {"qty": True}),
        ("line_no", {"pos": 25}),
    ]:
        with pytest.raises(MappingFailure) as caught:
            spec.payload_of({**row, **changes})
        assert caught.value.field == field


def test_empty_values_are_left_out_so_the_contract_policy_applies() -> None:
    spec = parse_mapping(sales_mapping(unit_price="price")).tables["lines"]
    row = {"order_no": "SO-1", "customer": "C", "sku": "S", "qty": 1, "price": None}
    assert "unit_price" not in spec.payload_of(row)
    assert "unit_price" not in spec.payload_of({**row, "price": "  "})


def test_a_mapped_column_missing_from_the_record_is_a_failure_naming_it() -> None:
    spec = parse_mapping(sales_mapping()).tables["lines"]
    with pytest.raises(MappingFailure) as caught:
        spec.payload_of({"order_no": "SO-1", "customer": "C", "sku": "S"})
    assert caught.value.field == "quantity" and "'qty'" in caught.value.reason


def test_record_ids_join_the_key_columns_and_refuse_empty_keys() -> None:
    data = sales_mapping()
    data["tables"]["lines"]["record_id"] = ["order_no", "pos"]
    spec = parse_mapping(data).tables["lines"]
    assert spec.record_id_of({"order_no": "SO-1", "pos": 3}) == "SO-1/3"
    with pytest.raises(MappingFailure, match="pos"):
        spec.record_id_of({"order_no": "SO-1", "pos": None})


@pytest.mark.parametrize(
    ("value", "scale", "expected"),
    [
        ("12.500", 3, "12.500"),
        ("-1.50", 2, "-1.50"),
        ("0", 0, "0"),
        ("123456789.1234", 4, "123456789.1234"),
    ],
)
def test_connect_decimals_decode_with_their_scale(value: str, scale: int, expected: str) -> None:
    assert decode_connect_decimal(connect_decimal(value, scale), scale) == Decimal(expected)


def convert(spec: dict[str, Any], value: Any, zone: ZoneInfo = UTC_ZONE) -> Any:
    return convert_value(
        FieldMapping.model_validate({"column": "c", **spec}), {"c": value}, "f", zone
    )


def test_conversions_of_dates_times_and_numbers() -> None:
    shanghai = ZoneInfo("Asia/Shanghai")
    assert convert({"convert": "date"}, 20_000) == date(1970, 1, 1) + timedelta(days=20_000)
    assert convert({"convert": "date", "format": "%d.%m.%Y"}, "03.11.2026") == date(2026, 11, 3)
    micros = 1_762_000_000_123_456
    moment = convert({"epoch": "micros", "convert": "datetime"}, micros, shanghai)
    assert moment.tzinfo == shanghai and moment.microsecond == 123_456
    assert moment.replace(tzinfo=None) == datetime(1970, 1, 1) + timedelta(microseconds=micros)
    assert convert({"convert": "datetime"}, "2026-11-03T08:00:00Z").utcoffset() == timedelta(0)
    assert convert({"scale": 2, "multiply": 1000}, connect_decimal("1.25", 2)) == 1250.0
    assert convert({"convert": "int"}, "42") == 42
    assert convert({"convert": "bool"}, "yes") is True
    assert convert({"convert": "str"}, 7.0) == "7"


def test_bad_values_fail_with_the_field_and_the_value() -> None:
    with pytest.raises(MappingFailure, match="not a number"):
        convert({"divide": 100}, "twelve")
    with pytest.raises(MappingFailure, match="whole number"):
        convert({"convert": "int"}, "1.5")
    with pytest.raises(MappingFailure, match=r"%d\.%m\.%Y"):
        convert({"convert": "date", "format": "%d.%m.%Y"}, "2026-11-03")
    with pytest.raises(MappingFailure, match="cannot decode"):
        convert({"scale": 2}, "not base64!")


def test_occurred_at_is_aware_in_the_mapping_time_zone() -> None:
    data = sales_mapping()
    data["tables"]["lines"] |= {"occurred_at": "booked", "timezone": "Asia/Shanghai"}
    spec: RecordMapping = parse_mapping(data).tables["lines"]
    moment = spec.occurred_at_of({"booked": "2026-11-03 08:00:00"})
    assert moment is not None and moment.utcoffset() == timedelta(hours=8)
    assert spec.occurred_at_of({"booked": date(2026, 11, 3)}) == datetime(
        2026, 11, 3, tzinfo=ZoneInfo("Asia/Shanghai")
    )
    data["tables"]["lines"]["timezone"] = "Mars/Olympus"
    with pytest.raises(MappingError, match="time zone"):
        parse_mapping(data)
