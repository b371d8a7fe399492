"""The file-drop connector: each complete file is published once, a rewritten file again, a bad
file is moved aside with a report — checked against the real local Kafka."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from aiokafka import TopicPartition

from schemas.topics import EVENTS_RAW, dlq
from services.ingest.filedrop import (
    FileDrop,
    FileOutcome,
    IngestState,
    content_digest,
    content_event_id,
)
from services.ingest.mapping import load_mapping
from shared.codec import decode
from shared.kafka import BatchPublisher, create_consumer, create_producer, ensure_topics, started
from shared.settings import XietongSettings

integration = pytest.mark.integration

MAPPINGS = Path(__file__).parents[2] / "deploy" / "mappings"

SALES_HEADER = "order_id,customer_id,product_sku,quantity,unit_price,currency,occurred_at\n"
SALES_ROWS = [
    "SO-1,C-042,BOLT-M8,100,0.35,CNY,2026-11-03T08:00:00+08:00\n",
    "SO-2,C-043,NUT-M8,250,0.12,CNY,2026-11-03T09:30:00+08:00\n",
    "SO-3,C-044,螺栓-M10,40,0.80,CNY,2026-11-03T10:15:00+08:00\n",
]


async def end_offsets(settings: XietongSettings, topic: str) -> dict[TopicPartition, int]:
    async with started(create_producer(settings)) as producer:
        partitions = await producer.partitions_for(topic)
    async with started(create_consumer(settings, None)) as consumer:
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        return dict(await consumer.end_offsets(tps))


async def published_since(
    settings: XietongSettings, marks: dict[TopicPartition, int], tenant: str
) -> list[dict[str, Any]]:
    """Everything keyed by ``tenant`` between ``marks`` and the current end of the topic.

    The connector returns only after Kafka acknowledged a file's records, so this read is
    complete without waiting for anything.
    """
    ends = await end_offsets(settings, next(iter(marks)).topic)
    found: list[dict[str, Any]] = []
    pending = {tp for tp in marks if ends[tp] > marks[tp]}
    if not pending:
        return found
    async with started(create_consumer(settings, None)) as consumer:
        consumer.assign(list(pending))
        for tp in pending:
            consumer.seek(tp, marks[tp])
        async with asyncio.timeout(30):
            while pending:
                for tp, records in (await consumer.getmany(timeout_ms=500)).items():
                    found += [
                        decode(r.value)
                        for r in records
                        if r.key == tenant.encode() and r.offset < ends[tp]
                    ]
                    if records and records[-1].offset >= ends[tp] - 1:
                        pending.discard(tp)
    return found


class Harness:
    """A watched folder of a fresh tenant, with the raw and dead-letter topics' marks."""

    def __init__(self, settings: XietongSettings, folder: Path, publisher: BatchPublisher) -> None:
        self.settings, self.folder, self.publisher = settings, folder, publisher
        self.tenant = f"drop-{uuid.uuid4().hex[:8]}"
        self.marks: dict[str, dict[TopicPartition, int]] = {}

    def drop(self, **options: Any) -> FileDrop:
        return FileDrop(
            self.folder, self.tenant, self.publisher, state_dir=self.settings.state_dir, **options
        )

    async def mark(self) -> None:
        for topic in (EVENTS_RAW, dlq(EVENTS_RAW)):
            self.marks[topic] = await end_offsets(self.settings, topic)

    async def raw(self) -> list[dict[str, Any]]:
        return await published_since(self.settings, self.marks[EVENTS_RAW], self.tenant)

    async def letters(self) -> list[dict[str, Any]]:
        return await published_since(self.settings, self.marks[dlq(EVENTS_RAW)], self.tenant)


@pytest.fixture
async def harness(settings: XietongSettings, tmp_path: Path) -> AsyncIterator[Harness]:
    await ensure_topics(settings, [EVENTS_RAW, dlq(EVENTS_RAW)])
    folder = tmp_path / "drop"
    folder.mkdir()
    async with started(create_producer(settings)) as producer:
        yield Harness(settings, folder, BatchPublisher(producer))


def only(outcomes: list[FileOutcome]) -> FileOutcome:
    assert len(outcomes) == 1, outcomes
    return outcomes[0]


