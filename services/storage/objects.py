"""Archive objects: Parquet bytes of a group of records, their manifest, and where they live.

An object holds one ``(tenant, date)`` group of one flushed segment
(:mod:`services.storage.segments`) as Parquet (pyarrow): each record's offset, timestamp, key,
value bytes (exactly as they were on the topic, so a replay restores them bit for bit),
headers, and the columns a reader filters on (tenant, kind, schema version, time). Its manifest,
``<same name>.manifest.json`` beside it, says what it must contain: the offsets, the record
count, a checksum of the records and one of the object's bytes, the schema versions, the labels
and the placement rule that chose its store. The manifest is written after the object: an
object without one is not (yet) part of the archive, and an object whose bytes do not match its
manifest is refused (:class:`ArchiveMismatch`), never read as if it were right.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from datetime import datetime
from operator import attrgetter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from services.storage.segments import ArchivedRecord

SCHEMA = pa.schema(
    [
        ("offset", pa.int64()),
        ("timestamp_ms", pa.int64()),
        ("key", pa.binary()),
        ("value", pa.binary()),
        ("headers", pa.list_(pa.struct([("key", pa.string()), ("value", pa.binary())]))),
        ("tenant", pa.string()),
        ("kind", pa.string()),
        ("schema_version", pa.int32()),
        ("at_ms", pa.int64()),
        ("visibility", pa.string()),
    ]
)


class ArchiveMismatch(ValueError):
    """An archive object that does not match its manifest."""


class Manifest(BaseModel):
    """What an archive object must contain, and why it is in the store it is in."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str = Field(description="Object key of the Parquet file.")
    topic: str
    partition: int = Field(ge=0)
    tenant: str
    date: str = Field(description="YYYY-MM-DD of the records' event time (or window start).")
    lane: str = Field(description="current or late (records dated before the partition's newest).")
    first_offset: int = Field(ge=0)
    last_offset: int = Field(ge=0)
    offsets: list[list[int]] = Field(description="Inclusive [first, last] runs of offsets held.")
    record_count: int = Field(ge=0)
    records_sha256: str = Field(description="Checksum of the records (offsets, keys, values...).")
    object_sha256: str = Field(description="Checksum of the Parquet bytes.")
    object_bytes: int = Field(ge=0)
    schema_versions: dict[str, list[int]] = Field(description="Kind -> schema versions held.")
    kinds: list[str]
    min_at_ms: int
    max_at_ms: int
    labels: dict[str, str] = Field(description="sensitivity, residency, tenant, kind.")
    store: str = Field(description="public or private.")
    rule: str = Field(description="The placement rule that chose the store.")
    written_at: AwareDatetime


def object_key(topic: str, tenant: str, date: str, partition: int, first_offset: int) -> str:
    """``<topic>/tenant=<t>/date=<d>/partition=<p>/<first offset>.parquet`` (offset zero-padded
    so names sort by offset)."""
    return f"{topic}/tenant={tenant}/date={date}/partition={partition}/{first_offset:020d}.parquet"


def manifest_key(key: str) -> str:
    return key.removesuffix(".parquet") + ".manifest.json"


def offset_runs(offsets: Sequence[int] | np.ndarray[Any, Any]) -> Iterator[tuple[int, int]]:
    """Inclusive ``(first, last)`` runs of consecutive offsets, in the order given.

    An iterator: the manifest makes its own list of each run, and a group whose tenant shares
    its partition with others has about one run per record, so building them twice (tracked
    objects that outlive a young collection) made the planning of such a segment pay for a full
    garbage collection."""
    array = np.asarray(offsets, dtype=np.int64)
    if not len(array):
        return iter(())
    breaks = np.flatnonzero(np.diff(array) != 1) + 1
    firsts = array[np.concatenate(([0], breaks))].tolist()
    lasts = array[np.concatenate((breaks - 1, [len(array) - 1]))].tolist()
    return zip(firsts, lasts, strict=True)


# --------------------------------------------------------------------------- records <-> table

_HEADERS = SCHEMA.field("headers").type
_NO_HEADERS = pa.array([], _HEADERS.value_type)
_REPEATING = frozenset(("key", "tenant", "kind", "schema_version", "visibility"))
"""Columns whose value is often the same in every row of a group (its tenant, mostly its key,
kind and visibility): converted once rather than once per row."""


