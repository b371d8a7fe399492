from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from pydantic import AwareDatetime, TypeAdapter, ValidationError

from schemas import generate
from schemas.compat import breaking_changes
from schemas.events import (
    EVENT_MODELS,
    PAYLOADS,
    EventTimeBounds,
    UnknownEventType,
    event_time_error,
    kafka_received_at,
    validate_event,
)
from schemas.topics import TOPICS, dlq
from tests.factories import sales_event

SCHEMAS_DIR = Path(generate.__file__).parent


def test_committed_schema_files_match_the_models() -> None:
    rendered = generate.render()
    stale = [
        rel
        for rel, content in rendered.items()
        if not (SCHEMAS_DIR / rel).exists() or (SCHEMAS_DIR / rel).read_text() != content
    ]
    assert stale == [], f"contract files drifted from the models; run `make schemas`: {stale}"


def test_every_committed_schema_file_is_still_generated() -> None:
    generated = set(generate.render())
    committed = {str(p.relative_to(SCHEMAS_DIR)) for p in (SCHEMAS_DIR / "json").rglob("*.json")}
    assert committed <= generated, f"schema files no model produces: {committed - generated}"


def test_each_new_version_is_backward_compatible_with_the_previous_one() -> None:
    for (type_name, version), model in EVENT_MODELS.items():
        previous = SCHEMAS_DIR / "json" / "events" / f"{type_name}.v{version - 1}.json"
        if version > 1:
            assert previous.exists(), f"{type_name} v{version} has no v{version - 1} file"
            old = json.loads(previous.read_text())
            assert breaking_changes(old, model.model_json_schema()) == []


def test_asyncapi_lists_every_topic_with_key_producers_and_consumers() -> None:
    document = yaml.safe_load((SCHEMAS_DIR / "asyncapi.yaml").read_text())
    assert document["asyncapi"].startswith("3.")
    addresses = {channel["address"] for channel in document["channels"].values()}
    assert addresses == {spec.name for spec in TOPICS}
    for spec in TOPICS:
        assert spec.producers and spec.consumers
        actions = {
            op["action"]
            for op in document["operations"].values()
            if document["channels"][op["channel"]["$ref"].split("/")[-1]]["address"] == spec.name
        }
        assert actions == {"send", "receive"}
    for message in document["components"]["messages"].values():
        assert message["bindings"]["kafka"]["key"]["type"] == "string"
        ref = message["payload"]["schema"]["$ref"]
        assert (SCHEMAS_DIR / ref).exists(), ref


def test_topic_names_follow_the_convention() -> None:
    for spec in TOPICS:
        parts = spec.name.removesuffix(".dlq").split(".")
        assert len(parts) == 3 and parts[2].startswith("v"), spec.name
    assert dlq("events.raw.v1") == "events.raw.v1.dlq"


def test_a_valid_event_of_every_type_parses() -> None:
    assert validate_event(sales_event()).payload.quantity == 10.0
    assert {name for name, _ in PAYLOADS} >= {
        "sales_order_line",
        "inventory_level",
        "purchase_order",
        "supplier_delivery",
        "production_output",
        "workforce",
        "market_price",
        "text_document",
    }


def test_event_time_without_offset_is_refused() -> None:
    event = sales_event()
    event["occurred_at"] = "2026-11-01T08:00:00"
    with pytest.raises(ValidationError) as info:
        validate_event(event)
    assert info.value.errors()[0]["loc"] == ("occurred_at",)


def test_unknown_fields_and_types_are_refused_with_the_field_named() -> None:
    event = sales_event()
    event["payload"]["quantiy"] = 3
    with pytest.raises(ValidationError) as info:
        validate_event(event)
    assert ("payload", "quantiy") in [e["loc"] for e in info.value.errors()]
    with pytest.raises(UnknownEventType):
        validate_event({**sales_event(), "type": "sales_order_line", "schema_version": 9})


def test_chinese_text_document_is_valid() -> None:
    event = {
        **sales_event(),
        "type": "text_document",
        "payload": {"kind": "customer_feedback", "language": "zh", "text": "交货很快，质量很好。"},
    }
    assert validate_event(event).payload.text == "交货很快，质量很好。"


# ----------------------------------------------------------------- the compatibility rule itself


def _schema() -> dict:
    return EVENT_MODELS[("sales_order_line", 1)].model_json_schema()


def test_adding_an_optional_field_is_compatible() -> None:
    new = copy.deepcopy(_schema())
    new["properties"]["discount"] = {"type": "number", "default": 0}
    assert breaking_changes(_schema(), new) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda s: s["properties"].pop("tenant"), "tenant: removed"),
        (lambda s: s["required"].append("corrects"), "corrects: optional field made required"),
        (
            lambda s: (
                s["properties"].__setitem__("x", {"type": "string"}),
                s["required"].append("x"),
            ),
            "x: new required field",
        ),
        (
            lambda s: s["properties"].__setitem__("schema_version", {"type": "string"}),
            "schema_version: no longer accepts",
        ),
    ],
)
def test_breaking_changes_are_reported(change, expected: str) -> None:  # type: ignore[no-untyped-def]
    new = copy.deepcopy(_schema())
    change(new)
    problems = breaking_changes(_schema(), new)
    assert any(p.startswith(expected) for p in problems), problems


def test_event_time_bounds_refuse_the_future_and_the_implausibly_old_only() -> None:
    received = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    bounds = EventTimeBounds(
        max_ahead=timedelta(hours=1), earliest=datetime(2000, 1, 1, tzinfo=UTC)
    )
    parse = TypeAdapter(AwareDatetime).validate_python
    refused = ["2036-01-01T00:00:00Z", "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+01:00"]
    refused += ["2026-11-01T13:00:01Z", "2000-01-01T07:59:59+08:00"]
    for text in refused:
        assert event_time_error(parse(text), received, bounds) is not None, text
    for text in ["2026-11-01T13:00:00Z", "2000-01-01T00:00:00Z", "2003-05-17T09:30:00+08:00"]:
        assert event_time_error(parse(text), received, bounds) is None, text
    # without a moment of reception (a Kafka record without timestamp) only `earliest` holds
    assert event_time_error(parse("2036-01-01T00:00:00Z"), None, bounds) is None
    assert event_time_error(parse("1999-01-01T00:00:00Z"), None, bounds) is not None


def test_a_kafka_timestamp_is_the_moment_of_reception_when_there_is_one() -> None:
    assert kafka_received_at(1_793_534_400_000) == datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    assert kafka_received_at(-1) is None
    assert kafka_received_at(0) is None
    assert kafka_received_at(None) is None
