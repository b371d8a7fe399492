"""Event-time windows: closing on the watermark, late events, and rebuilding from a commit."""

from __future__ import annotations

import random

from services.analytics.windows import (
    PartitionWindows,
    Window,
    WindowEvent,
    decode_metadata,
    window_start_ms,
)

HOUR = 3600
MINUTE_MS = 60_000
T0 = 1_793_000_000_000 - 1_793_000_000_000 % (HOUR * 1000)  # an hour boundary in Nov 2026


def event(offset: int, minute: float, tenant: str = "acme", value: float = 1.0) -> WindowEvent:
    return WindowEvent(
        offset=offset,
        tenant=tenant,
        time_ms=T0 + int(minute * MINUTE_MS),
        event_type="sales_order_line",
        schema_version=1,
        metrics={"sales.quantity": value},
    )


def closed_keys(windows: list[Window]) -> list[tuple[int, str, int, tuple[float, ...]]]:
    return [
        (w.size_s, w.tenant, w.start_ms, tuple(r["sales.quantity"] for r in w.rows))
        for w in windows
    ]


def test_window_starts_are_aligned_on_the_epoch() -> None:
    assert window_start_ms(T0 + 59 * MINUTE_MS, HOUR) == T0
    assert window_start_ms(T0 + 60 * MINUTE_MS, HOUR) == T0 + HOUR * 1000
    assert window_start_ms(T0 + 13 * HOUR * 1000, 86_400) % (86_400 * 1000) == 0


def test_a_window_closes_only_when_the_watermark_passes_its_end_plus_grace() -> None:
    state = PartitionWindows((HOUR,), grace_ms=5 * MINUTE_MS)
    for i, minute in enumerate([1, 30, 59, 61, 64]):
        assert state.add(event(i, minute)) == []
    assert state.close_due() == []  # stream time 64 min: watermark 59 min < end 60 min
    state.add(event(5, 65))
    closed = state.close_due()
    assert [(w.start_ms, len(w.rows)) for w in closed] == [(T0, 3)]
    assert list(state.open) == [(HOUR, "acme", T0 + HOUR * 1000)]


def test_an_event_within_grace_counts_and_one_after_it_is_late() -> None:
    state = PartitionWindows((HOUR,), grace_ms=5 * MINUTE_MS)
    state.add(event(0, 10, value=1))
    state.add(event(1, 62, value=2))  # next window; watermark now 57 min
    assert state.add(event(2, 58, value=3)) == []  # out of order but within grace
    state.add(event(3, 70, value=4))  # watermark 65 min: the first window closes
    assert state.add(event(4, 59, value=5)) == [HOUR]  # its window closed: late
    closed = state.close_due()
    assert closed_keys(closed) == [(HOUR, "acme", T0, (1.0, 3.0))]


def test_events_without_metrics_move_their_firms_watermark_but_fill_no_window() -> None:
    state = PartitionWindows((HOUR,), grace_ms=0)
    state.add(event(0, 5))
    state.add(WindowEvent(1, "other", T0 + 3 * HOUR * 1000, "text_document", 1, {}))
    assert state.close_due() == []  # another firm's tick closes nothing of acme's
    state.add(WindowEvent(2, "acme", T0 + 3 * HOUR * 1000, "text_document", 1, {}))
    assert [w.tenant for w in state.close_due()] == ["acme"]
    assert state.open == {}


def test_daily_and_hourly_windows_side_by_side() -> None:
    state = PartitionWindows((HOUR, 86_400), grace_ms=0)
    state.add(event(0, 5))
    state.add(event(1, 65))
    state.add(event(2, 125))
    closed = state.close_due()
    assert [(w.size_s, len(w.rows)) for w in closed] == [(HOUR, 1), (HOUR, 1)]
    assert (86_400, "acme", window_start_ms(T0, 86_400)) in state.open


