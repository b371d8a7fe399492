"""Replay and backfill: a time range of the archive restored into a topic.

The objects of ``topic`` whose records' time (event time, or an insight's window start) meets
``[start, end)`` are read from both stores and **each is checked against its manifest** (record
count, checksum of the records, checksum of the bytes) before anything is produced: one object
that does not match stops the replay with the object named, and nothing is sent. Records go to
the same partition number of the target (which must have the source's partition count; a
missing target is created with it), in offset order — so each key keeps its order — with their
key, value, headers and timestamp as they were.

A replay can be limited to what a reader's agreements allow (``reader``): records pass the one
sharing rule, :func:`shared.control.reading_grants`, with the reader's grants (its own data,
public data, and the types its owners granted it), then the requested tenants, types and date
range; ``fields`` keeps only those top-level fields of each value (besides ``tenant`` and
``type``) — a grantee can be given a backfill of exactly what it may see. ``dry_run`` only
reports what would be sent.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from schemas.control import Grant
from services.storage.reader import ArchiveReader, in_range
from services.storage.segments import ArchivedRecord
from services.storage.stores import Store
from shared.control import may_read, now
from shared.kafka import OutRecord, create_producer, ensure_topics, send_to_partition, started
from shared.settings import XietongSettings


@dataclass
class ReplayReport:
    topic: str
    target: str | None
    objects: int = 0
    records_checked: int = 0
    records: int = 0
    left_out: int = 0
    partitions: dict[int, int] = field(default_factory=dict)
    sha256: str = ""
    dry_run: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "target": self.target,
            "objects_verified": self.objects,
            "records_checked": self.records_checked,
            "records": self.records,
            "left_out_by_agreement_or_filter": self.left_out,
            "records_per_partition": dict(sorted(self.partitions.items())),
            "sha256_of_records_sent": self.sha256,
            "dry_run": self.dry_run,
        }


def allowed(
    record: ArchivedRecord,
    reader: str | None,
    grants: Sequence[Grant],
    at: datetime,
    tenants: set[str] | None,
    types: set[str] | None,
) -> bool:
    if tenants and record.tenant not in tenants:
        return False
    if types and record.kind not in types:
        return False
    if reader is None:  # the operator
        return True
    return may_read(
        reader,
        owner=record.tenant,
        visibility=record.visibility,
        insight_type=record.kind,
        grants=grants,
        at=at,
    )


def project(value: bytes, fields: Sequence[str] | None) -> bytes:
    if not fields:
        return value
    doc = orjson.loads(value)
    keep = {"tenant", "type", *fields}
    return orjson.dumps({k: v for k, v in doc.items() if k in keep})


async def replay(
    settings: XietongSettings,
    stores: dict[str, Store],
    *,
    topic: str,
    target: str | None,
    start: datetime | None,
    end: datetime | None,
    tenants: Sequence[str] = (),
    types: Sequence[str] = (),
    fields: Sequence[str] = (),
    reader: str | None = None,
    grants: Sequence[Grant] = (),
    dry_run: bool = False,
) -> ReplayReport:
    """Restore ``topic``'s archive in ``[start, end)`` into ``target`` (see the module doc)."""
    archive = ArchiveReader(stores)
    report = ReplayReport(topic, target, dry_run=dry_run or target is None)
    owners = set(tenants) or await archive.tenants(topic)
    if reader is not None:
        owners &= {reader, "network"} | {g.owner for g in grants}
    found = await archive.manifests(topic, owners, start, end)
    # Every object is checked against its manifest before one record is sent.
    loaded = await asyncio.gather(*(archive.records(item) for item in found))
    at = now()
    tenant_set, type_set = set(tenants) or None, set(types) or None
    by_partition: dict[int, list[ArchivedRecord]] = {}
    for item, records in zip(found, loaded, strict=True):
        report.objects += 1
        report.records_checked += len(records)
        for record in records:
            if not in_range(record.at_ms, start, end):
                continue
            if not allowed(record, reader, grants, at, tenant_set, type_set):
                report.left_out += 1
                continue
            by_partition.setdefault(item.manifest.partition, []).append(record)
    digest = hashlib.sha256()
    for partition in sorted(by_partition):
        records = sorted(by_partition[partition], key=lambda r: r.offset)
        by_partition[partition] = records
        report.partitions[partition] = len(records)
        report.records += len(records)
        for r in records:
            digest.update(project(r.value, fields))
    report.sha256 = digest.hexdigest()
    if report.dry_run or not by_partition or target is None:
        return report
    await _produce(settings, topic, target, by_partition, fields)
    return report


async def _produce(
    settings: XietongSettings,
    source: str,
    target: str,
    by_partition: dict[int, list[ArchivedRecord]],
    fields: Sequence[str],
) -> None:
    async with started(create_producer(settings)) as producer:
        source_count = len(await producer.partitions_for(source) or ())
        await ensure_topics(settings, [target], partitions=source_count or None)
        target_count = len(await producer.partitions_for(target))
        if source_count and target_count != source_count:
            raise ValueError(
                f"{target} has {target_count} partitions and {source} {source_count}: a replay "
                "keeps each record's partition, so the counts must be equal"
            )
        sent: list[tuple[asyncio.Future[Any], int]] = []
        for partition, records in by_partition.items():
            if partition >= target_count:
                raise ValueError(f"{target} has no partition {partition}")
            out = [
                OutRecord(r.key, project(r.value, fields), r.headers, r.timestamp_ms)
                for r in records
            ]
            await send_to_partition(producer, target, partition, out, sent=sent)
        await asyncio.gather(*(future for future, _ in sent))
