"""Archive segments of one Kafka partition: pure state with an exact commit point and restore.

Every record read from an archived topic joins an *open segment* of its partition; a segment is
flushed (written as Parquet objects, see :mod:`services.storage.objects`) when it reaches
``max_bytes`` or when its first record has waited ``max_seconds`` — so an idle partition's data is
durable within that time. Within a flushed segment, records are grouped by ``(tenant, date)``
and each group becomes one object named by its **first offset**:
``<topic>/tenant=<t>/date=<d>/partition=<p>/<first offset>.parquet``.

Two lanes keep late records from making tiny objects. A partition's *date watermark* is the
newest date it has seen; a record dated before it is *late* and joins the late lane's segment,
which is flushed only at ``max_bytes`` or after ``late_max_seconds`` (an hour by default). So
however the late records trickle in, each ``(tenant, date)`` they touch gets about one object
per ``late_max_seconds``, instead of one per flush of the current lane.

Exactly once under crashes, with time-based flushing:

- the offset committed is the first offset of the oldest segment not yet written (or the next
  offset when none is open), so every record not yet in an object is read again after a crash;
- the commit's metadata (:meth:`PartitionSegments.commit_point`) holds the date watermark *as
  it was before that offset* and, per lane, the offset below which that lane's records are all
  written. A restored partition (:meth:`PartitionSegments.restore`) reads from the committed
  offset with that watermark, so it assigns every record to the lane it had, and skips the
  records its lane already wrote: nothing is written twice;
- a segment written but not yet committed (a crash between the two) is written again. Within a
  lane, segments are contiguous runs of offsets from the lane's committed mark, so the segment
  that re-reads a group's first offset ``g`` also starts at or before ``g``: the object named
  ``g`` is overwritten (with the same records, or a prefix or extension of them, the rest going
  to objects whose names the crashed run never wrote). Records of one group in the two lanes
  have different offsets, so their names never meet. The manifest is written after its object
  and overwritten with it; a reader trusts an object only when its manifest matches it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import msgspec
import orjson


class Lane(enum.StrEnum):
    CURRENT = "current"
    LATE = "late"


class ArchivedRecord(msgspec.Struct, frozen=True, gc=False):
    """A record as the archive keeps it: its bytes and coordinates, and what it is about.

    A frozen msgspec ``Struct`` rather than a frozen dataclass: the archive makes one per record
    it reads and replay one per record it restores, and a frozen dataclass costs ~15x as much
    to build (each field set through ``object.__setattr__``). ``gc=False``: a record holds only
    bytes, strings and tuples of them, so it can be in no reference cycle.
    """

    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    tenant: str
    kind: str
    """Event type or insight type."""
    schema_version: int
    at_ms: int
    """Event time (events) or window start (insights): what ``date`` is the day of."""
    visibility: str = "private"

    @property
    def date(self) -> str:
        return day_of(self.at_ms)

    @property
    def size(self) -> int:
        return len(self.value) + len(self.key or b"") + 64


DAY_MS = 86_400_000
_DAYS: dict[int, str] = {}


def day_of(at_ms: int) -> str:
    """``YYYY-MM-DD`` (UTC) of a time in ms since the epoch.

    Read for every record (its lane, its group), so the text of each day is made once: a day is
    ``at_ms // DAY_MS`` (floor division, so times before the epoch fall on the day before)."""
    day = at_ms // DAY_MS
    text = _DAYS.get(day)
    if text is None:
        if len(_DAYS) >= 100_000:  # ~270 years of days: only a stream of odd dates gets here
            _DAYS.clear()
        text = _DAYS[day] = datetime.fromtimestamp(day * 86_400, UTC).strftime("%Y-%m-%d")
    return text