def test_commit_point_is_the_oldest_open_window_and_carries_every_firms_watermark() -> None:
    state = PartitionWindows((HOUR,), grace_ms=5 * MINUTE_MS)
    assert state.commit_point() is None
    state.add(event(10, 50, tenant="a"))
    state.add(event(11, 55, tenant="b"))
    state.add(event(12, 70, tenant="a"))
    offset, metadata = state.commit_point() or (None, "")
    assert offset == 10
    restored = PartitionWindows.restore((HOUR,), 5 * MINUTE_MS, metadata)
    # floored to the hour: every decision compares a watermark with a window end
    assert restored.watermarks == {"a": T0 + HOUR * 1000, "b": T0}
    state.add(event(13, 80, tenant="a"))  # closes a's first window only
    state.add(event(14, 80, tenant="c"))
    assert [w.tenant for w in state.close_due()] == ["a"]
    assert state.commit_point()[0] == 11  # type: ignore[index]  # b's window is still open
    state.add(event(15, 70, tenant="b"))
    state.close_due()
    assert state.commit_point()[0] == 12  # type: ignore[index]
    assert PartitionWindows.restore((HOUR,), 0, "not json").watermarks == {}
    # a commit made when the stream time was the partition's keeps its windows closed
    legacy = PartitionWindows.restore((HOUR,), 0, f'{{"stream_time_ms": {T0 + HOUR * 1000}}}')
    assert legacy.add(event(0, 30, tenant="new")) == [HOUR]


def run(state: PartitionWindows, events: list[WindowEvent]) -> list[Window]:
    closed = []
    for e in events:
        state.add(e)
        closed += state.close_due()
    return closed


def test_restarting_from_any_commit_point_closes_the_same_windows() -> None:
    rng = random.Random(7)
    tenants = ["a", "b", "c"]
    # Roughly increasing event times with jitter, so some arrive out of order or late.
    events = [
        event(i, max(0.0, i * 0.7 + rng.uniform(-12, 3)), rng.choice(tenants), float(i))
        for i in range(400)
    ]
    sizes, grace = (HOUR, 86_400), 5 * MINUTE_MS
    expected = closed_keys(run(PartitionWindows(sizes, grace), events))
    assert len(expected) > 10

    for crash_after in (37, 150, 222, 399):
        first = PartitionWindows(sizes, grace)
        closed_before = run(first, events[:crash_after])
        offset, metadata = first.commit_point() or (0, None)
        second = PartitionWindows.restore(sizes, grace, metadata)
        closed_after = run(second, [e for e in events if e.offset >= offset])
        # windows closed before the crash are not closed again, and nothing is lost
        assert closed_keys(closed_before) + closed_keys(closed_after) == expected


SKEW_MINUTES = {"a": 0.0, "b": -45.0, "c": 20.0, "d": -150.0, "far": 5_000_000.0}
"""Firms' clocks: on time, behind, ahead, far behind, and one dated about ten years ahead."""


def skewed_events(count: int, seed: int) -> list[WindowEvent]:
    rng = random.Random(seed)
    return [
        event(i, max(0.0, 200 + i * 0.7 + SKEW_MINUTES[t] + rng.uniform(-12, 3)), t, float(i))
        for i, t in ((i, rng.choice(list(SKEW_MINUTES))) for i in range(count))
    ]


def restart_everywhere(
    events: list[WindowEvent],
    sizes: tuple[int, ...],
    grace: int,
    max_bytes: int = 4096,
    kept: dict[str, str] | None = None,
) -> list[tuple[int, str, int, tuple[float, ...]]]:
    """Closed windows of one run; asserts that a restart from every commit point closes the
    same (``kept``: where the full metadata of a commit that left firms out is kept)."""
    expected = closed_keys(run(PartitionWindows(sizes, grace), events))
    for crash_after in range(1, len(events)):
        first = PartitionWindows(sizes, grace)
        closed_before = run(first, events[:crash_after])
        offset, metadata = first.commit_point(max_bytes) or (0, None)
        assert metadata is None or len(metadata.encode()) <= max_bytes
        if kept is not None and first.full_metadata is not None:
            kept[decode_metadata(metadata)["n"]] = first.full_metadata
        lookup = None if kept is None else kept.get
        second = PartitionWindows.restore(sizes, grace, metadata, lookup)
        closed_after = run(second, [e for e in events if e.offset >= offset])
        # windows closed before the crash are not closed again, and nothing is lost
        assert closed_keys(closed_before) + closed_keys(closed_after) == expected, crash_after
    return expected


