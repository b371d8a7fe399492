"""Unit tests of the shared library pieces that need nothing running."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from uuid import UUID

import aiohttp
import pytest

from deploy.local.infra import free_port
from schemas.events import validate_event
from shared.codec import decode, encode
from shared.deadletter import dead_letter, dead_letter_record
from shared.logs import JsonFormatter
from shared.observability import serve_health
from shared.settings import load_settings
from tests.factories import sales_event


def test_codec_round_trips_models_with_aware_datetimes_and_uuids() -> None:
    event = validate_event(sales_event())
    data = decode(encode(event))
    assert UUID(data["event_id"]) == event.event_id
    assert datetime.fromisoformat(data["occurred_at"]) == event.occurred_at
    assert validate_event(data) == event
    assert decode(encode({"at": datetime(2026, 1, 1, tzinfo=UTC)})) == {
        "at": "2026-01-01T00:00:00Z"
    }


def test_dead_letter_keeps_binary_originals_as_base64_and_names_the_reason() -> None:
    letter = dead_letter(
        b"\xff\xfe", "not UTF-8", service="clean", source_topic="t", source_offset=7
    )
    assert letter.original_encoding == "base64" and letter.original == "//4="
    record = dead_letter_record(letter)
    assert record.key is None
    assert dict(record.headers)["xietong-reason"] == b"not UTF-8"
    text = dead_letter("协同 {", "bad json", service="ingest", tenant="acme")
    assert text.original == "协同 {" and dead_letter_record(text).key == b"acme"


def test_settings_come_from_the_environment_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XIETONG_KAFKA_BOOTSTRAP_SERVERS", "broker-1:9092,broker-2:9092")
    monkeypatch.setenv("XIETONG_KAFKA_SASL_PASSWORD", "s3cret")
    settings = load_settings(kafka_partitions=12)
    assert settings.kafka_bootstrap_servers == "broker-1:9092,broker-2:9092"
    assert settings.kafka_partitions == 12
    assert "s3cret" not in repr(settings)  # secrets never print


def test_json_logs_carry_service_and_extra_fields() -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "batch failed", None, None)
    record.topic, record.offset = "events.raw.v1", 42
    line = json.loads(JsonFormatter("clean").format(record))
    assert line["service"] == "clean" and line["level"] == "error"
    assert line["topic"] == "events.raw.v1" and line["offset"] == 42


async def test_health_ready_and_metrics_endpoints() -> None:
    ready: list[str | None] = ["broker unreachable"]

    async def check() -> str | None:
        return ready[0]

    port = free_port()
    runner = await serve_health("demo", "127.0.0.1", port, check)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            assert (await (await http.get("/healthz")).json())["status"] == "ok"
            assert (await http.get("/readyz")).status == 503
            ready[0] = None
            assert (await http.get("/readyz")).status == 200
            metrics = await http.get("/metrics")
            assert "python_info" in await metrics.text()
    finally:
        await runner.cleanup()