def records_table(records: Sequence[ArchivedRecord]) -> pa.Table:
    """The Arrow table of a group of records: one row per record, one column per field of
    :class:`ArchivedRecord` (of the same name, in the same order)."""
    arrays = []
    for name in SCHEMA.names:
        if name == "headers":
            arrays.append(_headers_column(records))
            continue
        values, kind = list(map(attrgetter(name), records)), SCHEMA.field(name).type
        if name in _REPEATING and values and values.count(values[0]) == len(values):
            arrays.append(pa.repeat(pa.scalar(values[0], kind), len(values)))
        else:
            arrays.append(pa.array(values, kind))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _headers_column(records: Sequence[ArchivedRecord]) -> pa.Array:
    if not any(r.headers for r in records):
        return pa.ListArray.from_arrays(pa.array(np.zeros(len(records) + 1, np.int32)), _NO_HEADERS)
    return pa.array([[{"key": k, "value": v} for k, v in r.headers] for r in records], _HEADERS)


def table_records(table: pa.Table) -> list[ArchivedRecord]:
    """The records of a table made by :func:`records_table` (or read from its Parquet)."""
    count = table.num_rows
    columns: list[list[Any]] = []
    for name in SCHEMA.names:
        column = table.column(name)
        if name == "headers":
            columns.append(_header_tuples(column.combine_chunks(), count))
        elif name in _REPEATING and count and len(unique := pc.unique(column)) == 1:
            columns.append([unique[0].as_py()] * count)  # one value object for every row
        else:
            columns.append(column.to_pylist())
    # the columns are in the order of ArchivedRecord's fields
    return [ArchivedRecord(*row) for row in zip(*columns, strict=True)]


def _header_tuples(headers: pa.ListArray, count: int) -> list[tuple[tuple[str, bytes], ...]]:
    if not count or not pc.max(pc.list_value_length(headers)).as_py():
        return [()] * count
    items = headers.flatten()  # of the rows' lists, without the lists of null rows
    pairs = list(zip(items.field("key").to_pylist(), items.field("value").to_pylist(), strict=True))
    lengths = pc.fill_null(pc.list_value_length(headers), 0).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths).tolist()
    return [
        tuple(pairs[end - length : end]) for end, length in zip(ends, lengths.tolist(), strict=True)
    ]


# --------------------------------------------------------------------------- the checksum

_RECORD_HEAD = np.dtype(
    [("offset", ">i8"), ("timestamp_ms", ">i8"), ("key", ">i4"), ("value", ">i4")]
)
_HEADER_HEAD = np.dtype([("name", ">i4"), ("value", ">i4")])


def records_checksum(table: pa.Table) -> str:
    """The records' checksum (the manifest's ``records_sha256``): what replay restores.

    The SHA-256 of, for each record in offset order: its offset and timestamp (8 bytes each),
    the length of its key (-1 for none) and of its value (4 bytes each), all big-endian signed;
    its key (nothing for none) and value; then for each of its headers the lengths of the
    header's UTF-8 name and of its value (4 bytes each, big-endian signed), the name and the
    value. Computed from the Arrow columns (the bytes of each record joined by
    ``binary_join_element_wise``, then hashed as one run), not record by record."""
    count = table.num_rows
    key, value = table.column("key"), table.column("value")
    head = np.empty(count, _RECORD_HEAD)
    head["offset"] = table.column("offset").to_numpy()
    head["timestamp_ms"] = table.column("timestamp_ms").to_numpy()
    head["key"] = _lengths(key)
    head["value"] = _lengths(value)
    parts = [_fixed_width(head), pc.fill_null(key, b""), value]
    headers = table.column("headers").combine_chunks()
    if count and pc.max(pc.list_value_length(headers)).as_py():
        items = headers.flatten()
        names, values = items.field("key").cast(pa.binary()), items.field("value")
        lengths = np.empty(len(items), _HEADER_HEAD)
        lengths["name"], lengths["value"] = _lengths(names), _lengths(values)
        each = pc.binary_join_element_wise(_fixed_width(lengths), names, values, b"")
        offsets = pc.subtract(headers.offsets, headers.offsets[0])  # flatten() starts there
        parts.append(pc.binary_join(pa.ListArray.from_arrays(offsets, each), b""))
    digest = hashlib.sha256()
    joined = pc.binary_join_element_wise(*parts, b"")
    for chunk in joined.chunks if isinstance(joined, pa.ChunkedArray) else [joined]:
        if len(chunk):
            offsets = chunk.buffers()[1]
            first, last = np.frombuffer(offsets, np.int32, len(chunk) + 1, chunk.offset * 4)[
                [0, -1]
            ]
            digest.update(memoryview(chunk.buffers()[2])[first:last])
    return digest.hexdigest()