def test_restarting_from_every_commit_point_with_firms_on_skewed_clocks() -> None:
    events = skewed_events(300, seed=3)
    expected = restart_everywhere(events, (HOUR, 86_400), 5 * MINUTE_MS)
    assert {tenant for _, tenant, _, _ in expected} == set(SKEW_MINUTES)
    # the firm ten years ahead closed nobody else's window: each firm's hours hold its events
    assert sum(len(rows) for size, _, _, rows in expected if size == HOUR) > 250


def test_metadata_of_hundreds_of_firms_fits_kafkas_limit_and_restores_exactly() -> None:
    rng = random.Random(5)
    names = [f"firm-{i:03d}-" + "".join(rng.choices("abcdefghijk", k=40)) for i in range(400)]
    events = [
        event(i, i * 0.3 + rng.uniform(-30, 30) + (i % 7) * 90, names[i % len(names)])
        for i in range(1200)
    ]
    state = PartitionWindows((HOUR,), 5 * MINUTE_MS)
    run(state, events)
    for tenant in names[20:]:  # gone quiet: their windows closed without a next event
        state.close_quiet(tenant, T0 + 100 * HOUR * 1000)
    run(state, [event(1200 + i, 400 + i, names[i % 20]) for i in range(100)])
    offset, metadata = state.commit_point() or (0, "")
    assert len(metadata.encode()) <= 4096
    assert state.full_metadata is not None  # 400 firms of 49 characters do not fit
    restored = PartitionWindows.restore((HOUR,), 5 * MINUTE_MS, metadata)
    listed = {t for t in names if t in restored.watermarks}
    assert state.open_tenants() <= listed and 0 < len(listed) < len(names)
    # a left-out firm is taken as closed through the latest of their watermarks: never earlier
    for tenant in set(names) - listed:
        assert restored.watermark_of(tenant) >= state.watermarks[tenant] - HOUR * 1000  # type: ignore[operator]
    kept: dict[str, str] = {}
    exact = PartitionWindows.restore(
        (HOUR,), 5 * MINUTE_MS, metadata, {decode_metadata(metadata)["n"]: state.full_metadata}.get
    )
    assert set(exact.watermarks) == set(names)
    # with a small limit, restarting from every commit point is exact where the full metadata
    # was kept ...
    few = [event(i, i * 1.5 + rng.uniform(-10, 10), names[i % 60], float(i)) for i in range(160)]
    expected = restart_everywhere(few, (HOUR,), 5 * MINUTE_MS, max_bytes=600, kept=kept)
    assert kept and expected
    # ... and without it (a new disk) no window is closed twice and no event counted twice
    for crash_after in range(1, len(few), 9):
        first = PartitionWindows((HOUR,), 5 * MINUTE_MS)
        before = run(first, few[:crash_after])
        offset, metadata = first.commit_point(600) or (0, "")
        after = run(
            PartitionWindows.restore((HOUR,), 5 * MINUTE_MS, metadata),
            [e for e in few if e.offset >= offset],
        )
        keys = [(w.size_s, w.tenant, w.start_ms) for w in before + after]
        assert len(keys) == len(set(keys))
        counted = [v for w in before + after for v in (r["sales.quantity"] for r in w.rows)]
        assert len(counted) == len(set(counted)) <= len(few)


def correction(
    offset: int,
    minute: float,
    corrects: str,
    value: float,
    *,
    deleted: bool = False,
) -> WindowEvent:
    base = event(offset, minute, value=value)
    return WindowEvent(
        offset=base.offset,
        tenant=base.tenant,
        time_ms=base.time_ms,
        event_type=base.event_type,
        schema_version=1,
        metrics=base.metrics,
        event_id=f"c{offset}",
        corrects=corrects,
        deleted=deleted,
    )


def with_id(ev: WindowEvent, event_id: str) -> WindowEvent:
    return WindowEvent(
        ev.offset, ev.tenant, ev.time_ms, ev.event_type, 1, ev.metrics, event_id=event_id
    )


