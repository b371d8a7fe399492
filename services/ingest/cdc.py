"""CDC connector: Debezium change events from an ERP database -> Xietong events.

Consumes the Kafka topics that Debezium's PostgreSQL or MySQL connector writes (one per table,
e.g. ``erp.public.sales_lines``), named in the tenant's mapping file (:mod:`.mapping`). Both value
shapes are read: the bare change event ``{before, after, op, source, ts_ms}`` and the JsonConverter
form with ``schemas.enable=true`` (``{"schema": ..., "payload": {...}}``), whose schema part says
how special types are encoded: dates as days since the epoch, timestamps as milli/micro/nanoseconds,
``org.apache.kafka.connect.data.Decimal`` as base64 bytes with the scale in the schema. Tombstones
(null values, written after deletes for log compaction) are skipped.

Produces ``events.raw.v1`` (key: tenant) and refused records to ``events.raw.v1.dlq`` with the
original change event, the reason and ``source_ref = "<topic>[<partition>]#<offset>"``.

Identity and corrections, computed without any state:

- every change gets ``event_id = uuid5(tenant, table, primary key, op, log position)``
  (PostgreSQL ``lsn``, MySQL binlog ``file:pos:row``, else the commit ``ts_ms``): one id per
  change, the same when Debezium delivers it again. A snapshot read (``op=r``) has the digest of
  its row image in place of the position: a second snapshot (a connector restarted mid-snapshot,
  ``snapshot.mode=always``) of an unchanged row is the same event, one of a changed row is new;
- every change names its row in ``corrects``: the *row id* ``uuid5(tenant, table, primary key)``
  (:func:`row_id`). Analytics keeps one row per row id: a create or snapshot read puts it in,
  an update replaces it, a delete takes it out; a delete carries the ``before`` image
  (PostgreSQL needs ``REPLICA IDENTITY FULL`` on the table for it to hold more than the key).

So a change Debezium delivers twice is the same event both times, and the clean service's
``event_id`` de-duplication drops the second; a row deleted and inserted again with the same key
is a new change (another log position), so it counts again. A row first seen as a create and
read again by a later snapshot gets two ids (no state remembers the create): the snapshot is
one more change of the row, counted in the window of its event time like any change.

Delivery: at least once. ``getmany`` -> map the whole batch -> one publish of accepted and refused
records, awaited together (``acks=all``) -> commit (consumer group ``ingest-cdc`` unless the
mapping names another). A crash before the commit re-reads the batch; the ids make that harmless.

Run::

    python -m services.ingest.cdc --mapping deploy/mappings/acme-erp-postgres.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import orjson
from aiokafka import ConsumerRecord

from schemas.events import DEFAULT_EVENT_TIME, EventTimeBounds, decode_exact
from schemas.insights import FieldError
from schemas.topics import EVENTS_RAW, dlq
from services.ingest.intake import Incoming, Intake, Refused, publish_intake, validate_records
from services.ingest.mapping import (
    Mapping,
    MappingError,
    MappingFailure,
    TableMapping,
    decode_connect_decimal,
    from_epoch,
    load_mapping,
)
from shared.codec import DecodeError, decode
from shared.kafka import (
    Batch,
    BatchPublisher,
    create_consumer,
    create_producer,
    ensure_topics,
    run_batch_loop,
    started,
    stop_on_signals,
)
from shared.logs import configure_logging
from shared.settings import XietongSettings, load_settings

log = logging.getLogger(__name__)

CDC_NAMESPACE = uuid.UUID("6f1c2b8e-3d4a-5b6c-9d8e-7f6a5b4c3d2e")
"""Namespace of the deterministic event ids of change events (never change it)."""

OPERATIONS = {"c": "create", "u": "update", "d": "delete", "r": "snapshot"}
SYSTEMS = {"postgresql": "debezium-postgres", "mysql": "debezium-mysql"}

_TIMESTAMP_UNITS = {
    "io.debezium.time.Timestamp": "millis",
    "org.apache.kafka.connect.data.Timestamp": "millis",
    "io.debezium.time.MicroTimestamp": "micros",
    "io.debezium.time.NanoTimestamp": "nanos",
}
_TIME_UNITS = {
    "io.debezium.time.Time": 1_000,
    "org.apache.kafka.connect.data.Time": 1_000,
    "io.debezium.time.MicroTime": 1_000_000,
    "io.debezium.time.NanoTime": 1_000_000_000,
}
_DATES = {"io.debezium.time.Date", "org.apache.kafka.connect.data.Date"}


class Rejected(ValueError):
    """A change event that cannot become a Xietong event (goes to the dead-letter topic)."""

    def __init__(self, reason: str, field: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


# --------------------------------------------------------------------------- Debezium decoding


def unwrap(message: Any) -> tuple[Any, dict[str, Any] | None]:
    """Split a JsonConverter message into (payload, schema); a bare message has no schema."""
    if isinstance(message, dict) and set(message) == {"schema", "payload"}:
        schema = message["schema"]
        return message["payload"], schema if isinstance(schema, dict) else None
    return message, None


def row_schemas(envelope_schema: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Column name -> Connect field schema, from the ``after`` (or ``before``) struct."""
    if not envelope_schema:
        return {}
    columns: dict[str, dict[str, Any]] = {}
    for part in envelope_schema.get("fields", ()):
        if isinstance(part, dict) and part.get("field") in ("before", "after"):
            for column in part.get("fields", ()):
                if isinstance(column, dict) and "field" in column:
                    columns.setdefault(column["field"], column)
    return columns