@integration
async def test_a_dropped_file_is_ingested_once_and_a_rewritten_file_again(harness: Harness) -> None:
    drop = harness.drop()
    name = f"{harness.tenant}__sales_order_line__2026-11-03.csv"
    path = harness.folder / name
    await harness.mark()
    path.write_text(SALES_HEADER + "".join(SALES_ROWS), encoding="utf-8")

    assert await drop.poll() == []  # first sight: maybe still being written
    outcome = only(await drop.poll())
    assert (outcome.status, outcome.accepted, outcome.refused) == ("ingested", 3, 0)
    assert not path.exists() and (harness.folder / ".done" / name).exists()
    first = await harness.raw()
    assert sorted(e["payload"]["order_id"] for e in first) == ["SO-1", "SO-2", "SO-3"]
    assert {e["source"]["system"] for e in first} == {"file-drop"}
    assert {e["type"] for e in first} == {"sales_order_line"}
    assert "螺栓-M10" in {e["payload"]["product_sku"] for e in first}

    # the ERP exports the same file again: remembered (even by a restarted connector), not sent
    await harness.mark()
    path.write_text(SALES_HEADER + "".join(SALES_ROWS), encoding="utf-8")
    restarted = harness.drop()
    outcome = only(await restarted.poll(settle=False))
    assert (outcome.status, outcome.accepted) == ("skipped", 0)
    assert not path.exists()
    assert await harness.raw() == []

    # rewritten with a corrected row: ingested again; the unchanged rows keep their event ids
    await harness.mark()
    corrected = SALES_ROWS[1].replace(",250,", ",260,")
    path.write_text(SALES_HEADER + SALES_ROWS[0] + corrected + SALES_ROWS[2], encoding="utf-8")
    outcome = only(await restarted.poll(settle=False))
    assert (outcome.status, outcome.accepted) == ("ingested", 3)
    assert outcome.moved_to is not None and outcome.moved_to.parent.name == ".done"
    second = {e["payload"]["order_id"]: e for e in await harness.raw()}
    ids = {e["payload"]["order_id"]: e["event_id"] for e in first}
    assert second["SO-1"]["event_id"] == ids["SO-1"] and second["SO-3"]["event_id"] == ids["SO-3"]
    assert (
        second["SO-2"]["event_id"] != ids["SO-2"] and second["SO-2"]["payload"]["quantity"] == 260
    )


@integration
async def test_a_file_still_growing_waits_until_its_size_is_stable(harness: Harness) -> None:
    drop = harness.drop(event_type="sales_order_line")
    path = harness.folder / "export.csv"
    path.write_text(SALES_HEADER + SALES_ROWS[0], encoding="utf-8")
    assert await drop.poll() == []
    with path.open("a", encoding="utf-8") as export:
        export.write(SALES_ROWS[1])
    assert await drop.poll() == []  # it changed since the last poll
    outcome = only(await drop.poll())
    assert (outcome.status, outcome.accepted) == ("ingested", 2)


@integration
async def test_a_mapped_export_with_a_done_marker_is_converted_as_the_mapping_says(
    harness: Harness,
) -> None:
    mapping = load_mapping(MAPPINGS / "acme-filedrop.yaml").model_copy(
        update={"tenant": harness.tenant}
    )
    drop = harness.drop(mapping=mapping)
    await harness.mark()
    path = harness.folder / "stock_2026-11-03.csv"
    path.write_text(
        "Werk,Material,Bestand,ME,Stichtag\nW1,STEEL-HRC,12.5,KG,03.11.2026\nW2,BOLT-M8,4000,ST,03.11.2026\n",
        encoding="utf-8",
    )
    (harness.folder / "stock_2026-11-03.csv.done").touch()

    outcome = only(await drop.poll())  # the marker says complete: no second poll needed
    assert (outcome.status, outcome.accepted) == ("ingested", 2)
    assert not (harness.folder / "stock_2026-11-03.csv.done").exists()
    events = {e["source"]["record_id"]: e for e in await harness.raw()}
    assert set(events) == {"W1/STEEL-HRC", "W2/BOLT-M8"}
    steel = events["W1/STEEL-HRC"]
    assert steel["type"] == "inventory_level" and steel["source"]["system"] == "erp-export"
    given = {field: value for field, value in steel["payload"].items() if value is not None}
    assert given == {
        "site_id": "W1",
        "product_sku": "STEEL-HRC",
        "on_hand": 12.5,
        "unit": "kg",
    }
    assert events["W2/BOLT-M8"]["payload"]["unit"] == "pcs"
    berlin_midnight = datetime(2026, 11, 3, tzinfo=ZoneInfo("Europe/Berlin"))
    assert datetime.fromisoformat(steel["occurred_at"]) == berlin_midnight


