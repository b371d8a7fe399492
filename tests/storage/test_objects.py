"""Archive objects without a store: the records' checksum is the one its definition states,
records come back from their Parquet exactly, an object that does not match its manifest is
refused, and objects written before the columnar writer still read."""

from __future__ import annotations

import hashlib
import io
import random
import struct
from collections.abc import Sequence
from datetime import UTC, datetime

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.storage.handlers import Labeller, plan_segment
from services.storage.objects import (
    SCHEMA,
    ArchiveMismatch,
    Manifest,
    build_object,
    offset_runs,
    parquet_bytes,
    read_parquet,
    records_checksum,
    records_table,
    table_records,
    verify,
)
from services.storage.placement import Policy
from services.storage.segments import DAY_MS, ArchivedRecord, PartitionSegments, day_of
from tests.storage.conftest import ROOT

WRITTEN_AT = datetime(2026, 11, 2, tzinfo=UTC)
LABELS = {"sensitivity": "internal", "residency": "any", "tenant": "acme", "kind": "sales"}


def reference_checksum(records: Sequence[ArchivedRecord]) -> str:
    """The manifest's ``records_sha256`` as its definition says, record by record."""
    digest = hashlib.sha256()
    for r in records:
        key = r.key if r.key is not None else b""
        digest.update(
            struct.pack(
                ">qqii", r.offset, r.timestamp_ms, -1 if r.key is None else len(key), len(r.value)
            )
        )
        digest.update(key + r.value)
        for name, value in r.headers:
            encoded = name.encode()
            digest.update(struct.pack(">ii", len(encoded), len(value)) + encoded + value)
    return digest.hexdigest()


def random_records(rng: random.Random, count: int, first: int = 0) -> list[ArchivedRecord]:
    out = []
    offset = first
    for _ in range(count):
        offset += rng.choice([1, 1, 1, 2, 7])
        out.append(
            ArchivedRecord(
                offset=offset,
                timestamp_ms=rng.randint(-(10**12), 10**13),
                key=None if rng.random() < 0.2 else rng.randbytes(rng.randint(0, 12)),
                value=rng.randbytes(rng.randint(0, 60)),
                headers=tuple(
                    (rng.choice(["trace", "é名", ""]), rng.randbytes(rng.randint(0, 5)))
                    for _ in range(rng.choice([0, 0, 0, 1, 3]))
                ),
                tenant=rng.choice(["acme", "acme", "bolt"]),
                kind=rng.choice(["sales_order_line", "sales_order_line", "benchmark"]),
                schema_version=rng.choice([1, 1, 2]),
                at_ms=rng.randint(0, 10**13),
                visibility=rng.choice(["private", "public"]),
            )
        )
    return out


def legacy_parquet(records: Sequence[ArchivedRecord]) -> bytes:
    """An object as the archive wrote it before the columnar writer (row-wise, default
    dictionaries and statistics)."""
    columns = {
        name: [getattr(r, name) for r in records] for name in SCHEMA.names if name != "headers"
    }
    columns["headers"] = [[{"key": k, "value": v} for k, v in r.headers] for r in records]
    sink = io.BytesIO()
    table = pa.Table.from_pydict(columns, schema=SCHEMA)
    pq.write_table(table, sink, compression="zstd", compression_level=1)
    return sink.getvalue()


def test_a_records_field_order_is_the_tables_column_order() -> None:
    # describe() and table_records() build records positionally
    assert ArchivedRecord.__struct_fields__ == tuple(SCHEMA.names)


@pytest.mark.parametrize("seed", range(12))
def test_the_checksum_is_its_definition_and_records_come_back_exactly(seed: int) -> None:
    rng = random.Random(seed)
    records = random_records(rng, rng.choice([1, 2, 5, 40, 300]))
    table = records_table(records)
    assert records_checksum(table) == reference_checksum(records)
    back = read_parquet(parquet_bytes(table))
    assert records_checksum(back) == reference_checksum(records)
    assert table_records(back) == records