def _lengths(array: pa.ChunkedArray | pa.Array) -> Any:
    """Byte lengths of a binary column, -1 for a null."""
    return pc.fill_null(pc.binary_length(array), -1).to_numpy(zero_copy_only=False)


def _fixed_width(rows: Any) -> pa.Array:
    """A numpy structured array's rows as binary values (its bytes, no copy until joined)."""
    width = rows.dtype.itemsize
    fixed = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(width), len(rows), [None, pa.py_buffer(rows)]
    )
    return fixed.cast(pa.binary())


# --------------------------------------------------------------------------- Parquet


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        # zstd: JSON values compress ~5-10x at a cost the archive keeps up with.
        compression="zstd",
        compression_level=1,
        # Dictionaries and statistics only where they serve: the record bytes are unique (a
        # dictionary of them would be built and thrown away) and nobody filters on their range.
        use_dictionary=_DICTIONARY_COLUMNS,
        write_statistics=_STATISTICS_COLUMNS,
    )
    return bytes(sink.getvalue())


_DICTIONARY_COLUMNS = ["tenant", "kind", "schema_version", "visibility"]
_STATISTICS_COLUMNS = [name for name in SCHEMA.names if name not in ("key", "value", "headers")]


def read_parquet(data: bytes) -> pa.Table:
    """An archive object's table, in :data:`SCHEMA`; ``pa.ArrowException`` or ``KeyError`` when
    it is not one."""
    # ParquetFile rather than read_table: half the fixed cost (no dataset), paid per object
    table = pq.ParquetFile(pa.BufferReader(data)).read(columns=SCHEMA.names)
    return table if table.schema.equals(SCHEMA) else table.select(SCHEMA.names).cast(SCHEMA)


def build_object(
    topic: str,
    partition: int,
    lane: str,
    records: Sequence[ArchivedRecord],
    *,
    labels: dict[str, str],
    store: str,
    rule: str,
    written_at: datetime,
) -> tuple[bytes, Manifest]:
    """The Parquet bytes of one group and their manifest."""
    table = records_table(records)
    data = parquet_bytes(table)
    first = records[0]
    versions: dict[str, set[int]] = {}
    for row in table.group_by(["kind", "schema_version"]).aggregate([]).to_pylist():
        versions.setdefault(row["kind"], set()).add(row["schema_version"])
    at_ms = pc.min_max(table["at_ms"]).as_py()
    manifest = Manifest(
        key=object_key(topic, first.tenant, first.date, partition, first.offset),
        topic=topic,
        partition=partition,
        tenant=first.tenant,
        date=first.date,
        lane=lane,
        first_offset=first.offset,
        last_offset=records[-1].offset,
        offsets=offset_runs(table["offset"].to_numpy()),  # type: ignore[arg-type]  # lax: pairs to lists
        record_count=len(records),
        records_sha256=records_checksum(table),
        object_sha256=hashlib.sha256(data).hexdigest(),
        object_bytes=len(data),
        schema_versions={kind: sorted(v) for kind, v in sorted(versions.items())},
        kinds=sorted(versions),
        min_at_ms=at_ms["min"],
        max_at_ms=at_ms["max"],
        labels=labels,
        store=store,
        rule=rule,
        written_at=written_at,
    )
    return data, manifest


def verify(data: bytes, manifest: Manifest) -> list[ArchivedRecord]:
    """The records of an object, checked against its manifest; :class:`ArchiveMismatch` if not."""
    if len(data) != manifest.object_bytes or hashlib.sha256(data).hexdigest() != (
        manifest.object_sha256
    ):
        raise ArchiveMismatch(f"{manifest.key}: the object's bytes do not match its manifest")
    try:
        table = read_parquet(data)
    except (pa.ArrowException, KeyError) as error:
        raise ArchiveMismatch(f"{manifest.key}: not a readable archive object: {error}") from None
    if table.num_rows != manifest.record_count:
        raise ArchiveMismatch(
            f"{manifest.key}: {table.num_rows} records, the manifest says {manifest.record_count}"
        )
    if records_checksum(table) != manifest.records_sha256:
        raise ArchiveMismatch(f"{manifest.key}: the records' checksum does not match")
    return table_records(table)