@integration
async def test_refused_records_go_to_the_dead_letter_topic_and_the_rest_is_published(
    harness: Harness,
) -> None:
    mapping = load_mapping(MAPPINGS / "acme-filedrop.yaml").model_copy(
        update={"tenant": harness.tenant}
    )
    drop = harness.drop(mapping=mapping)
    await harness.mark()
    lines = [
        {
            "order": "SO-7",
            "pos": 1,
            "customer": "C-1",
            "sku": "S-1",
            "qty": 5,
            "price_fen": 1250,
            "booked_at": "2026-11-03T08:00:00",
        },
        {
            "order": "SO-7",
            "pos": 2,
            "customer": "C-1",
            "sku": "S-2",
            "qty": -5,
            "price_fen": 99,
            "booked_at": "2026-11-03T08:00:00",
        },
        {
            "order": "SO-8",
            "pos": 1,
            "customer": "C-2",
            "sku": "S-1",
            "qty": 1,
            "price_fen": "lots",
            "booked_at": "2026-11-03T09:00:00",
        },
    ]
    body = "\n".join(orjson.dumps(line).decode() for line in lines) + "\n{not json\n"
    (harness.folder / "sales_2026-11-03.ndjson").write_text(body, encoding="utf-8")

    outcome = only(await drop.poll(settle=False))
    assert (outcome.status, outcome.accepted, outcome.refused) == ("ingested", 1, 3)
    (event,) = await harness.raw()
    assert event["source"]["record_id"] == "SO-7/1" and event["payload"]["unit_price"] == "12.5"
    assert datetime.fromisoformat(event["occurred_at"]).utcoffset() == timedelta(hours=8)
    letters = sorted(await harness.letters(), key=lambda letter: letter["source_ref"])
    refs = [letter["source_ref"] for letter in letters]
    assert refs == [f"file:sales_2026-11-03.ndjson#{i}" for i in (1, 2, 3)]
    assert [e["field"] for e in letters[0]["errors"]] == ["payload.quantity"]
    assert letters[1]["errors"][0]["field"] == "unit_price" and "lots" in letters[1]["reason"]
    assert "not JSON" in letters[2]["reason"] and letters[2]["original"] == "{not json"


@integration
async def test_an_old_export_is_welcome_but_not_before_2000_nor_ahead_of_now(
    harness: Harness,
) -> None:
    drop = harness.drop()
    await harness.mark()
    ahead = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    name = f"{harness.tenant}__sales_order_line__archive.csv"
    (harness.folder / name).write_text(
        "order_id,customer_id,product_sku,quantity,occurred_at\n"
        "SO-1,C-1,S-1,5,2004-02-29T10:00:00+08:00\n"
        f"SO-2,C-1,S-1,5,{ahead}\n"
        "SO-3,C-1,S-1,5,1995-06-30T10:00:00+08:00\n",
        encoding="utf-8",
    )
    outcome = only(await drop.poll(settle=False))
    assert (outcome.status, outcome.accepted, outcome.refused) == ("ingested", 1, 2)
    (event,) = await harness.raw()
    assert event["payload"]["order_id"] == "SO-1"
    letters = sorted(await harness.letters(), key=lambda letter: letter["source_ref"])
    assert [letter["source_ref"] for letter in letters] == [f"file:{name}#1", f"file:{name}#2"]
    assert [[e["field"] for e in letter["errors"]] for letter in letters] == [["occurred_at"]] * 2