def decode_column(value: Any, schema: dict[str, Any] | None) -> Any:
    """One column value as Python, following its Connect schema's logical type name."""
    if value is None or not schema:
        return value
    name = schema.get("name")
    if name == "org.apache.kafka.connect.data.Decimal":
        scale = int((schema.get("parameters") or {}).get("scale", 0))
        return decode_connect_decimal(value, scale) if isinstance(value, str) else Decimal(value)
    if name == "io.debezium.data.VariableScaleDecimal" and isinstance(value, dict):
        return decode_connect_decimal(value["value"], int(value["scale"]))
    if name in _DATES and isinstance(value, int):
        return from_epoch(value, "days")
    unit = _TIMESTAMP_UNITS.get(name or "")
    if unit is not None and isinstance(value, int):
        return from_epoch(value, unit)
    per_second = _TIME_UNITS.get(name or "")
    if per_second is not None and isinstance(value, int):
        moment = datetime(1970, 1, 1) + timedelta(microseconds=value * 1_000_000 // per_second)
        return time(moment.hour, moment.minute, moment.second, moment.microsecond).isoformat()
    if name == "io.debezium.time.ZonedTimestamp" and isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value


def decode_row(row: Any, schemas: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    if row is None:
        return None
    if not isinstance(row, dict):
        raise Rejected("a row image must be a JSON object")
    if not schemas:
        return row
    try:
        return {column: decode_column(value, schemas.get(column)) for column, value in row.items()}
    except (ValueError, TypeError, KeyError) as error:
        raise Rejected(f"cannot decode a column: {error}") from None


def position_of(source: dict[str, Any], ts_ms: Any) -> str:
    """Where the change sits in the database log: unique per change of one row."""
    if source.get("lsn") is not None:
        return f"lsn:{source['lsn']}"
    if source.get("file") is not None and source.get("pos") is not None:
        return f"binlog:{source['file']}:{source['pos']}:{source.get('row', 0)}"
    for key in ("ts_ns", "ts_us", "ts_ms"):
        if source.get(key) is not None:
            return f"{key}:{source[key]}"
    return f"ts_ms:{ts_ms}"


def snapshot_position(image: Any) -> str:
    """A snapshot read's stand-in for a log position: the digest of its row image as sent."""
    digest = hashlib.sha256(orjson.dumps(image, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"row:{digest[:32]}"


def row_id(tenant: str, table: str, key: str) -> uuid.UUID:
    """The id every change of a row names in ``corrects`` (never an event's own id)."""
    return uuid.uuid5(CDC_NAMESPACE, f"{tenant}\x1f{table}\x1f{key}")


def change_event_id(tenant: str, table: str, key: str, op: str, position: str) -> uuid.UUID:
    """The event id of one change of a row: the same on re-delivery."""
    return uuid.uuid5(CDC_NAMESPACE, f"{tenant}\x1f{table}\x1f{key}\x1f{op}\x1f{position}")


def _key_from_message_key(raw_key: bytes | None) -> str | None:
    """Debezium's message key is the primary-key struct: its values joined with '/'."""
    if not raw_key:
        return None
    try:
        key, _ = unwrap(decode(raw_key))
    except DecodeError:
        return None
    if isinstance(key, dict) and key:
        return "/".join(str(value) for value in key.values())
    return None


def _millis(value: Any) -> datetime | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(value / 1000, UTC)
    return None


# --------------------------------------------------------------------------- mapping


def map_change(
    mapping: Mapping, value: bytes, raw_key: bytes | None = None
) -> dict[str, Any] | None:
    """One Debezium message -> the Xietong event (a dict, not yet validated).

    None for messages that carry no row change (tombstones, truncates, logical messages);
    :class:`Rejected` or :class:`~.mapping.MappingFailure` when the change cannot be mapped.
    """
    if not value:
        return None
    try:
        change, schema = unwrap(decode_exact(value))  # a decimal in "double" mode: exactly
    except ValueError as error:
        raise Rejected(f"not JSON: {error}") from None
    if change is None:
        return None
    if not isinstance(change, dict) or "op" not in change:
        raise Rejected("not a Debezium change event (no `op`)", "op")
    op = change["op"]
    if op in ("t", "m"):  # a truncate or a logical decoding message: no row to map
        log.warning("skipping Debezium op %r (no row change)", op)
        return None
    operation = OPERATIONS.get(op)
    if operation is None:
        raise Rejected(f"unknown Debezium op {op!r}", "op")
    source = change.get("source") or {}
    if not isinstance(source, dict) or not source.get("table"):
        raise Rejected("the change event names no source table", "source.table")
    namespace = source.get("schema") or source.get("db")
    table = str(source["table"])
    spec = mapping.table(namespace, table)
    if spec is None:
        raise Rejected(f"no mapping for table {namespace}.{table}", "source.table")
    schemas = row_schemas(schema)
    row = decode_row(change.get("before") if op == "d" else change.get("after"), schemas)
    if row is None:
        image = "before" if op == "d" else "after"
        raise Rejected(f"op {op!r} without its `{image}` image", image)
    if op == "d":
        _check_delete_image(spec, row)
    key = spec.record_id_of(row) or _key_from_message_key(raw_key)
    if key is None:
        raise Rejected(
            "no primary key: set `record_id` in the mapping or keep Debezium's message key",
            "source.record_id",
        )
    qualified = f"{namespace}.{table}" if namespace else table
    position = (
        snapshot_position(change.get("after"))
        if op == "r"
        else position_of(source, change.get("ts_ms"))
    )
    event_id = change_event_id(mapping.tenant, qualified, key, op, position)
    occurred_at = (
        spec.occurred_at_of(row) or _millis(source.get("ts_ms")) or _millis(change.get("ts_ms"))
    )
    if occurred_at is None:
        raise Rejected("no event time: map `occurred_at` or keep Debezium's ts_ms", "occurred_at")
    connector = str(source.get("connector") or "")
    system = mapping.source_system or SYSTEMS.get(
        connector, f"debezium-{connector}" if connector else "debezium"
    )
    return {
        "event_id": event_id,
        "tenant": mapping.tenant,
        "type": spec.event_type,
        "schema_version": spec.version,
        "occurred_at": occurred_at,
        "source": {"system": system, "record_id": key, "operation": operation},
        "corrects": row_id(mapping.tenant, qualified, key),
        "payload": spec.payload_of(row),
    }


def _check_delete_image(spec: TableMapping, row: dict[str, Any]) -> None:
    columns = [
        f.column
        for f in spec.fields.values()
        if f.column is not None and f.column not in spec.record_id
    ]
    if columns and all(row.get(column) is None for column in columns):
        raise Rejected(
            "the delete's `before` image holds only the key; PostgreSQL needs "
            "`ALTER TABLE ... REPLICA IDENTITY FULL` for deletes to be published",
            "before",
        )


def map_changes(
    mapping: Mapping,
    records: Sequence[ConsumerRecord[bytes, bytes]],
    bounds: EventTimeBounds = DEFAULT_EVENT_TIME,
) -> Intake:
    """Map and validate the records of one partition, as received now; refused ones are
    indexed by offset."""
    incoming: list[Incoming] = []
    refused: list[Refused] = []
    for record in records:
        original = record.value or b""
        try:
            event = map_change(mapping, record.value, record.key)
        except Rejected as error:
            refused.append(
                Refused(
                    record.offset,
                    [FieldError(field=error.field, reason=error.reason)],
                    original,
                    error.reason,
                )
            )
            continue
        except MappingFailure as error:
            reason = f"cannot map: {error}"
            refused.append(
                Refused(
                    record.offset,
                    [FieldError(field=error.field, reason=error.reason)],
                    original,
                    reason,
                )
            )
            continue
        if event is not None:
            incoming.append(Incoming(record.offset, original, event))
    intake = validate_records(incoming, mapping.tenant, source_system="debezium", bounds=bounds)
    intake.refused.extend(refused)
    return intake


async def publish_changes(
    publisher: BatchPublisher,
    mapping: Mapping,
    batch: Batch,
    bounds: EventTimeBounds = DEFAULT_EVENT_TIME,
) -> Intake:
    """Map a whole ``getmany`` batch and publish it; returns when Kafka acknowledged all of it."""
    intakes = {tp: map_changes(mapping, records, bounds) for tp, records in batch.items()}
    await asyncio.gather(
        *(
            publish_intake(
                publisher, intake, mapping.tenant, source_ref=f"{tp.topic}[{tp.partition}]"
            )
            for tp, intake in intakes.items()
        )
    )
    total = Intake()
    for intake in intakes.values():
        total.accepted += intake.accepted
        total.refused += intake.refused
    return total


async def run_cdc(
    settings: XietongSettings, mapping: Mapping, stop: asyncio.Event, *, group: str | None = None
) -> None:
    """Consume the mapping's topics until ``stop`` is set (then finish the batch and commit)."""
    if not mapping.topics:
        raise MappingError("the mapping names no `topics` to consume")
    await ensure_topics(settings, [EVENTS_RAW, dlq(EVENTS_RAW)])
    consumer = create_consumer(settings, group or mapping.consumer_group, *mapping.topics)
    async with started(create_producer(settings)) as producer, started(consumer):
        publisher = BatchPublisher(producer)
        bounds = settings.event_time_bounds()

        async def handle(batch: Batch) -> None:
            outcome = await publish_changes(publisher, mapping, batch, bounds)
            log.info(
                "published changes",
                extra={"accepted": len(outcome.accepted), "refused": len(outcome.refused)},
            )

        await run_batch_loop(
            consumer,
            handle,
            stop,
            max_records=settings.kafka_fetch_max_records,
            timeout_ms=settings.kafka_fetch_timeout_ms,
        )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m services.ingest.cdc --mapping FILE [--group G]``."""
    parser = argparse.ArgumentParser(
        prog="python -m services.ingest.cdc",
        description="Publish Debezium change events as Xietong events (settings: XIETONG_* env).",
    )
    parser.add_argument("--mapping", required=True, help="the tenant's mapping file (YAML)")
    parser.add_argument("--group", help="consumer group (default: the mapping's, ingest-cdc)")
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging("ingest-cdc", settings.log_level, settings.log_format)
    try:
        mapping = load_mapping(args.mapping)
    except MappingError as error:
        parser.exit(2, f"{error}\n")

    async def run() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await run_cdc(settings, mapping, stop, group=args.group)

    asyncio.run(run())


if __name__ == "__main__":
    main()