def _epoch_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def describe(
    offset: int,
    timestamp_ms: int,
    key: bytes | None,
    value: bytes,
    headers: Iterable[tuple[str, bytes]] = (),
) -> ArchivedRecord:
    """Read what the archive needs from a clean event or an insight; ``ValueError`` if it is
    neither (the record then goes to the dead-letter topic)."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error}") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    tenant, kind = doc.get("tenant"), doc.get("type")
    if not isinstance(tenant, str) or not tenant or not isinstance(kind, str) or not kind:
        raise ValueError("a record needs a tenant and a type")
    provenance = doc.get("provenance")
    try:
        if isinstance(provenance, dict):  # an insight
            at = provenance.get("window_start") or provenance.get("produced_at")
            version = 1
        else:
            at = doc.get("occurred_at")
            version = doc.get("schema_version", 1)
        if not isinstance(at, str):
            raise ValueError("no event time (occurred_at or window_start)")
        at_ms = _epoch_ms(at)
    except (ValueError, OverflowError) as error:
        raise ValueError(f"unreadable time: {error}") from None
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError("schema_version must be an integer")
    visibility = doc.get("visibility", "private")
    return ArchivedRecord(  # positional (field order): a little cheaper, once per record
        offset,
        timestamp_ms,
        key,
        value,
        tuple(headers),
        tenant,
        kind,
        version,
        at_ms,
        visibility if visibility in ("private", "public") else "private",
    )


@dataclass
class Segment:
    """Records of one lane of one partition, contiguous in that lane's offsets."""

    topic: str
    partition: int
    lane: Lane
    opened_at: float
    watermark: str | None
    """The partition's date watermark just before this segment's first record."""
    records: list[ArchivedRecord] = field(default_factory=list)
    size: int = 0
    _groups: dict[tuple[str, str], list[ArchivedRecord]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _grouped: int = field(default=0, init=False, repr=False, compare=False)

    @property
    def first_offset(self) -> int:
        return self.records[0].offset

    def append(self, record: ArchivedRecord, date: str) -> None:
        """Add the next record of the lane, ``date`` being its :attr:`ArchivedRecord.date`
        (grouped as it comes: the segment is read once)."""
        self.records.append(record)
        self.size += record.size
        group = self._groups.get((record.tenant, date))
        if group is None:
            self._groups[(record.tenant, date)] = [record]
        else:
            group.append(record)
        self._grouped += 1

    def groups(self) -> dict[tuple[str, str], list[ArchivedRecord]]:
        """``(tenant, date)`` -> its records in offset order: one object each."""
        if self._grouped != len(self.records):  # records added other than by append()
            self._groups.clear()
            for record in self.records:
                self._groups.setdefault((record.tenant, record.date), []).append(record)
            self._grouped = len(self.records)
        return dict(self._groups)


@dataclass
class PartitionSegments:
    """The open and flushing segments of one partition, and how to resume them."""

    topic: str
    partition: int
    max_bytes: int
    max_seconds: float
    late_max_seconds: float
    watermark: str | None = None
    skip_below: dict[Lane, int] = field(default_factory=dict)
    """Restored from a commit: records of a lane below its offset are already written."""
    next_offset: int | None = None
    open: dict[Lane, Segment] = field(default_factory=dict)
    flushing: list[Segment] = field(default_factory=list)
    skipped: int = 0

    def add(self, record: ArchivedRecord, now: float) -> Segment | None:
        """Take the next record of the partition; return a segment that is full (to write)."""
        date = day_of(record.at_ms)
        before = self.watermark
        if before is None or date > before:
            lane = Lane.CURRENT
            self.watermark = date
        else:
            lane = Lane.LATE if date < before else Lane.CURRENT
        self.next_offset = record.offset + 1
        if self.skip_below and record.offset < self.skip_below.get(lane, -1):
            self.skipped += 1  # written before a crash; its commit did not happen
            return None
        segment = self.open.get(lane)
        if segment is None:
            segment = self.open[lane] = Segment(
                self.topic, self.partition, lane, now, watermark=before
            )
        segment.append(record, date)
        if segment.size >= self.max_bytes:
            return self._close(lane)
        return None

    def skip_to(self, offset: int) -> None:
        """A record that is not archived (a dead letter) still moves the partition on."""
        self.next_offset = offset + 1

    def due(self, now: float, *, everything: bool = False) -> list[Segment]:
        """Segments whose time is up (or all of them: shutdown, revocation), now flushing."""
        found = []
        for lane, segment in list(self.open.items()):
            limit = self.late_max_seconds if lane is Lane.LATE else self.max_seconds
            if everything or now - segment.opened_at >= limit:
                found.append(self._close(lane))
        return found

    def _close(self, lane: Lane) -> Segment:
        segment = self.open.pop(lane)
        self.flushing.append(segment)
        return segment

    def written(self, segment: Segment) -> None:
        """Every object of ``segment`` (and its manifest) is in its store."""
        self.flushing.remove(segment)

    def _pending(self) -> list[Segment]:
        return [*self.flushing, *self.open.values()]

    def commit_point(self) -> tuple[int, str] | None:
        """``(offset, metadata)`` to commit: a restore from it writes nothing twice and loses
        nothing (module docstring)."""
        if self.next_offset is None:
            return None
        pending = self._pending()
        marks = {}
        for lane in Lane:
            firsts = [s.first_offset for s in pending if s.lane is lane]
            marks[lane] = min(firsts, default=self.next_offset)
            skip = self.skip_below.get(lane)
            if skip is not None and skip > marks[lane] and not firsts:
                marks[lane] = max(marks[lane], skip)
        offset = min(marks.values())
        oldest = min(pending, key=lambda s: s.first_offset, default=None)
        if oldest is not None and oldest.first_offset == offset:
            watermark = oldest.watermark
        else:
            # ``offset`` is the next offset (or, records gone by retention, a lane's restored
            # mark beyond it): the watermark is the one after everything read.
            watermark = self.watermark
        metadata = {"v": 1, "w": watermark, "c": marks[Lane.CURRENT], "l": marks[Lane.LATE]}
        return offset, orjson.dumps(metadata).decode()

    @classmethod
    def restore(
        cls,
        topic: str,
        partition: int,
        metadata: str | None,
        *,
        max_bytes: int,
        max_seconds: float,
        late_max_seconds: float,
    ) -> PartitionSegments:
        """The state to resume from a commit made with :meth:`commit_point` (None: fresh)."""
        doc: dict[str, object] = {}
        if metadata:
            try:
                loaded = orjson.loads(metadata)
                doc = loaded if isinstance(loaded, dict) else {}
            except orjson.JSONDecodeError:
                doc = {}
        watermark = doc.get("w")
        skip = {
            lane: int(value)
            for lane, name in ((Lane.CURRENT, "c"), (Lane.LATE, "l"))
            if isinstance(value := doc.get(name), int)
        }
        return cls(
            topic,
            partition,
            max_bytes=max_bytes,
            max_seconds=max_seconds,
            late_max_seconds=late_max_seconds,
            watermark=watermark if isinstance(watermark, str) else None,
            skip_below=skip,
        )