async def read_report(folder: Path, name: str) -> dict[str, Any]:
    assert not (folder / name).exists() and (folder / ".failed" / name).exists()
    report: dict[str, Any] = orjson.loads((folder / ".failed" / f"{name}.error.json").read_bytes())
    assert report["file"] == name
    return report


@integration
async def test_bad_files_are_moved_aside_with_an_error_report(harness: Harness) -> None:
    drop = harness.drop(event_type="sales_order_line")
    await harness.mark()
    misspelled = "misspelled.csv"
    (harness.folder / misspelled).write_text(
        SALES_HEADER.replace("quantity", "quantty") + SALES_ROWS[0], encoding="utf-8"
    )
    latin1 = "latin1.csv"
    (harness.folder / latin1).write_bytes(
        (SALES_HEADER + "SO-9,Müller,X,1,1,EUR,2026-11-03T08:00:00Z\n").encode("latin-1")
    )
    foreign = "someone-else__sales_order_line__2026.csv"
    (harness.folder / foreign).write_text(SALES_HEADER + SALES_ROWS[0], encoding="utf-8")
    all_refused = f"{harness.tenant}__market_price__today.ndjson"
    (harness.folder / all_refused).write_text(
        '{"commodity": "copper", "market": "SHFE", "price": -1, "currency": "CNY", "unit": "t",'
        ' "occurred_at": "2026-11-03T08:00:00Z"}\n',
        encoding="utf-8",
    )

    outcomes = {o.name: o for o in await drop.poll(settle=False)}
    assert {name: o.status for name, o in outcomes.items()} == dict.fromkeys(
        (misspelled, latin1, foreign, all_refused), "failed"
    )
    report = await read_report(harness.folder, misspelled)
    assert "quantty" in report["error"] and "did you mean 'quantity'" in report["error"]
    assert "UTF-8" in (await read_report(harness.folder, latin1))["error"]
    assert "someone-else" in (await read_report(harness.folder, foreign))["error"]
    report = await read_report(harness.folder, all_refused)
    assert report["error"] == "every record was refused" and report["refused"] == 1
    assert report["refusals"][0]["errors"][0]["field"] == "payload.price"

    assert await harness.raw() == []
    (letter,) = await harness.letters()  # the refused record itself is not lost
    assert letter["source_ref"] == f"file:{all_refused}#0"


@integration
async def test_a_file_without_an_event_type_fails_and_a_header_only_export_is_done(
    harness: Harness,
) -> None:
    drop = harness.drop()
    (harness.folder / "nightly.csv").write_text(SALES_HEADER + SALES_ROWS[0], encoding="utf-8")
    (harness.folder / f"{harness.tenant}__inventory_level__empty.csv").write_text(
        "site_id,product_sku,on_hand,occurred_at\n", encoding="utf-8"
    )
    outcomes = {o.name: o for o in await drop.poll(settle=False)}
    assert outcomes["nightly.csv"].status == "failed"
    assert "no event type" in (await read_report(harness.folder, "nightly.csv"))["error"]
    empty = outcomes[f"{harness.tenant}__inventory_level__empty.csv"]
    assert (empty.status, empty.accepted, empty.refused) == ("ingested", 0, 0)


def test_the_state_file_is_keyed_by_name_and_content(tmp_path: Path) -> None:
    state = IngestState.load(tmp_path / "state.json")
    state.remember("a.csv", "0" * 64, accepted=1)
    again = IngestState.load(tmp_path / "state.json")
    assert again.seen("a.csv", "0" * 64)
    assert not again.seen("a.csv", "1" * 64) and not again.seen("b.csv", "0" * 64)


def test_content_ids_repeat_for_equal_content_and_count_duplicates() -> None:
    row = {"payload": {"order_id": "SO-1", "quantity": 1}, "occurred_at": date(2026, 11, 3)}
    same = {"occurred_at": date(2026, 11, 3), "payload": {"quantity": 1, "order_id": "SO-1"}}
    digest = content_digest(row)
    assert digest == content_digest(same)
    assert content_event_id("t1", "x", digest, 0) == content_event_id("t1", "x", digest, 0)
    assert content_event_id("t1", "x", digest, 0) != content_event_id("t1", "x", digest, 1)
    assert content_event_id("t1", "x", digest, 0) != content_event_id("t2", "x", digest, 0)