def test_the_checksum_of_chunked_and_sliced_tables() -> None:
    rng = random.Random(7)
    parts = [random_records(rng, n, first=1000 * i) for i, n in enumerate((9, 1, 14))]
    records = [r for part in parts for r in part]
    table = pa.concat_tables([records_table(part) for part in parts])
    assert table.column("value").num_chunks == 3
    assert records_checksum(table) == reference_checksum(records)
    assert table_records(table) == records
    for start, length in ((0, 5), (4, 12), (10, 14), (23, 1)):
        window = table.slice(start, length)
        assert records_checksum(window) == reference_checksum(records[start : start + length])
        assert table_records(window) == records[start : start + length]


def test_a_group_with_one_tenant_kind_and_no_headers_reads_back() -> None:
    records = [
        ArchivedRecord(
            offset=n,
            timestamp_ms=n,
            key=b"acme",
            value=b'{"n":%d}' % n,
            headers=(),
            tenant="acme",
            kind="sales_order_line",
            schema_version=1,
            at_ms=n,
        )
        for n in range(50)
    ]
    data, manifest = build_object(
        "events.clean.v1",
        0,
        "current",
        records,
        labels=LABELS,
        store="public",
        rule="r",
        written_at=WRITTEN_AT,
    )
    assert verify(data, manifest) == records


def test_the_manifest_says_what_the_object_holds() -> None:
    rng = random.Random(3)
    records = random_records(rng, 200, first=41)
    data, manifest = build_object(
        "events.clean.v1",
        2,
        "late",
        records,
        labels=LABELS,
        store="public",
        rule="r",
        written_at=WRITTEN_AT,
    )
    first = records[0]
    assert manifest.key == (
        f"events.clean.v1/tenant={first.tenant}/date={first.date}/partition=2/"
        f"{first.offset:020d}.parquet"
    )
    assert (manifest.first_offset, manifest.last_offset) == (first.offset, records[-1].offset)
    assert sum(b - a + 1 for a, b in manifest.offsets) == manifest.record_count == 200
    assert [o for a, b in manifest.offsets for o in range(a, b + 1)] == [r.offset for r in records]
    versions: dict[str, set[int]] = {}
    for r in records:
        versions.setdefault(r.kind, set()).add(r.schema_version)
    assert manifest.schema_versions == {k: sorted(v) for k, v in sorted(versions.items())}
    assert manifest.kinds == sorted(versions)
    assert manifest.min_at_ms == min(r.at_ms for r in records)
    assert manifest.max_at_ms == max(r.at_ms for r in records)
    assert manifest.records_sha256 == reference_checksum(records)
    assert manifest.object_sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.object_bytes == len(data)
    assert verify(data, manifest) == records


def test_an_object_that_does_not_match_its_manifest_is_refused() -> None:
    rng = random.Random(4)
    records = random_records(rng, 30)
    data, manifest = build_object(
        "t", 0, "current", records, labels=LABELS, store="public", rule="r", written_at=WRITTEN_AT
    )
    with pytest.raises(ArchiveMismatch, match="bytes"):
        verify(data[:-1] + bytes([data[-1] ^ 1]), manifest)
    # other records (one value changed) in an object whose byte checksum is made to match
    changed = [*records[:-1], msgspec.structs.replace(records[-1], value=b"other")]
    other = parquet_bytes(records_table(changed))
    with pytest.raises(ArchiveMismatch, match="checksum"):
        verify(other, _for_bytes(manifest, other))
    fewer = parquet_bytes(records_table(records[:-1]))
    with pytest.raises(ArchiveMismatch, match="29 records"):
        verify(fewer, _for_bytes(manifest, fewer))
    junk = b"not parquet at all"
    with pytest.raises(ArchiveMismatch, match="not a readable archive object"):
        verify(junk, _for_bytes(manifest, junk))


