"""The CDC connector: Debezium change events (PostgreSQL with the schema part, MySQL without)
become Xietong events; updates and deletes become corrections; re-deliveries keep their id."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiokafka import TopicPartition

from schemas.topics import EVENTS_RAW, dlq
from services.ingest.cdc import (
    Rejected,
    change_event_id,
    decode_column,
    map_change,
    map_changes,
    row_id,
    run_cdc,
)
from services.ingest.mapping import Mapping, MappingFailure, load_mapping
from shared.codec import decode, encode
from shared.kafka import create_consumer, create_producer, ensure_topics, started
from shared.settings import XietongSettings

MAPPINGS = Path(__file__).parents[2] / "deploy" / "mappings"
SHANGHAI = ZoneInfo("Asia/Shanghai")
EPOCH = date(1970, 1, 1)


def connect_decimal(value: str, scale: int) -> str:
    """How Debezium writes a DECIMAL in JSON: base64 of the big-endian unscaled integer."""
    unscaled = int(Decimal(value).scaleb(scale))
    size = max(1, (unscaled.bit_length() + 8) // 8)
    return base64.b64encode(unscaled.to_bytes(size, "big", signed=True)).decode()


def days(day: date) -> int:
    return (day - EPOCH).days


# ----------------------------------------------------------- PostgreSQL, with the schema part

PG_COLUMNS: list[dict[str, Any]] = [
    {"type": "string", "optional": False, "field": "order_no"},
    {"type": "int32", "optional": False, "field": "line_no"},
    {"type": "string", "optional": True, "field": "customer"},
    {"type": "string", "optional": True, "field": "sku"},
    {
        "type": "bytes",
        "optional": True,
        "name": "org.apache.kafka.connect.data.Decimal",
        "version": 1,
        "parameters": {"scale": "3", "connect.decimal.precision": "12"},
        "field": "qty_kg",
    },
    {"type": "int64", "optional": True, "field": "price_cents"},
    {"type": "string", "optional": True, "field": "cur"},
    {"type": "string", "optional": True, "field": "region"},
    {
        "type": "int32",
        "optional": True,
        "name": "io.debezium.time.Date",
        "version": 1,
        "field": "order_date",
    },
]


def pg_schema() -> dict[str, Any]:
    row = {
        "type": "struct",
        "fields": PG_COLUMNS,
        "optional": True,
        "name": "erp.public.sales_lines.Value",
    }
    return {
        "type": "struct",
        "name": "erp.public.sales_lines.Envelope",
        "version": 2,
        "optional": False,
        "fields": [
            {**row, "field": "before"},
            {**row, "field": "after"},
            {
                "type": "struct",
                "optional": False,
                "name": "io.debezium.connector.postgresql.Source",
                "field": "source",
                "fields": [
                    {"type": "string", "optional": False, "field": "connector"},
                    {"type": "string", "optional": False, "field": "schema"},
                    {"type": "string", "optional": False, "field": "table"},
                    {"type": "int64", "optional": True, "field": "lsn"},
                ],
            },
            {"type": "string", "optional": False, "field": "op"},
            {"type": "int64", "optional": True, "field": "ts_ms"},
        ],
    }


def pg_row(order: str, *, qty: str = "12.500", price_cents: int = 1999) -> dict[str, Any]:
    return {
        "order_no": order,
        "line_no": 1,
        "customer": "C-042",
        "sku": "STEEL-COIL",
        "qty_kg": connect_decimal(qty, 3),
        "price_cents": price_cents,
        "cur": "RMB",
        "region": "华东",
        "order_date": days(date(2026, 11, 3)),
    }


def pg_change(
    op: str,
    *,
    lsn: int,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    table: str = "sales_lines",
) -> bytes:
    payload = {
        "before": before,
        "after": after,
        "source": {
            "version": "2.7.3.Final",
            "connector": "postgresql",
            "name": "erp",
            "ts_ms": 1_762_160_000_000 + lsn,
            "snapshot": "true" if op == "r" else "false",
            "db": "erpdb",
            "schema": "public",
            "table": table,
            "txId": 700 + lsn,
            "lsn": lsn,
        },
        "op": op,
        "ts_ms": 1_762_160_000_500 + lsn,
    }
    return encode({"schema": pg_schema(), "payload": payload})


def pg_key(order: str) -> bytes:
    return encode({"order_no": order, "line_no": 1})


# --------------------------------------------------------------------------- MySQL, no schema part


def mysql_row(po: str, *, qty: str = "25.00", price: str = "612.5000") -> dict[str, Any]:
    return {
        "po_number": po,
        "line": 1,
        "vendor": "V-311",
        "material": "STEEL-HRC",
        "qty": connect_decimal(qty, 2),
        "uom": "TO",
        "net_price": connect_decimal(price, 4),
        "currency": "CNY",
        "delivery_date": days(date(2026, 12, 1)),
        "created_at": 1_762_164_000_000,  # DATETIME as milliseconds, wall clock of the database
    }


def mysql_change(op: str, *, pos: int, before: Any = None, after: Any = None) -> bytes:
    return encode(
        {
            "before": before,
            "after": after,
            "source": {
                "version": "2.7.3.Final",
                "connector": "mysql",
                "name": "erp",
                "ts_ms": 1_762_164_100_000,
                "snapshot": "false",
                "db": "erp",
                "table": "po_lines",
                "server_id": 223344,
                "file": "mysql-bin.000003",
                "pos": pos,
                "row": 0,
            },
            "op": op,
            "ts_ms": 1_762_164_100_200,
        }
    )


def pg_mapping(tenant: str = "acme", topic: str = "erp.public.sales_lines") -> Mapping:
    mapping = load_mapping(MAPPINGS / "acme-erp-postgres.yaml")
    return mapping.model_copy(update={"tenant": tenant, "topics": [topic]})


def mysql_mapping(tenant: str = "bolt-works", topic: str = "erp.erp.po_lines") -> Mapping:
    mapping = load_mapping(MAPPINGS / "bolt-works-erp-mysql.yaml")
    return mapping.model_copy(update={"tenant": tenant, "topics": [topic]})


# --------------------------------------------------------------------------- pure mapping


def test_a_postgres_insert_with_schema_decodes_decimal_date_and_units() -> None:
    event = map_change(pg_mapping(), pg_change("c", lsn=100, after=pg_row("SO-1")), pg_key("SO-1"))
    assert event is not None
    assert event["payload"] == {
        "order_id": "SO-1",
        "line_no": 1,
        "customer_id": "C-042",
        "product_sku": "STEEL-COIL",
        "quantity": 12.5,
        "unit": "kg",
        "unit_price": Decimal("19.99"),
        "currency": "CNY",
        "region": "华东",
    }
    assert event["occurred_at"] == datetime(2026, 11, 3, tzinfo=SHANGHAI)
    assert event["source"] == {
        "system": "debezium-postgres",
        "record_id": "SO-1/1",
        "operation": "create",
    }
    assert event["event_id"] == change_event_id(
        "acme", "public.sales_lines", "SO-1/1", "c", "lsn:100"
    )
    assert event["corrects"] == row_id("acme", "public.sales_lines", "SO-1/1")


def test_the_same_change_without_the_schema_part_needs_the_mapping_to_say_the_encoding() -> None:
    bare = decode(pg_change("c", lsn=100, after=pg_row("SO-1")))["payload"]
    # without a schema the decimal stays the base64 text Debezium wrote, which is no number
    with pytest.raises(MappingFailure) as caught:
        map_change(pg_mapping(), encode(bare))
    assert caught.value.field == "quantity"
    assert connect_decimal("12.500", 3) in caught.value.reason


def test_a_second_snapshot_of_an_unchanged_row_is_the_same_event() -> None:
    mapping = pg_mapping()
    first = map_change(mapping, pg_change("r", lsn=50, after=pg_row("SO-1")))
    again = map_change(mapping, pg_change("r", lsn=900, after=pg_row("SO-1")))  # re-snapshot
    changed = map_change(mapping, pg_change("r", lsn=900, after=pg_row("SO-1", qty="14.000")))
    assert first is not None and again is not None and changed is not None
    assert first["event_id"] == again["event_id"] != changed["event_id"]
    assert (
        first["corrects"] == changed["corrects"] == row_id("acme", "public.sales_lines", "SO-1/1")
    )


def test_updates_and_deletes_name_the_row_and_keep_their_id_on_redelivery() -> None:
    mapping = pg_mapping()
    origin = row_id("acme", "public.sales_lines", "SO-1/1")
    update = pg_change("u", lsn=200, before=None, after=pg_row("SO-1", qty="13.000"))
    first, again = map_change(mapping, update), map_change(mapping, update)
    assert first is not None and again is not None
    assert (
        first["event_id"]
        == again["event_id"]
        == change_event_id("acme", "public.sales_lines", "SO-1/1", "u", "lsn:200")
    )
    assert first["corrects"] == origin and first["source"]["operation"] == "update"
    assert first["payload"]["quantity"] == 13.0
    delete = map_change(mapping, pg_change("d", lsn=300, before=pg_row("SO-1"), after=None))
    assert delete is not None
    assert delete["corrects"] == origin and delete["source"]["operation"] == "delete"
    assert delete["event_id"] not in (origin, first["event_id"])
    assert delete["payload"]["quantity"] == 12.5


def test_a_delete_with_only_the_key_in_its_before_image_is_refused_with_the_fix() -> None:
    key_only = dict.fromkeys(pg_row("SO-1")) | {"order_no": "SO-1", "line_no": 1}
    with pytest.raises(Rejected, match="REPLICA IDENTITY FULL"):
        map_change(pg_mapping(), pg_change("d", lsn=300, before=key_only))


def test_tombstones_truncates_and_bad_messages() -> None:
    mapping = pg_mapping()
    assert map_change(mapping, b"") is None
    assert map_change(mapping, b"null") is None
    assert map_change(mapping, encode({"op": "t", "source": {"table": "sales_lines"}})) is None
    with pytest.raises(Rejected, match="not JSON"):
        map_change(mapping, b"{broken")
    with pytest.raises(Rejected, match="no `op`"):
        map_change(mapping, encode({"order_no": "SO-1"}))
    with pytest.raises(Rejected, match="unknown Debezium op 'x'"):
        map_change(mapping, encode({"op": "x", "source": {"table": "sales_lines"}}))
    with pytest.raises(Rejected, match=r"no mapping for table public\.invoices"):
        map_change(mapping, pg_change("c", lsn=1, after=pg_row("SO-1"), table="invoices"))


def test_without_record_id_columns_the_message_key_is_the_primary_key() -> None:
    mapping = pg_mapping()
    spec = mapping.tables["public.sales_lines"].model_copy(update={"record_id": []})
    keyless = mapping.model_copy(update={"tables": {"public.sales_lines": spec}})
    wrapped_key = encode(
        {"schema": {"type": "struct"}, "payload": {"order_no": "SO-9", "line_no": 1}}
    )
    event = map_change(keyless, pg_change("c", lsn=5, after=pg_row("SO-9")), wrapped_key)
    assert event is not None and event["source"]["record_id"] == "SO-9/1"
    with pytest.raises(Rejected, match="no primary key"):
        map_change(keyless, pg_change("c", lsn=5, after=pg_row("SO-9")), None)


def test_a_mysql_change_without_schema_uses_the_mapping_encodings() -> None:
    event = map_change(mysql_mapping(), mysql_change("c", pos=154, after=mysql_row("PO-7")))
    assert event is not None
    assert event["payload"] == {
        "po_id": "PO-7",
        "line_no": 1,
        "supplier_id": "V-311",
        "product_sku": "STEEL-HRC",
        "quantity": 25.0,
        "unit": "t",
        "unit_price": 612.5,
        "currency": "CNY",
        "promised_date": date(2026, 12, 1),
    }
    wall_clock = datetime(1970, 1, 1) + timedelta(milliseconds=1_762_164_000_000)
    assert event["occurred_at"] == wall_clock.replace(tzinfo=SHANGHAI)
    assert event["source"]["system"] == "debezium-mysql"


@pytest.mark.parametrize(
    ("schema", "value", "expected"),
    [
        ({"name": "io.debezium.time.Date"}, 20_395, date(2025, 11, 3)),
        ({"name": "org.apache.kafka.connect.data.Date"}, 0, date(1970, 1, 1)),
        (
            {"name": "io.debezium.time.MicroTimestamp"},
            1_762_156_800_000_001,
            datetime(2025, 11, 3, 8, 0, 0, 1),
        ),
        (
            {"name": "io.debezium.time.Timestamp"},
            1_762_156_800_250,
            datetime(2025, 11, 3, 8, 0, 0, 250_000),
        ),
        (
            {"name": "io.debezium.time.NanoTimestamp"},
            1_762_156_800_000_001_000,
            datetime(2025, 11, 3, 8, 0, 0, 1),
        ),
        (
            {"name": "io.debezium.time.ZonedTimestamp"},
            "2025-11-03T08:00:00Z",
            datetime(2025, 11, 3, 8, tzinfo=ZoneInfo("UTC")),
        ),
        ({"name": "io.debezium.time.MicroTime"}, 30_600_000_000, "08:30:00"),
        (
            {"name": "org.apache.kafka.connect.data.Decimal", "parameters": {"scale": "2"}},
            connect_decimal("-1234.56", 2),
            Decimal("-1234.56"),
        ),
        (
            {"name": "io.debezium.data.VariableScaleDecimal"},
            {"scale": 3, "value": connect_decimal("0.125", 3)},
            Decimal("0.125"),
        ),
        ({"type": "string"}, "plain", "plain"),
        ({"name": "io.debezium.time.Date"}, None, None),
    ],
)
def test_debezium_logical_types_decode(schema: dict[str, Any], value: Any, expected: Any) -> None:
    assert decode_column(value, schema) == expected


def test_the_postgres_stock_table_scales_units_and_reads_micro_timestamps() -> None:
    after = {
        "plant": "P1",
        "material": "COIL",
        "qty_t": 1.5,
        "reserved_t": None,
        "counted_at": 1_762_156_800_000_000,
    }
    change = {
        "before": None,
        "after": after,
        "source": {"connector": "postgresql", "schema": "public", "table": "stock", "lsn": 77},
        "op": "c",
        "ts_ms": 1,
    }
    schema = {
        "fields": [
            {
                "field": "after",
                "fields": [{"field": "counted_at", "name": "io.debezium.time.MicroTimestamp"}],
            }
        ]
    }
    event = map_change(pg_mapping(), encode({"schema": schema, "payload": change}))
    assert event is not None and event["type"] == "inventory_level"
    assert event["payload"] == {
        "site_id": "P1",
        "product_sku": "COIL",
        "on_hand": 1500.0,
        "unit": "kg",
    }
    assert event["occurred_at"] == datetime(2025, 11, 3, 8, tzinfo=SHANGHAI)


class FakeRecord:
    """Only the attributes map_changes reads (topic coordinates are checked in the Kafka tests)."""

    def __init__(self, offset: int, value: bytes | None, key: bytes | None = None) -> None:
        self.offset, self.value, self.key = offset, value, key


def test_a_batch_splits_into_accepted_and_refused_with_reasons_by_offset() -> None:
    bad_price = pg_row("SO-3", price_cents=-5)
    records = [
        FakeRecord(10, pg_change("c", lsn=10, after=pg_row("SO-1"))),
        FakeRecord(11, None),  # tombstone
        FakeRecord(12, pg_change("c", lsn=12, after=bad_price)),
        FakeRecord(13, b"{broken"),
    ]
    intake = map_changes(pg_mapping(), records)
    assert [decode(e)["source"]["record_id"] for e in intake.accepted] == ["SO-1/1"]
    refused = {r.index: r for r in intake.refused}
    assert set(refused) == {12, 13}
    assert {e.field for e in refused[12].errors} == {"payload.unit_price"}
    assert refused[13].original == b"{broken"


def test_changes_dated_ahead_of_now_or_before_2000_are_refused_and_snapshot_history_is_not() -> (
    None
):
    def dated(order: str, day: date) -> dict[str, Any]:
        return {**pg_row(order), "order_date": days(day)}

    ahead = datetime.now(UTC).date() + timedelta(days=2)
    records = [
        FakeRecord(20, pg_change("r", lsn=20, after=dated("SO-1", date(2005, 3, 1)))),
        FakeRecord(21, pg_change("c", lsn=21, after=dated("SO-2", ahead))),
        FakeRecord(22, pg_change("r", lsn=22, after=dated("SO-3", date(1999, 12, 31)))),
        FakeRecord(23, pg_change("c", lsn=23, after=dated("SO-4", date(9999, 12, 31)))),
    ]
    intake = map_changes(pg_mapping(), records)
    assert [decode(e)["source"]["record_id"] for e in intake.accepted] == ["SO-1/1"]
    assert {r.index: [e.field for e in r.errors] for r in intake.refused} == {
        21: ["occurred_at"],
        22: ["occurred_at"],
        23: ["occurred_at"],
    }


# --------------------------------------------------------------------------- against the real Kafka


async def mark_end(settings: XietongSettings, topic: str) -> dict[TopicPartition, int]:
    """The current end offsets of ``topic``: later reads see only what comes after."""
    await ensure_topics(settings, [topic])
    async with started(create_producer(settings)) as producer:
        partitions = await producer.partitions_for(topic)
    async with started(create_consumer(settings, None)) as consumer:
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        return dict(await consumer.end_offsets(tps))


async def read_tenant(
    settings: XietongSettings, marks: dict[TopicPartition, int], tenant: str, count: int
) -> list[dict[str, Any]]:
    """Records keyed by ``tenant`` after ``marks``, until ``count`` arrived (fails after 60 s)."""
    found: list[dict[str, Any]] = []
    async with started(create_consumer(settings, None)) as consumer:
        consumer.assign(list(marks))
        for tp, offset in marks.items():
            consumer.seek(tp, offset)
        async with asyncio.timeout(60):
            while len(found) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    found += [decode(r.value) for r in records if r.key == tenant.encode()]
        extra = await consumer.getmany(timeout_ms=500)  # nothing more than expected
        found += [decode(r.value) for rs in extra.values() for r in rs if r.key == tenant.encode()]
    return found


async def produce(
    settings: XietongSettings, topic: str, records: list[tuple[bytes | None, bytes | None]]
) -> None:
    async with started(create_producer(settings)) as producer:
        for key, value in records:  # in order: a test, not a hot path
            await producer.send_and_wait(topic, value, key=key)


async def run_until(
    settings: XietongSettings,
    mapping: Mapping,
    group: str,
    marks: dict[TopicPartition, int],
    dlq_marks: dict[TopicPartition, int],
    events: int,
    letters: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_cdc(settings, mapping, stop, group=group))
    try:
        raw = await read_tenant(settings, marks, mapping.tenant, events)
        dead = await read_tenant(settings, dlq_marks, mapping.tenant, letters) if letters else []
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    return raw, dead


@pytest.mark.integration
async def test_postgres_changes_come_out_on_the_raw_topic_as_events_and_corrections(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    topic = unique_name("erp.public.sales_lines")
    mapping = pg_mapping(tenant, topic)
    await ensure_topics(settings, [topic])
    marks, dlq_marks = (
        await mark_end(settings, EVENTS_RAW),
        await mark_end(settings, dlq(EVENTS_RAW)),
    )
    update = pg_change("u", lsn=200, after=pg_row("SO-1", qty="13.000"))
    await produce(
        settings,
        topic,
        [
            (pg_key("SO-2"), pg_change("r", lsn=50, after=pg_row("SO-2"))),
            (pg_key("SO-1"), pg_change("c", lsn=100, after=pg_row("SO-1"))),
            (pg_key("SO-1"), update),
            (pg_key("SO-1"), update),  # Debezium re-delivers after a connector restart
            (pg_key("SO-1"), pg_change("d", lsn=300, before=pg_row("SO-1", qty="13.000"))),
            (pg_key("SO-1"), None),  # the tombstone after the delete
            (pg_key("SO-1"), pg_change("c", lsn=350, after=pg_row("SO-1", qty="20.000"))),
            (pg_key("SO-3"), pg_change("c", lsn=400, after=pg_row("SO-3", price_cents=-1))),
        ],
    )
    raw, dead = await run_until(
        settings, mapping, unique_name("ingest-cdc"), marks, dlq_marks, 6, 1
    )

    assert len(raw) == 6
    by_op: dict[str, list[dict[str, Any]]] = {}
    for event in raw:
        assert event["tenant"] == tenant and event["type"] == "sales_order_line"
        assert event["source"]["system"] == "debezium-postgres"
        by_op.setdefault(event["source"]["operation"], []).append(event)
    (snapshot,), (create, again), updates, (delete,) = (
        by_op["snapshot"],
        by_op["create"],
        by_op["update"],
        by_op["delete"],
    )
    row = str(row_id(tenant, "public.sales_lines", "SO-1/1"))
    assert snapshot["source"]["record_id"] == "SO-2/1"
    assert snapshot["corrects"] == str(row_id(tenant, "public.sales_lines", "SO-2/1"))
    assert create["corrects"] == row != create["event_id"]
    assert create["payload"]["quantity"] == 12.5 and create["payload"]["unit_price"] == "19.99"
    assert create["payload"]["currency"] == "CNY" and create["payload"]["unit"] == "kg"
    assert datetime.fromisoformat(create["occurred_at"]) == datetime(2026, 11, 3, tzinfo=SHANGHAI)
    assert len(updates) == 2 and updates[0] == updates[1]  # same change twice: same event id
    assert updates[0]["corrects"] == row != updates[0]["event_id"]
    assert updates[0]["payload"]["quantity"] == 13.0
    assert delete["corrects"] == row and delete["payload"]["quantity"] == 13.0
    # inserted again after the delete: a new change of the same row, not a duplicate
    assert again["corrects"] == row and again["event_id"] != create["event_id"]
    assert again["payload"]["quantity"] == 20.0

    (letter,) = dead
    assert letter["service"] == "ingest" and letter["source_ref"].startswith(f"{topic}[")
    assert [e["field"] for e in letter["errors"]] == ["payload.unit_price"]
    assert decode(letter["original"])["payload"]["after"]["order_no"] == "SO-3"


@pytest.mark.integration
async def test_mysql_changes_without_schema_come_out_with_decoded_values(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    tenant = f"bolt-{uuid.uuid4().hex[:8]}"
    topic = unique_name("erp.erp.po_lines")
    mapping = mysql_mapping(tenant, topic)
    await ensure_topics(settings, [topic])
    marks, dlq_marks = (
        await mark_end(settings, EVENTS_RAW),
        await mark_end(settings, dlq(EVENTS_RAW)),
    )
    key = encode({"po_number": "PO-7", "line": 1})
    await produce(
        settings,
        topic,
        [
            (key, mysql_change("c", pos=154, after=mysql_row("PO-7"))),
            (
                key,
                mysql_change(
                    "u", pos=980, before=mysql_row("PO-7"), after=mysql_row("PO-7", qty="30.00")
                ),
            ),
        ],
    )
    raw, _ = await run_until(settings, mapping, unique_name("ingest-cdc"), marks, dlq_marks, 2, 0)

    create, update = sorted(raw, key=lambda e: e["source"]["operation"])
    assert create["source"] == {
        "system": "debezium-mysql",
        "record_id": "PO-7/1",
        "operation": "create",
    }
    assert create["payload"]["quantity"] == 25.0 and create["payload"]["unit_price"] == "612.5"
    assert create["payload"]["unit"] == "t" and create["payload"]["promised_date"] == "2026-12-01"
    assert update["corrects"] == create["corrects"] != create["event_id"]
    assert update["payload"]["quantity"] == 30.0
    wall_clock = datetime(1970, 1, 1) + timedelta(milliseconds=1_762_164_000_000)
    assert datetime.fromisoformat(create["occurred_at"]) == wall_clock.replace(tzinfo=SHANGHAI)


def test_a_20_digit_decimal_stays_exact_through_cdc_raw_and_clean(tmp_path: Path) -> None:
    """Debezium -> the raw record the connector publishes -> the clean event: every digit kept
    (the old path turned the Decimal into a float: 12345678901234567000.0)."""
    from aiokafka import ConsumerRecord

    from services.clean.handlers import CleanRules, CleanState, clean_batch
    from services.ingest.intake import Incoming, validate_records

    change = pg_change("c", lsn=9, after=pg_row("SO-9", qty="2.000", price_cents=7))
    huge = change.replace(b'"price_cents":7,', b'"price_cents":1234567890123456789012,')
    event = map_change(pg_mapping(), huge, pg_key("SO-9"))
    assert event is not None
    assert event["payload"]["unit_price"] == Decimal("12345678901234567890.12")
    received = datetime(2026, 11, 3, 12, tzinfo=UTC)
    intake = validate_records([Incoming(0, b"", event)], "acme", received_at=received)
    (raw,) = intake.accepted
    assert decode(raw)["payload"]["unit_price"] == "12345678901234567890.12"

    record = ConsumerRecord(EVENTS_RAW, 0, 0, 0, 0, b"acme", bytes(raw), None, 0, 0, [])
    state = CleanState(CleanRules(), tmp_path, partitions=1)
    try:
        (out,) = clean_batch([record], state).clean[0]
    finally:
        state.close()
    clean = decode(out.value)
    assert clean["payload"]["unit_price"] == "12345678901234567890.12"
    assert clean["amounts"]["sales.amount_cny"] == "24691357802469135780.24"
