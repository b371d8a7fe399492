"""Event-time tumbling windows per firm, with a grace period for late events.

Every firm (tenant) keeps its own *watermark* within its source partition: the largest event time
it has sent minus the grace period. One firm's clock never moves another firm's windows — an
event dated 2036 from one firm closes that firm's windows only. A window ``[start, end)`` of a
firm accepts events while ``end > watermark`` of that firm and is closed (emitted) once its
watermark reaches ``end``. A firm that has gone quiet can have its windows closed without an event
(:meth:`PartitionWindows.close_quiet`); that raises its watermark to the end of the windows closed.

An event whose window has already closed is *late*: it is returned to the caller (the sizes from
:meth:`PartitionWindows.add`, the events from :meth:`PartitionWindows.take_late`), which may
restate that window (:mod:`.restatements`) or count and drop the event.

Corrections restate a row rather than add one. An event with ``corrects`` set stands for the
row that ``corrects`` names (an earlier event, or a row id that every change of an ERP row
names, or a correction that named one) of the same firm: it takes that row out of every open
window that holds it; a delete ends there, an update or a create then goes into its own window
like any event — late if that window has closed. So a correction that keeps its original's event
time restates the original in its window (or is late with it), and a change stamped with a later
time (an ERP commit time) counts once, as the row's value in the later window.

This keeps restarts exact: whether an update found its row or not, it lands in the same window,
so re-reading from the commit point (below) rebuilds the same open windows.

Restart safety without a state store: the state of a partition is a pure function of its events
from the first offset of its oldest open window on, plus every firm's watermark at that moment.
:meth:`PartitionWindows.commit_point` gives exactly that pair — the offset to commit and the
watermarks to store in the commit's metadata — and :meth:`PartitionWindows.restore` starts from
it, so re-reading the uncommitted span rebuilds the same open windows and re-closes the same
windows (whose insights have deterministic ids, so re-publishing them is harmless). An event
re-read after a restart whose window had closed before it is late again (it was counted in that
window, or restated into it, the first time).

The metadata is compact: a watermark is only ever compared with window ends, which are multiples
of the greatest common divisor of the window sizes (an hour for hourly and daily windows), so it
is stored floored to that unit — the same decisions follow, exactly — and firms with the same
watermark share one entry: ``{"u": unit_s, "w": {"<units>": "firm firm ..."}}``, zlib-compressed
(``"z"``) when that is shorter. Kafka keeps at most ``offset.metadata.max.bytes`` (4096 by
default) of it; firms that do not fit within ``max_bytes`` are left out, those that have been
quiet longest first (never one with an open window or an event at or after the committed
offset while others can go), and ``"d"`` says the largest watermark among them. On restore the
caller may give the full metadata back (``full``: the service keeps it in its local state
store under the reference ``"n"`` the commit carries), which is exact; without it (a new disk)
a left-out firm is taken as closed through ``"d"``: its events for windows it had not closed are
late rather than counted twice, never the other way round.

An event whose own window already took its id (even if a correction took it out again) is a
duplicate and is not counted again; one whose window has closed is late anyway. A firm's windows
its watermark has passed are closed before its next event is put anywhere, so the outcome is the
same however the events were batched.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

KAFKA_METADATA_MAX_BYTES = 4096
"""Kafka's default ``offset.metadata.max.bytes``: the most metadata a commit may carry."""


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
    revision: int = 1
    """1 when it first closes; each restatement with late events adds one."""

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.size_s * 1000

    @property
    def key(self) -> WindowKey:
        return self.size_s, self.tenant, self.start_ms

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

RowKey = tuple[str, str]
"""(tenant, row id): a correction reaches only its own firm's rows."""


@dataclass(frozen=True, slots=True)
class LateEvent:
    """An event whose window ``key`` had closed, standing for row ``row`` of its firm."""

    key: WindowKey
    event: WindowEvent
    row: str


