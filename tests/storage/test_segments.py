"""Archive segments: exactly once under crashes at any point, with time-based flushing and late
records — a property test that restarts from every commit point — and few objects from late
records."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from services.storage.segments import ArchivedRecord, Lane, PartitionSegments, Segment, describe

DAY_MS = 86_400_000
BASE_MS = 1_790_000_000_000  # a fixed moment in 2026


def record(offset: int, tenant: str, at_ms: int) -> ArchivedRecord:
    return ArchivedRecord(
        offset=offset,
        timestamp_ms=at_ms,
        key=tenant.encode(),
        value=b"x" * 100,
        headers=(),
        tenant=tenant,
        kind="sales_order_line",
        schema_version=1,
        at_ms=at_ms,
    )


def stream(rng: random.Random, count: int, late_share: float = 0.05) -> list[ArchivedRecord]:
    """Records over a few days, a share of them dated one or two days back (late)."""
    out = []
    for offset in range(count):
        at = BASE_MS + offset * (3 * DAY_MS // count)
        if rng.random() < late_share:
            at -= rng.choice([1, 2]) * DAY_MS
        out.append(record(offset, rng.choice(["acme", "bolt", "cogs"]), at))
    return out


def fresh(metadata: str | None = None, *, max_bytes: int = 3000) -> PartitionSegments:
    return PartitionSegments.restore(
        "events.clean.v1", 0, metadata, max_bytes=max_bytes, max_seconds=60, late_max_seconds=600
    )


def write(
    store: dict[tuple[str, str, int], list[int]], segment: Segment, share: float, rng: random.Random
) -> None:
    """Write a segment's objects (only some of them when ``share`` < 1: a crash mid-flush)."""
    for (tenant, date), records in segment.groups().items():
        if rng.random() <= share:
            store[(tenant, date, records[0].offset)] = [r.offset for r in records]


@pytest.mark.parametrize("seed", range(40))
def test_every_record_lands_in_exactly_one_object_whatever_crashes(seed: int) -> None:
    rng = random.Random(seed)
    records = stream(rng, 400)
    store: dict[tuple[str, str, int], list[int]] = {}
    committed: tuple[int, str | None] = (0, None)
    state = fresh()
    position, clock = 0, 0.0
    crashes = 0
    while position < len(records):
        batch = records[position : position + rng.randint(1, 25)]
        clock += rng.uniform(0, 40)
        flushing = [s for r in batch if (s := state.add(r, clock)) is not None]
        flushing += state.due(clock)
        crash = rng.random() < 0.15
        for segment in flushing:
            write(store, segment, rng.random() if crash else 1.0, rng)
            if not crash:
                state.written(segment)
        position += len(batch)
        if crash:  # after writing (some of) the objects, before the commit
            crashes += 1
            state = fresh(committed[1])
            position = committed[0]
            continue
        point = state.commit_point()
        if point is not None:
            committed = point
    for segment in state.due(clock, everything=True):
        write(store, segment, 1.0, rng)
        state.written(segment)
    held = Counter(offset for offsets in store.values() for offset in offsets)
    assert crashes > 0
    assert sorted(held) == [r.offset for r in records]
    assert set(held.values()) == {1}, "an offset in two objects"
    for (tenant, date, first), offsets in store.items():  # names come from offsets
        assert offsets[0] == first
        assert all(records[o].tenant == tenant and records[o].date == date for o in offsets)


def test_an_idle_partitions_segment_is_flushed_after_max_seconds() -> None:
    state = fresh(max_bytes=10**9)
    assert state.add(record(0, "acme", BASE_MS), now=0.0) is None
    assert state.due(59.0) == []
    (segment,) = state.due(60.0)
    assert [r.offset for r in segment.records] == [0]
    offset, _ = state.commit_point() or (None, None)
    assert offset == 0  # not written yet: the commit stays at it
    state.written(segment)
    assert (state.commit_point() or (None,))[0] == 1


def test_late_records_make_about_one_object_per_group_and_hour() -> None:
    """An hour of a partition at one record a second, 5 % dated a day or two back, flushed
    every minute: the late records add at most one object per (tenant, date) they touch."""
    rng = random.Random(1)
    state = PartitionSegments.restore(
        "events.clean.v1", 0, None, max_bytes=10**9, max_seconds=60, late_max_seconds=3600
    )
    objects: Counter[Lane] = Counter()
    late_groups = set()
    for second in range(3600):
        at = BASE_MS + second * 1000
        if rng.random() < 0.05:
            at -= rng.choice([1, 2]) * DAY_MS
        r = record(second, rng.choice(["acme", "bolt"]), at)
        state.add(r, float(second))
        for segment in state.due(float(second)):
            objects[segment.lane] += len(segment.groups())
            if segment.lane is Lane.LATE:
                late_groups |= set(segment.groups())
            state.written(segment)
    for segment in state.due(3600.0, everything=True):
        objects[segment.lane] += len(segment.groups())
        if segment.lane is Lane.LATE:
            late_groups |= set(segment.groups())
    assert 0 < objects[Lane.LATE] <= len(late_groups) <= 4  # 2 tenants x 2 past days
    # without the late lane every minute's flush would carry a late group or two
    assert objects[Lane.LATE] < 60


def test_describe_reads_events_and_insights_and_refuses_the_rest() -> None:
    event = describe(
        5,
        1,
        b"acme",
        b'{"tenant":"acme","type":"sales_order_line","schema_version":1,'
        b'"occurred_at":"2026-11-01T08:00:00+08:00"}',
    )
    assert (event.tenant, event.kind, event.date) == ("acme", "sales_order_line", "2026-11-01")
    insight = describe(
        6,
        1,
        b"network",
        b'{"tenant":"network","type":"benchmark","visibility":"public",'
        b'"provenance":{"window_start":"2026-10-31T23:00:00Z"}}',
    )
    assert (insight.kind, insight.visibility, insight.date) == ("benchmark", "public", "2026-10-31")
    for bad in (b"nope", b"[]", b'{"tenant":"acme"}', b'{"tenant":"a","type":"t"}'):
        with pytest.raises(ValueError):
            describe(7, 1, None, bad)
