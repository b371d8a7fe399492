"""Event-time tumbling windows per source partition, with a grace period for late events.

Each source partition keeps its own *stream time* (the largest event time it has seen); its
*watermark* is stream time minus the grace period. A window ``[start, end)`` accepts events while
``end > watermark`` and is closed (emitted) once the watermark reaches ``end``. An event whose
window is already closed is *late*: it is counted and dropped, never emitted as a revision, so a
window's insights are final once published.

Corrections restate a row rather than add one. An event with ``corrects`` set stands for the
row that ``corrects`` names (an earlier event, or a row id that every change of an ERP row
names, or a correction that named one): it takes that row out of every open window that holds
it; a delete ends there, an update or a create then goes into its own window like any event —
late if that window has closed. So a correction that keeps its original's event time restates
the original in its window (or is late with it), and a change stamped with a later time (an ERP
commit time) counts once, as the row's value in the later window; windows already closed keep
the earlier value (they are final).

This keeps restarts exact: whether an update found its row or not, it lands in the same window,
so re-reading from the commit point (below) rebuilds the same open windows.

Restart safety without a state store: the state of a partition is a pure function of its events
from the first offset of its oldest open window on, plus its stream time at that moment.
:meth:`PartitionWindows.commit_point` gives exactly that pair — the offset to commit and the
stream time to store in the commit's metadata — and :meth:`PartitionWindows.restore` starts
from it, so re-reading the uncommitted span rebuilds the same open windows and re-closes the same
windows (whose insights have deterministic ids, so re-publishing them is harmless). An event
re-read after a restart whose window had closed before it is skipped as late (it was counted in
that window, or dropped, the first time); the late-events counter counts it again.

An event whose own window already took its id (even if a correction took it out again) is a
duplicate and is not counted again; one whose window has closed is late anyway. Windows the
stream time has passed are closed before the next event is put anywhere, so the outcome is the
same however the events were batched.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import orjson


@dataclass(frozen=True, slots=True)
class WindowEvent:
    """What a window needs of one clean event."""

    offset: int
    tenant: str
    time_ms: int
    event_type: str
    schema_version: int
    metrics: dict[str, float]
    event_id: str = ""
    corrects: str | None = None
    deleted: bool = False


@dataclass(slots=True)
class Window:
    """The events of one firm in one tumbling window (still open, or just closed)."""

    size_s: int
    tenant: str
    start_ms: int
    first_offset: int
    times_ms: list[int] = field(default_factory=list)
    rows: list[dict[str, float]] = field(default_factory=list)
    schema_versions: dict[str, int] = field(default_factory=dict)
    row_ids: list[str] = field(default_factory=list)
    seen_ids: set[str] = field(default_factory=set)
    """Ids of every event this window took, also those a correction took out again."""

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.size_s * 1000

    def add(self, event: WindowEvent, row_id: str) -> None:
        self.times_ms.append(event.time_ms)
        self.rows.append(event.metrics)
        self.row_ids.append(row_id)
        if event.event_id:
            self.seen_ids.add(event.event_id)
        known = self.schema_versions.get(event.event_type, 0)
        self.schema_versions[event.event_type] = max(known, event.schema_version)

    def remove(self, row_id: str) -> bool:
        """Take out the row ``row_id`` (the event a correction replaces); False if absent."""
        try:
            index = self.row_ids.index(row_id)
        except ValueError:
            return False
        del self.row_ids[index], self.times_ms[index], self.rows[index]
        return True


def window_start_ms(time_ms: int, size_s: int) -> int:
    """Start of the tumbling window of ``size_s`` seconds (aligned on the Unix epoch, UTC)."""
    size_ms = size_s * 1000
    return time_ms - time_ms % size_ms


WindowKey = tuple[int, str, int]
"""(size in seconds, tenant, start in ms)."""


@dataclass
class PartitionWindows:
    """Open windows and stream time of one source partition."""

    sizes_s: tuple[int, ...]
    grace_ms: int
    stream_time_ms: int | None = None
    next_offset: int | None = None
    open: dict[WindowKey, Window] = field(default_factory=dict)
    holding: dict[str, list[WindowKey]] = field(default_factory=dict)
    """Row id -> the open windows that hold it (so a correction finds its original)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Id of a correction in an open window -> the row it stands for (a correction of a
    correction restates the same row)."""
    _aliases_of: dict[str, list[str]] = field(default_factory=dict)
    _closed: list[Window] = field(default_factory=list)
    _ends: list[tuple[int, WindowKey]] = field(default_factory=list)
    """Heap of (end, key) of the open windows: what the stream time passes, in O(log n)."""

    @property
    def watermark_ms(self) -> int | None:
        return None if self.stream_time_ms is None else self.stream_time_ms - self.grace_ms

    def add(self, event: WindowEvent) -> list[int]:
        """Put ``event`` in its windows; return the sizes for which it came too late."""
        self.next_offset = event.offset + 1
        # Windows the stream time has passed are closed before the next event touches them, so
        # the outcome is the same however the events were batched.
        self._close_passed()
        row = (
            self.aliases.get(event.corrects, event.corrects)
            if event.corrects is not None
            else event.event_id
        )
        keys = [(size, event.tenant, window_start_ms(event.time_ms, size)) for size in self.sizes_s]
        if event.event_id:
            for key in keys:
                window = self.open.get(key)
                if window is not None and event.event_id in window.seen_ids:
                    # The same event again: clean drops duplicates, but a clean worker that lost
                    # its partition and has not noticed yet can still publish one. Its window
                    # took it once.
                    return []
        if self.stream_time_ms is None or event.time_ms > self.stream_time_ms:
            self.stream_time_ms = event.time_ms
        if event.corrects is not None:
            self._take_out(row)
            if event.deleted:
                self._forget(row)
                return []
        if not event.metrics:
            return []
        watermark = self.stream_time_ms - self.grace_ms
        late: list[int] = []
        for key in keys:
            size, _, start = key
            if start + size * 1000 <= watermark:
                late.append(size)
                continue
            window = self.open.get(key)
            if window is None:
                window = self.open[key] = Window(size, event.tenant, start, event.offset)
                heapq.heappush(self._ends, (window.end_ms, key))
            window.add(event, row)
            self.holding.setdefault(row, []).append(key)
        if event.corrects is not None and event.event_id and len(late) < len(self.sizes_s):
            self.aliases[event.event_id] = row
            self._aliases_of.setdefault(row, []).append(event.event_id)
        return late

    def _take_out(self, row_id: str) -> None:
        for key in self.holding.pop(row_id, []):
            window = self.open.get(key)
            if window is not None:
                window.remove(row_id)

    def _forget(self, row_id: str) -> None:
        """The row is in no open window any more: its corrections' ids need no lookup."""
        if row_id not in self.holding:
            for alias in self._aliases_of.pop(row_id, ()):
                self.aliases.pop(alias, None)

    def _close_passed(self) -> None:
        watermark = self.watermark_ms
        if watermark is None:
            return
        while self._ends and self._ends[0][0] <= watermark:
            _, key = heapq.heappop(self._ends)
            window = self.open.pop(key, None)
            if window is None:
                continue
            self._closed.append(window)
            for row_id in window.row_ids:
                keys = self.holding.get(row_id)
                if keys is not None and key in keys:
                    keys.remove(key)
                    if not keys:
                        del self.holding[row_id]
                        self._forget(row_id)

    def close_due(self) -> list[Window]:
        """Remove and return the windows the watermark has passed, oldest first."""
        self._close_passed()
        closed, self._closed = self._closed, []
        closed.sort(key=lambda w: (w.start_ms, w.size_s, w.tenant))
        return closed

    def commit_point(self) -> tuple[int, str] | None:
        """``(offset, metadata)`` to commit: re-reading from there rebuilds this state."""
        if self.next_offset is None:
            return None
        offset = min((w.first_offset for w in self.open.values()), default=self.next_offset)
        return offset, orjson.dumps({"stream_time_ms": self.stream_time_ms}).decode()

    @classmethod
    def restore(
        cls, sizes_s: tuple[int, ...], grace_ms: int, metadata: str | None
    ) -> PartitionWindows:
        """State to resume from a commit made with :meth:`commit_point`."""
        stream_time: int | None = None
        if metadata:
            try:
                value = orjson.loads(metadata).get("stream_time_ms")
            except (orjson.JSONDecodeError, AttributeError):
                value = None
            stream_time = value if isinstance(value, int) else None
        return cls(sizes_s, grace_ms, stream_time_ms=stream_time)