def test_an_update_replaces_its_original_and_a_delete_removes_it() -> None:
    windows = PartitionWindows((HOUR,), grace_ms=0)
    windows.add(with_id(event(0, 1, value=10), "a"))
    windows.add(with_id(event(1, 2, value=20), "b"))
    windows.add(correction(2, 3, corrects="a", value=11))  # update of a
    windows.add(correction(3, 4, corrects="a", value=12))  # a second update of a
    windows.add(correction(4, 5, corrects="b", value=20, deleted=True))
    windows.add(with_id(event(5, 61), "tick"))
    assert closed_keys(windows.close_due()) == [(HOUR, "acme", T0, (12.0,))]
    assert ("acme", "a") not in windows.holding  # closed windows leave no index behind


def test_a_row_named_by_every_change_can_be_deleted_and_inserted_again() -> None:
    """ERP change data: creates, updates and deletes all name the row id in ``corrects``."""
    windows = PartitionWindows((HOUR,), grace_ms=0)
    assert windows.add(correction(0, 1, corrects="row-1", value=10)) == []
    windows.add(correction(1, 2, corrects="row-1", value=11))  # update
    windows.add(correction(2, 3, corrects="row-1", value=11, deleted=True))
    windows.add(correction(3, 4, corrects="row-1", value=30))  # inserted again
    windows.add(correction(4, 5, corrects="row-2", value=5))
    windows.add(correction(5, 6, corrects="row-2", value=5))  # snapshot again
    windows.add(with_id(event(6, 61), "tick"))
    assert closed_keys(windows.close_due()) == [(HOUR, "acme", T0, (30.0, 5.0))]


def test_the_same_event_twice_counts_once() -> None:
    windows = PartitionWindows((HOUR,), grace_ms=0)
    windows.add(with_id(event(0, 1, value=10), "a"))
    assert windows.add(with_id(event(1, 1, value=10), "a")) == []  # a zombie's duplicate
    windows.add(with_id(event(2, 2, value=20), "b"))
    windows.add(with_id(event(3, 61), "tick"))
    assert closed_keys(windows.close_due()) == [(HOUR, "acme", T0, (10.0, 20.0))]


def test_a_correction_counts_in_the_window_of_its_own_time() -> None:
    windows = PartitionWindows((HOUR,), grace_ms=0)
    windows.add(with_id(event(0, 1, value=10), "a"))
    windows.add(with_id(event(1, 61), "tick"))
    assert closed_keys(windows.close_due()) == [(HOUR, "acme", T0, (10.0,))]
    # restating the original at its own time: its window is final, so it is late
    assert windows.add(correction(2, 5, corrects="a", value=11)) == [HOUR]
    # a change stamped later (an ERP commit time) is the row's value in the later window
    assert windows.add(correction(3, 62, corrects="a", value=12)) == []
    windows.add(with_id(event(4, 125), "tick2"))
    assert closed_keys(windows.close_due()) == [(HOUR, "acme", T0 + HOUR * 1000, (1.0, 12.0))]


def change(
    offset: int,
    minute: float,
    event_id: str,
    value: float,
    corrects: str | None = None,
    *,
    deleted: bool = False,
) -> WindowEvent:
    return WindowEvent(
        offset,
        "acme",
        T0 + int(minute * MINUTE_MS),
        "sales_order_line",
        1,
        {"sales.quantity": value},
        event_id=event_id,
        corrects=corrects,
        deleted=deleted,
    )


def test_restarting_rebuilds_rows_that_updates_moved_into_later_windows() -> None:
    """ERP change data: an update's event time (the commit time) is later than its row's
    create, so it takes the row out of an older window into a newer one. Restarting from any
    commit point must close the same windows with the same rows."""
    rng = random.Random(11)
    sizes, grace = (HOUR,), 5 * MINUTE_MS
    events: list[WindowEvent] = []
    rows: list[tuple[str, float]] = []  # row id, minute of its latest change
    for i in range(600):
        minute = i * 0.5 + rng.uniform(-3, 1)
        if rows and rng.random() < 0.35:
            row, _ = rows.pop(rng.randrange(len(rows)))
            deleted = rng.random() < 0.2
            events.append(change(i, minute, f"u{i}", float(i), row, deleted=deleted))
            if not deleted:
                rows.append((row, minute))
        else:
            row = f"r{i}"
            events.append(change(i, minute, f"c{i}", float(i), row))
            rows.append((row, minute))
    expected = closed_keys(run(PartitionWindows(sizes, grace), events))
    assert len(expected) > 3
    for crash_after in range(20, 600, 23):
        first = PartitionWindows(sizes, grace)
        closed_before = run(first, events[:crash_after])
        offset, metadata = first.commit_point() or (0, None)
        second = PartitionWindows.restore(sizes, grace, metadata)
        closed_after = run(second, [e for e in events if e.offset >= offset])
        assert closed_keys(closed_before) + closed_keys(closed_after) == expected, crash_after