@dataclass
class PartitionWindows:
    """Open windows and the firms' watermarks of one source partition."""

    sizes_s: tuple[int, ...]
    grace_ms: int
    watermarks: dict[str, int] = field(default_factory=dict)
    """Firm -> its watermark: its largest event time minus grace, or the end of the windows
    :meth:`close_quiet` closed, whichever is later."""
    default_watermark_ms: int | None = None
    """Watermark of a firm not in ``watermarks``: set when restored from metadata that had to
    leave firms out."""
    next_offset: int | None = None
    last_offset: dict[str, int] = field(default_factory=dict)
    """Firm -> offset of its latest event (which firms a restart re-reads)."""
    open: dict[WindowKey, Window] = field(default_factory=dict)
    holding: dict[RowKey, list[WindowKey]] = field(default_factory=dict)
    """Row -> the open windows that hold it (so a correction finds its original)."""
    aliases: dict[RowKey, str] = field(default_factory=dict)
    """Id of a correction in an open window -> the row it stands for (a correction of a
    correction restates the same row)."""
    full_metadata: str | None = None
    """Set by :meth:`commit_point` when firms were left out of its metadata: all of them."""
    store_token: str | None = None
    """Names the local state store that holds what this state closed (carried in commits)."""
    committed_token: str | None = None
    """The store token of the commit this state was restored from."""
    _aliases_of: dict[RowKey, list[str]] = field(default_factory=dict)
    _closed: list[Window] = field(default_factory=list)
    _late: list[LateEvent] = field(default_factory=list)
    _ends: dict[str, list[tuple[int, WindowKey]]] = field(default_factory=dict)
    """Per firm, heap of (end, key) of its open windows: what its watermark passes."""

    @property
    def unit_ms(self) -> int:
        """Every window end is a multiple of this (the gcd of the window sizes)."""
        return math.gcd(*self.sizes_s) * 1000

    def watermark_of(self, tenant: str) -> int | None:
        return self.watermarks.get(tenant, self.default_watermark_ms)

    @property
    def heard_of(self) -> bool:
        """Whether any firm's watermark is known (from an event or a restored commit)."""
        return bool(self.watermarks) or self.default_watermark_ms is not None

    def add(self, event: WindowEvent) -> list[int]:
        """Put ``event`` in its firm's windows; return the sizes for which it came too late
        (those events are kept for :meth:`take_late`)."""
        self.next_offset = event.offset + 1
        tenant = event.tenant
        # The firm's windows its watermark has passed are closed before its next event touches
        # them, so the outcome is the same however the events were batched.
        self._close_passed(tenant)
        row = (
            self.aliases.get((tenant, event.corrects), event.corrects)
            if event.corrects is not None
            else event.event_id
        )
        keys = [(size, tenant, window_start_ms(event.time_ms, size)) for size in self.sizes_s]
        if event.event_id:
            for key in keys:
                window = self.open.get(key)
                if window is not None and event.event_id in window.seen_ids:
                    # The same event again: clean drops duplicates, but a clean worker that lost
                    # its partition and has not noticed yet can still publish one. Its window
                    # took it once.
                    return []
        self.last_offset[tenant] = event.offset
        known = self.watermark_of(tenant)
        watermark = event.time_ms - self.grace_ms
        if known is not None and known > watermark:
            watermark = known
        self.watermarks[tenant] = watermark
        if event.corrects is not None:
            self._take_out((tenant, row))
            if event.deleted:
                self._forget((tenant, row))
                self._late += [
                    LateEvent(k, event, row) for k in keys if k[2] + k[0] * 1000 <= watermark
                ]
                return []
        if not event.metrics:
            return []
        late: list[int] = []
        for key in keys:
            size, _, start = key
            if start + size * 1000 <= watermark:
                late.append(size)
                self._late.append(LateEvent(key, event, row))
                continue
            window = self.open.get(key)
            if window is None:
                window = self.open[key] = Window(size, tenant, start, event.offset)
                heapq.heappush(self._ends.setdefault(tenant, []), (window.end_ms, key))
            window.add(event, row)
            self.holding.setdefault((tenant, row), []).append(key)
        if event.corrects is not None and event.event_id and len(late) < len(self.sizes_s):
            self.aliases[(tenant, event.event_id)] = row
            self._aliases_of.setdefault((tenant, row), []).append(event.event_id)
        return late

    def take_late(self) -> list[LateEvent]:
        """The events (and deletes) that came after their window had closed, since last asked."""
        late, self._late = self._late, []
        return late

    def _take_out(self, row: RowKey) -> None:
        for key in self.holding.pop(row, []):
            window = self.open.get(key)
            if window is not None:
                window.remove(row[1])

    def _forget(self, row: RowKey) -> None:
        """The row is in no open window any more: its corrections' ids need no lookup."""
        if row not in self.holding:
            for alias in self._aliases_of.pop(row, ()):
                self.aliases.pop((row[0], alias), None)

    def _close_passed(self, tenant: str) -> None:
        watermark = self.watermarks.get(tenant)
        ends = self._ends.get(tenant)
        if watermark is None or not ends:
            return
        while ends and ends[0][0] <= watermark:
            _, key = heapq.heappop(ends)
            window = self.open.pop(key, None)
            if window is None:
                continue
            self._closed.append(window)
            for row_id in window.row_ids:
                row = (tenant, row_id)
                keys = self.holding.get(row)
                if keys is not None and key in keys:
                    keys.remove(key)
                    if not keys:
                        del self.holding[row]
                        self._forget(row)
        if not ends:
            del self._ends[tenant]

    def close_quiet(self, tenant: str, upto_ms: int) -> bool:
        """Close the firm's open windows that end by ``upto_ms`` without waiting for its next
        event (it has gone quiet); its watermark moves to the latest end closed. True if any."""
        ends = [end for end, key in self._ends.get(tenant, ()) if end <= upto_ms]
        if not ends:
            return False
        known = self.watermark_of(tenant)
        self.watermarks[tenant] = max(ends) if known is None else max(known, max(ends))
        self._close_passed(tenant)
        return True

    def close_due(self) -> list[Window]:
        """Remove and return the windows their firms' watermarks have passed, oldest first."""
        for tenant in list(self._ends):
            self._close_passed(tenant)
        closed, self._closed = self._closed, []
        closed.sort(key=lambda w: (w.start_ms, w.size_s, w.tenant))
        return closed

    def open_tenants(self) -> set[str]:
        return set(self._ends)

    def network_watermark(self, waited_for: Iterable[str], max_lag_ms: int) -> int | None:
        """How far the partition has closed windows for the network: the smallest watermark of
        the firms ``waited_for`` (those not quiet), leaving out firms more than ``max_lag_ms``
        behind their median (a clock stuck in the past, a firm only back-filling). One firm's
        clock running ahead moves nothing; None when no firm is waited for."""
        marks = sorted(self.watermarks[t] for t in waited_for if t in self.watermarks)
        if not marks:
            return None
        median = marks[(len(marks) - 1) // 2]
        return next(mark for mark in marks if mark >= median - max_lag_ms)

    def commit_point(self, max_bytes: int = KAFKA_METADATA_MAX_BYTES) -> tuple[int, str] | None:
        """``(offset, metadata)`` to commit: re-reading from there rebuilds this state. The
        metadata fits in ``max_bytes``; when firms had to be left out, :attr:`full_metadata`
        holds them all (see the module docstring)."""
        if self.next_offset is None:
            return None
        offset = min((w.first_offset for w in self.open.values()), default=self.next_offset)
        self.full_metadata = None
        full = encode_watermarks(
            self.watermarks, self.unit_ms, self.default_watermark_ms, token=self.store_token
        )
        if len(full.encode()) <= max_bytes:
            return offset, full
        self.full_metadata = full
        needed = self.open_tenants() | {t for t, at in self.last_offset.items() if at >= offset}
        # the firms heard from most recently first; those a restart re-reads before all
        ranked = sorted(
            self.watermarks, key=lambda t: (t not in needed, -self.last_offset.get(t, -1), t)
        )
        reference = hashlib.sha256(full.encode()).hexdigest()[:16]
        low, high = 0, len(ranked)  # the most firms that fit: binary search
        while low < high:
            mid = (low + high + 1) // 2
            if len(self._truncated(ranked, mid, reference).encode()) <= max_bytes:
                low = mid
            else:
                high = mid - 1
        return offset, self._truncated(ranked, low, reference)

    def _truncated(self, ranked: list[str], keep: int, reference: str) -> str:
        kept = {t: self.watermarks[t] for t in ranked[:keep]}
        left_out = [self.watermarks[t] for t in ranked[keep:]]
        if self.default_watermark_ms is not None:
            left_out.append(self.default_watermark_ms)
        default = max(left_out) if left_out else None
        return encode_watermarks(kept, self.unit_ms, default, reference, self.store_token)

    @classmethod
    def restore(
        cls,
        sizes_s: tuple[int, ...],
        grace_ms: int,
        metadata: str | None,
        full: Callable[[str], str | None] | None = None,
    ) -> PartitionWindows:
        """State to resume from a commit made with :meth:`commit_point`. ``full`` finds the
        complete metadata by the reference of one that left firms out (None: not kept)."""
        doc = decode_metadata(metadata)
        reference = doc.get("n")
        if isinstance(reference, str) and full is not None:
            complete = decode_metadata(full(reference))
            if complete:
                doc = complete
        watermarks, default = watermarks_of(doc, grace_ms)
        token = doc.get("s")
        return cls(
            sizes_s,
            grace_ms,
            watermarks=watermarks,
            default_watermark_ms=default,
            committed_token=token if isinstance(token, str) else None,
        )


def encode_watermarks(
    watermarks: Mapping[str, int],
    unit_ms: int,
    default: int | None,
    reference: str | None = None,
    token: str | None = None,
) -> str:
    """Compact commit metadata of the firms' watermarks, floored to ``unit_ms``."""
    groups: dict[int, list[str]] = {}
    for tenant, mark in watermarks.items():
        groups.setdefault(mark // unit_ms, []).append(tenant)
    doc: dict[str, Any] = {
        "u": unit_ms // 1000,
        "w": {str(units): " ".join(sorted(names)) for units, names in sorted(groups.items())},
    }
    if default is not None:
        doc["d"] = default // unit_ms
    if reference is not None:
        doc["n"] = reference
    if token is not None:
        doc["s"] = token
    text = orjson.dumps(doc)
    packed = b'{"z":"' + base64.b64encode(zlib.compress(text, 9)) + b'"}'
    return min(text, packed, key=len).decode()


def decode_metadata(metadata: str | None) -> dict[str, Any]:
    """The document of commit metadata (unpacked); empty when there is none or it is unreadable."""
    if not metadata:
        return {}
    try:
        doc = orjson.loads(metadata)
        if isinstance(doc, dict) and isinstance(doc.get("z"), str):
            doc = orjson.loads(zlib.decompress(base64.b64decode(doc["z"])))
    except (ValueError, zlib.error):
        return {}
    return doc if isinstance(doc, dict) else {}


def watermarks_of(doc: Mapping[str, Any], grace_ms: int) -> tuple[dict[str, int], int | None]:
    """Firm watermarks and the default for the rest, from a metadata document. A commit made
    before watermarks were per firm (``stream_time_ms`` of the partition) gives every firm the
    partition's watermark: the windows closed then stay closed."""
    legacy = doc.get("stream_time_ms")
    if isinstance(legacy, int):
        return {}, legacy - grace_ms
    try:
        unit = int(doc["u"]) * 1000
        groups = doc["w"]
        watermarks = {
            tenant: int(units) * unit for units, names in groups.items() for tenant in names.split()
        }
        default = doc.get("d")
        return watermarks, None if default is None else int(default) * unit
    except (KeyError, TypeError, ValueError, AttributeError):
        return {}, None