def test_objects_written_before_the_columnar_writer_still_read() -> None:
    rng = random.Random(5)
    records = random_records(rng, 120)
    data = legacy_parquet(records)
    _, manifest = build_object(
        "t", 0, "current", records, labels=LABELS, store="public", rule="r", written_at=WRITTEN_AT
    )
    assert verify(data, _for_bytes(manifest, data)) == records


def test_offset_runs() -> None:
    assert list(offset_runs([])) == []
    assert list(offset_runs([5])) == [(5, 5)]
    assert list(offset_runs([1, 2, 3, 7, 8, 10])) == [(1, 3), (7, 8), (10, 10)]
    assert list(offset_runs(list(range(0, 20, 4)))) == [(o, o) for o in range(0, 20, 4)]


def test_the_day_of_a_time() -> None:
    rng = random.Random(6)
    moments = [0, -1, DAY_MS - 1, DAY_MS, -DAY_MS, -DAY_MS - 1, 1_790_000_000_000]
    moments += [rng.randint(-(10**13), 10**14) for _ in range(2000)]
    for at_ms in moments:
        expected = datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%Y-%m-%d")
        assert day_of(at_ms) == expected, at_ms


def test_a_segment_is_planned_per_group_and_sensitivity() -> None:
    """Groups by (tenant, date); a group whose kinds differ in sensitivity is split, each part
    labelled as its most sensitive record and named by its own first offset."""
    labeller = Labeller(
        sensitivity={"text_document": "personal", "sales_order_line": "internal"},
        residency={},
        default_residency="any",
    )
    kinds = ["sales_order_line", "inventory_snapshot", "text_document"]
    state = PartitionSegments("t", 0, max_bytes=10**9, max_seconds=60, late_max_seconds=600)
    at = 1_790_000_000_000
    for offset in range(60):
        kind = kinds[offset % 3] if offset % 2 else "sales_order_line"
        record = ArchivedRecord(
            offset=offset,
            timestamp_ms=0,
            key=None,
            value=b"{}",
            headers=(),
            tenant=["acme", "bolt"][offset % 2],
            kind=kind,
            schema_version=1,
            at_ms=at + (DAY_MS if offset >= 40 else 0),
        )
        state.add(record, 0.0)
    (segment,) = state.due(0.0, everything=True)
    assert sum(len(g) for g in segment.groups().values()) == 60
    assert segment.groups() == _groups_of(segment.records)
    policy = Policy.load(str(ROOT / "deploy" / "placement-policy.yaml"))
    planned = plan_segment(segment, policy, labeller, WRITTEN_AT)
    assert not planned.refused
    found = {
        (m.tenant, m.date, m.first_offset): (store, m.labels["sensitivity"], m.labels["kind"])
        for store, _, m in planned.objects
    }
    day, next_day = day_of(at), day_of(at + DAY_MS)
    assert found == {
        ("acme", day, 0): ("public", "internal", "sales_order_line"),
        ("bolt", day, 1): ("public", "internal", "inventory_snapshot"),
        ("bolt", day, 5): ("private", "personal", "text_document"),
        ("acme", next_day, 40): ("public", "internal", "sales_order_line"),
        ("bolt", next_day, 41): ("private", "personal", "text_document"),
        ("bolt", next_day, 43): ("public", "internal", "inventory_snapshot"),
    }


def _groups_of(records: list[ArchivedRecord]) -> dict[tuple[str, str], list[ArchivedRecord]]:
    out: dict[tuple[str, str], list[ArchivedRecord]] = {}
    for r in records:
        out.setdefault((r.tenant, r.date), []).append(r)
    return out


def _for_bytes(manifest: Manifest, data: bytes) -> Manifest:
    """``manifest`` with the checksum and size of ``data`` (as if written for those bytes)."""
    return manifest.model_copy(
        update={"object_sha256": hashlib.sha256(data).hexdigest(), "object_bytes": len(data)}
    )