def test_a_duplicate_is_recognised_by_its_own_window_also_after_a_restart() -> None:
    grace = 5 * MINUTE_MS
    events = [
        change(0, 62, "a", 1.0),  # A in the second hour
        change(1, 58, "u", 2.0, "a"),  # restated in the first hour (still open): A moves there
        change(2, 62, "a", 1.0),  # a stale duplicate of A: its window took it already
        change(3, 70, "t", 0.0),
        change(4, 200, "z", 9.0),
    ]
    expected = closed_keys(run(PartitionWindows((HOUR,), grace), events))
    assert expected == [(HOUR, "acme", T0, (2.0,)), (HOUR, "acme", T0 + HOUR * 1000, (0.0,))]
    first = PartitionWindows((HOUR,), grace)
    before = run(first, events[:4])
    offset, metadata = first.commit_point() or (0, None)
    second = PartitionWindows.restore((HOUR,), grace, metadata)
    after = run(second, [e for e in events if e.offset >= offset])
    assert closed_keys(before) + closed_keys(after) == expected


def test_a_correction_of_a_correction_restates_the_same_row() -> None:
    windows = PartitionWindows((HOUR,), grace_ms=0)
    for e in [change(0, 1, "a", 10), change(1, 2, "u", 11, "a"), change(2, 3, "u2", 12, "u")]:
        windows.add(e)
    windows.add(change(3, 61, "t", 0))
    assert closed_keys(windows.close_due()) == [(HOUR, "acme", T0, (12.0,))]


def test_a_stale_duplicate_does_not_bring_back_a_deleted_row() -> None:
    windows = PartitionWindows((HOUR,), grace_ms=0)
    windows.add(change(0, 1, "a", 10))
    windows.add(change(1, 2, "d", 0, "a", deleted=True))
    assert windows.add(change(2, 1, "a", 10)) == []
    windows.add(change(3, 61, "t", 0))
    assert closed_keys(windows.close_due()) == [(HOUR, "acme", T0, ())]


def test_the_outcome_does_not_depend_on_how_events_were_batched() -> None:
    events = [change(0, 30, "a", 5), change(1, 70, "t", 0), change(2, 80, "u", 6, "a")]
    one_by_one = closed_keys(run(PartitionWindows((HOUR,), grace_ms=0), events))
    batched = PartitionWindows((HOUR,), grace_ms=0)
    for e in events:  # one getmany batch: windows are closed once, at its end
        batched.add(e)
    assert closed_keys(batched.close_due()) == one_by_one == [(HOUR, "acme", T0, (5.0,))]


def test_one_firms_event_from_2036_does_not_make_another_firms_next_window_late() -> None:
    state = PartitionWindows((HOUR,), grace_ms=5 * MINUTE_MS)
    state.add(event(0, 10, tenant="b"))
    year_2036 = WindowEvent(1, "a", 2_085_000_000_000, "sales_order_line", 1, {"x": 1.0})
    state.add(year_2036)
    assert state.add(event(2, 20, tenant="b")) == []  # b's open window still takes it
    assert state.add(event(3, 70, tenant="b")) == []  # and b's next window is not late
    assert [(w.tenant, len(w.rows)) for w in state.close_due()] == [("b", 2)]
    # the same after a restart: the commit carries b's watermark, not the partition's
    _, metadata = state.commit_point() or (0, "")
    restored = PartitionWindows.restore((HOUR,), 5 * MINUTE_MS, metadata)
    assert restored.add(event(4, 75, tenant="b")) == []
