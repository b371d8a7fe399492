"""The per-firm loop's batch handling, without a broker: outputs, dead letters, idle marks."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY

from schemas.events import CleanEvent
from schemas.insights import DeadLetter, Statistics
from schemas.topics import INSIGHT_TOPICS, dlq
from services.analytics.app import FirmWindows
from services.analytics.handlers import Origin
from services.analytics.restatements import RestatementStore
from services.analytics.settings import load_analytics_settings
from shared.codec import decode, encode
from shared.kafka import OutRecord

SOURCE = "events.clean.v1"
STATISTICS = INSIGHT_TOPICS["statistics"]
W0 = datetime(2026, 11, 2, 10, tzinfo=UTC)


def record(offset: int, value: bytes, partition: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(SOURCE, partition, offset, 0, 0, b"acme", value, None, 4, len(value), [])


def event(minutes: float, metrics: dict[str, float]) -> bytes:
    return encode(
        CleanEvent(
            event_id=uuid.uuid4(),
            tenant="acme",
            type="sales_order_line",
            schema_version=1,
            occurred_at=W0 + timedelta(minutes=minutes),
            source={"system": "test"},  # type: ignore[arg-type]
            payload={},
            metrics=metrics,
        )
    )


def worker(**overrides: object) -> FirmWindows:
    settings = load_analytics_settings(analytics_grace_seconds=60, **overrides)
    return FirmWindows(settings, SOURCE, Origin((SOURCE,), "test", b"test-network-secret"))


def marks_of(
    w: FirmWindows,
    assigned: set[TopicPartition],
    end_of: Callable[[TopicPartition], int | None],
    *,
    fetched_nothing: bool,
) -> list[OutRecord]:
    """The watermark marks time alone produces."""
    out = w.idle(assigned, end_of, fetched_nothing=fetched_nothing, now=datetime.now(UTC))
    internal = out[w.settings.analytics_firm_windows_topic]
    return [r for r in internal if decode(r.value)["kind"] == "watermark"]


def test_a_batch_closes_windows_into_insights_summaries_and_a_watermark_mark() -> None:
    w = worker()
    tp = TopicPartition(SOURCE, 0)
    w.restore(tp, None)
    values = [
        event(m, {"sales.quantity": float(m), "sales.amount_cny": 2.0 * m})
        for m in range(1, 60, 10)
    ]
    values.append(event(62, {}))  # W0 + 2 min: watermark passes 11:00 + 1 min grace
    out = w.process({tp: [record(i, v) for i, v in enumerate(values)]}, datetime.now(UTC))
    assert len(out[INSIGHT_TOPICS["statistics"]]) == 2
    assert len(out[INSIGHT_TOPICS["correlation"]]) == 1
    internal = [decode(r.value) for r in out[w.settings.analytics_firm_windows_topic]]
    assert [m["kind"] for m in internal] == ["window", "watermark"]
    assert internal[0]["metrics"]["sales.quantity"] == {
        "count": 6,
        "sum": float(sum(range(1, 60, 10))),
    }
    assert internal[1]["watermark_ms"] == int((W0 + timedelta(minutes=61)).timestamp() * 1000)
    assert all(r.key == b"acme" for r in out[INSIGHT_TOPICS["statistics"]])
    # the window closed: the commit moves past it, with the stream time in the metadata
    offset, metadata = w.commit_points({tp})[tp]
    assert offset == len(values)
    # the firm's watermark, floored to the hour (every window end is a whole hour)
    assert decode(metadata)["w"] == {
        str(int((W0 + timedelta(hours=1)).timestamp()) // 3600): "acme"
    }


def test_a_batch_for_a_partition_being_handed_over_waits_for_its_committed_state() -> None:
    # Before: records fetched during a rebalance (revoked, not yet assigned again) started the
    # partition afresh, dropping the committed firm watermarks and open windows (seen in a
    # fresh CI run: "partition without restored state", then a firm missing from the commit).
    before = worker()
    tp = TopicPartition(SOURCE, 0)
    before.restore(tp, None)
    first = [record(i, event(m, {"sales.quantity": 1.0})) for i, m in enumerate((1, 2, 3))]
    before.process({tp: first}, datetime.now(UTC))
    committed_offset, metadata = before.commit_points({tp})[tp]

    w = worker()  # the same worker after on_partitions_revoked dropped the partition
    later = [record(3, event(4, {"sales.quantity": 1.0}))]
    out = w.process({tp: later}, datetime.now(UTC))
    assert tp not in w.states
    assert w.unrestored == {tp: 3}  # the loop seeks back; read again once restored
    assert not any(out.values())
    w.restore(tp, metadata, committed_offset)  # the listener, from the commit
    w.process({tp: [*first[committed_offset:], *later]}, datetime.now(UTC))
    assert w.unrestored == {}
    # the open window still starts at the first record: a restart re-reads all four
    assert committed_offset == 0
    assert w.commit_points({tp})[tp][0] == 0


def test_unreadable_records_go_to_the_dead_letter_topic_and_the_batch_goes_on() -> None:
    w = worker()
    tp = TopicPartition(SOURCE, 0)
    w.restore(tp, None)
    good = event(5, {"sales.quantity": 1.0})
    out = w.process(
        {tp: [record(0, b"{oops"), record(1, good), record(2, b"[]")]}, datetime.now(UTC)
    )
    letters = [DeadLetter.model_validate(decode(r.value)) for r in out[dlq(SOURCE)]]
    assert [(x.source_offset, x.original) for x in letters] == [(0, "{oops"), (2, "[]")]
    assert all(x.reason.startswith("unreadable clean event") for x in letters)
    assert w.commit_points({tp})[tp][0] == 1  # the good event's window is open


def test_partitions_without_any_event_are_reported_idle_once() -> None:
    w = worker(analytics_idle_partition_seconds=0)
    w.partitions = 3
    tps = {TopicPartition(SOURCE, p) for p in range(3)}
    for tp in tps:
        w.restore(tp, None)
    w.process(
        {TopicPartition(SOURCE, 1): [record(0, event(5, {"x": 1.0}), partition=1)]},
        datetime.now(UTC),
    )
    marks = [decode(r.value) for r in marks_of(w, tps, lambda _: None, fetched_nothing=True)]
    assert sorted(m["partition"] for m in marks) == [0, 2]
    assert all(m["watermark_ms"] is None and m["partitions"] == 3 for m in marks)
    assert marks_of(w, tps, lambda _: None, fetched_nothing=True) == []
    waiting = worker(analytics_idle_partition_seconds=3600)
    waiting.restore(TopicPartition(SOURCE, 0), None)
    assert (
        marks_of(waiting, {TopicPartition(SOURCE, 0)}, lambda _: None, fetched_nothing=True) == []
    )


def test_a_partition_that_goes_quiet_is_reported_once_and_waited_for_again_on_its_next_event() -> (
    None
):
    w = worker(analytics_quiet_partition_seconds=0)
    w.partitions = 2
    tp = TopicPartition(SOURCE, 0)
    w.restore(tp, None)
    out = w.process({tp: [record(0, event(5, {"x": 1.0}))]}, datetime.now(UTC))
    (first,) = [decode(r.value) for r in out[w.settings.analytics_firm_windows_topic]]
    assert (
        marks_of(w, {tp}, lambda _: 5, fetched_nothing=False) == []
    )  # records left to read: behind, not quiet
    quiet = w.idle({tp}, lambda _: 1, fetched_nothing=False, now=datetime.now(UTC))
    summary, mark = [decode(r.value) for r in quiet[w.settings.analytics_firm_windows_topic]]
    # its only firm is quiet: its window, long past by the wall clock, closes without a next
    # event, and the partition is not waited for
    assert summary["kind"] == "window" and summary["tenant"] == "acme"
    assert len(quiet[INSIGHT_TOPICS["statistics"]]) == 1
    assert mark["kind"] == "watermark" and mark["watermark_ms"] is None
    assert marks_of(w, {tp}, lambda _: 1, fetched_nothing=False) == []  # once
    # its next event says its watermark again: the end of the window closed
    out = w.process({tp: [record(1, event(4, {"x": 2.0}))]}, datetime.now(UTC))
    (again,) = [decode(r.value) for r in out[w.settings.analytics_firm_windows_topic]]
    assert again["watermark_ms"] == int((W0 + timedelta(hours=1)).timestamp() * 1000)
    assert again["watermark_ms"] > first["watermark_ms"]
    waiting = worker(analytics_quiet_partition_seconds=3600)
    waiting.restore(tp, None)
    waiting.process({tp: [record(0, event(5, {"x": 1.0}))]}, datetime.now(UTC))
    assert marks_of(waiting, {tp}, lambda _: 1, fetched_nothing=False) == []


def test_after_a_restore_a_partition_is_found_quiet_and_its_first_batch_is_announced() -> None:
    w = worker(analytics_quiet_partition_seconds=0)
    tp = TopicPartition(SOURCE, 0)
    w.restore(tp, None)
    w.process({tp: [record(0, event(5, {"x": 1.0}))]}, datetime.now(UTC))
    _, metadata = w.commit_points({tp})[tp]
    # a new owner with nothing new to read: caught up at the committed offset, so quiet
    quiet = worker(analytics_quiet_partition_seconds=0)
    quiet.restore(tp, metadata, 0)
    (mark,) = [decode(r.value) for r in marks_of(quiet, {tp}, lambda _: 0, fetched_nothing=False)]
    assert mark["watermark_ms"] is None
    # a new owner whose first event does not move the watermark still says it (the previous
    # owner may have reported the partition quiet)
    again = worker()
    again.restore(tp, metadata, 0)
    out = again.process({tp: [record(0, event(5, {"x": 1.0}))]}, datetime.now(UTC))
    (said,) = [decode(r.value) for r in out[again.settings.analytics_firm_windows_topic]]
    assert said["kind"] == "watermark" and said["watermark_ms"] is not None


def firm_event(tenant: str, at: datetime, metrics: dict[str, float]) -> bytes:
    return encode(
        CleanEvent(
            event_id=uuid.uuid4(),
            tenant=tenant,
            type="sales_order_line",
            schema_version=1,
            occurred_at=at,
            source={"system": "test"},  # type: ignore[arg-type]
            payload={},
            metrics=metrics,
        )
    )


def test_a_firm_ahead_closes_no_other_firms_window_and_no_network_window() -> None:
    w = worker(analytics_quiet_partition_seconds=3600)
    tp = TopicPartition(SOURCE, 0)
    w.restore(tp, None)
    values = [
        firm_event("bb", W0 + timedelta(minutes=5), {"x": 1.0}),
        firm_event("aa", datetime(2036, 1, 1, tzinfo=UTC), {"x": 1.0}),
        firm_event("bb", W0 + timedelta(minutes=30), {"x": 2.0}),
    ]
    out = w.process({tp: [record(i, v) for i, v in enumerate(values)]}, datetime.now(UTC))
    assert out[INSIGHT_TOPICS["statistics"]] == []  # b's window is open, a's too
    (mark,) = [decode(r.value) for r in out[w.settings.analytics_firm_windows_topic]]
    assert mark["watermark_ms"] == int((W0 + timedelta(minutes=29)).timestamp() * 1000)
    # b's next hour closes b's window, and the partition's mark is still b's
    out = w.process(
        {tp: [record(3, firm_event("bb", W0 + timedelta(minutes=62), {"x": 3.0}))]},
        datetime.now(UTC),
    )
    (stats,) = [decode(r.value) for r in out[INSIGHT_TOPICS["statistics"]]]
    assert stats["tenant"] == "bb" and stats["count"] == 2
    marks = [decode(r.value) for r in out[w.settings.analytics_firm_windows_topic]]
    assert marks[-1]["watermark_ms"] == int((W0 + timedelta(minutes=61)).timestamp() * 1000)
    # b goes quiet: no longer waited for; now a, alone, is the partition's mark
    w.heard_at[tp]["bb"] -= 7200
    (quiet,) = [decode(r.value) for r in marks_of(w, {tp}, lambda _: 4, fetched_nothing=False)]
    assert (
        quiet["watermark_ms"] == int(datetime(2036, 1, 1, tzinfo=UTC).timestamp() * 1000) - 60_000
    )


def test_a_backfill_of_a_closed_window_republishes_it_as_revision_2(tmp_path: Path) -> None:
    store = RestatementStore(tmp_path / "state")
    w = FirmWindows(worker().settings, SOURCE, worker().origin, store=store)
    tp = TopicPartition(SOURCE, 0)
    w.restore(tp, None)
    first = [event(5, {"x": 1.0}), event(10, {"x": 2.0}), event(62, {})]
    out = w.process({tp: [record(i, v) for i, v in enumerate(first)]}, datetime.now(UTC))
    w.confirm()
    (original,) = [Statistics.model_validate(decode(r.value)) for r in out[STATISTICS]]
    assert (original.revision, original.count, original.provenance.restates) == (1, 2, None)
    # a file drop brings the window's missing row, after the window closed
    backfill = event(20, {"x": 6.0})
    out = w.process({tp: [record(3, backfill)]}, datetime.now(UTC))
    w.confirm()
    (revised,) = [Statistics.model_validate(decode(r.value)) for r in out[STATISTICS]]
    assert revised.revision == 2 and revised.provenance.restates == original.insight_id
    assert revised.insight_id != original.insight_id
    assert (revised.count, revised.mean, revised.max) == (3, 3.0, 6.0)
    assert out[w.settings.analytics_firm_windows_topic] == []  # benchmarks are never revised
    # the same file dropped again, or read again after a restart: nothing new
    assert w.process({tp: [record(4, backfill)]}, datetime.now(UTC))[STATISTICS] == []
    _, metadata = w.commit_points({tp})[tp]
    again = FirmWindows(w.settings, SOURCE, w.origin, store=store)
    again.restore(tp, metadata, 3)
    assert again.process({tp: [record(3, backfill)]}, datetime.now(UTC))[STATISTICS] == []
    more = again.process({tp: [record(5, event(30, {"x": 3.0}))]}, datetime.now(UTC))
    (third,) = [Statistics.model_validate(decode(r.value)) for r in more[STATISTICS]]
    assert (third.revision, third.count, third.provenance.restates) == (3, 4, revised.insight_id)
    store.close()
    # on a new disk the closed window is not known: the late event is counted and dropped
    new_disk = FirmWindows(w.settings, SOURCE, w.origin, store=RestatementStore(tmp_path / "new"))
    new_disk.restore(tp, metadata, 3)
    late = ("xietong_analytics_late_events_total", {"window_seconds": "3600"})
    before = REGISTRY.get_sample_value(*late) or 0.0
    assert (
        new_disk.process({tp: [record(6, event(40, {"x": 9.0}))]}, datetime.now(UTC))[STATISTICS]
        == []
    )
    assert REGISTRY.get_sample_value(*late) == before + 1
