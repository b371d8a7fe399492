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
import io
import struct
from collections.abc import Sequence
from datetime import datetime

import pyarrow as pa
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


def records_digest(records: Sequence[ArchivedRecord]) -> str:
    """A checksum of what replay restores: offsets, timestamps, keys, values and headers."""
    digest = hashlib.sha256()
    update = digest.update
    for r in records:
        key = r.key if r.key is not None else b""
        update(
            struct.pack(
                ">qqii", r.offset, r.timestamp_ms, -1 if r.key is None else len(key), len(r.value)
            )
        )
        update(key)
        update(r.value)
        for name, value in r.headers:
            encoded = name.encode()
            update(struct.pack(">ii", len(encoded), len(value)))
            update(encoded)
            update(value)
    return digest.hexdigest()


def offset_runs(offsets: Sequence[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for offset in offsets:
        if runs and runs[-1][1] + 1 == offset:
            runs[-1][1] = offset
        else:
            runs.append([offset, offset])
    return runs


def encode_parquet(records: Sequence[ArchivedRecord]) -> bytes:
    columns = {
        "offset": [r.offset for r in records],
        "timestamp_ms": [r.timestamp_ms for r in records],
        "key": [r.key for r in records],
        "value": [r.value for r in records],
        "headers": [[{"key": k, "value": v} for k, v in r.headers] for r in records],
        "tenant": [r.tenant for r in records],
        "kind": [r.kind for r in records],
        "schema_version": [r.schema_version for r in records],
        "at_ms": [r.at_ms for r in records],
        "visibility": [r.visibility for r in records],
    }
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    sink = io.BytesIO()
    # zstd: JSON values compress ~5x at a cost the archive keeps up with.
    pq.write_table(table, sink, compression="zstd", compression_level=1)
    return sink.getvalue()


def decode_parquet(data: bytes) -> list[ArchivedRecord]:
    table = pq.read_table(pa.BufferReader(data))
    columns = table.to_pydict()
    return [
        ArchivedRecord(
            offset=columns["offset"][i],
            timestamp_ms=columns["timestamp_ms"][i],
            key=columns["key"][i],
            value=columns["value"][i],
            headers=tuple((h["key"], h["value"]) for h in columns["headers"][i]),
            tenant=columns["tenant"][i],
            kind=columns["kind"][i],
            schema_version=columns["schema_version"][i],
            at_ms=columns["at_ms"][i],
            visibility=columns["visibility"][i],
        )
        for i in range(table.num_rows)
    ]


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
    data = encode_parquet(records)
    first = records[0]
    versions: dict[str, set[int]] = {}
    for r in records:
        versions.setdefault(r.kind, set()).add(r.schema_version)
    manifest = Manifest(
        key=object_key(topic, first.tenant, first.date, partition, first.offset),
        topic=topic,
        partition=partition,
        tenant=first.tenant,
        date=first.date,
        lane=lane,
        first_offset=first.offset,
        last_offset=records[-1].offset,
        offsets=offset_runs([r.offset for r in records]),
        record_count=len(records),
        records_sha256=records_digest(records),
        object_sha256=hashlib.sha256(data).hexdigest(),
        object_bytes=len(data),
        schema_versions={kind: sorted(v) for kind, v in sorted(versions.items())},
        kinds=sorted(versions),
        min_at_ms=min(r.at_ms for r in records),
        max_at_ms=max(r.at_ms for r in records),
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
        records = decode_parquet(data)
    except (pa.ArrowException, KeyError) as error:
        raise ArchiveMismatch(f"{manifest.key}: not a readable archive object: {error}") from None
    if len(records) != manifest.record_count:
        raise ArchiveMismatch(
            f"{manifest.key}: {len(records)} records, the manifest says {manifest.record_count}"
        )
    if records_digest(records) != manifest.records_sha256:
        raise ArchiveMismatch(f"{manifest.key}: the records' checksum does not match")
    return records
