"""Per-firm text statistics over event-time tumbling windows, with an exact commit point.

A window ``[start, start + size)`` of a firm (tenant) counts the firm's texts that occurred in
it: languages, the documents each term appears in, and the classes its texts got. A firm's
*watermark* is the largest event time it has sent minus the grace period; a window closes (its
summary is emitted) once the firm's watermark reaches its end. One firm's clock never closes
another firm's windows. A text whose window has already closed is *late*: it still gets its
per-document insight, but no summary counts it (summaries are never restated).

Restart safety without a state store (the pattern of :mod:`services.analytics.windows`): the
state of a partition is a pure function of its texts from the first offset of its oldest open
window on, plus, per firm, the end of the last window it closed. :meth:`PartitionTexts.commit_point`
gives exactly that — the offset to commit and compact metadata — and
:meth:`PartitionTexts.restore` starts from it, so re-reading the uncommitted span rebuilds the
same open windows and closes the same windows (their summaries have deterministic ids, so a
summary re-emitted after a crash is the same insight). The metadata also carries ``p``, the
offset up to which per-document insights are acknowledged: texts re-read below it feed the
windows only, so a restart re-publishes no per-document insight it had already published.
A closing decision depends only on ``closed through``: a window whose end the watermark had
passed was closed, so it is at or before that mark; storing the mark (in window units) keeps
every decision exact.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import orjson

KAFKA_METADATA_MAX_BYTES = 4096


@dataclass
class TextWindow:
    """What one firm's texts of one window add up to."""

    tenant: str
    start_ms: int
    end_ms: int
    first_offset: int
    documents: int = 0
    languages: Counter[str] = field(default_factory=Counter)
    terms: Counter[str] = field(default_factory=Counter)
    classes: dict[str, Counter[str]] = field(default_factory=dict)


class TextEvent(NamedTuple):
    """What a window needs of one analysed text."""

    offset: int
    tenant: str
    time_ms: int
    language: str
    terms: tuple[str, ...]
    task: str | None
    label: str | None


class PartitionTexts:
    """Open windows of every firm of one source partition."""

    def __init__(
        self,
        size_s: int,
        grace_ms: int,
        *,
        closed_through: dict[str, int] | None = None,
        published: int = -1,
        default_closed: int = -(2**62),
    ) -> None:
        self.size_ms = size_s * 1000
        self.grace_ms = grace_ms
        self.open: dict[tuple[str, int], TextWindow] = {}
        self.watermarks: dict[str, int] = {}
        self.closed_through: dict[str, int] = dict(closed_through or {})
        """Tenant -> end (ms) of the last window it closed."""
        self.published = published
        """Per-document insights below this offset are acknowledged."""
        self.next_offset: int | None = None
        self.late = 0
        self.default_closed = default_closed
        """Closed-through mark of a firm the metadata left out."""

    def add(self, event: TextEvent) -> bool:
        """Count ``event`` in its window; False when that window had closed (late)."""
        self.seen(event.offset)
        tenant = event.tenant
        start = event.time_ms - event.time_ms % self.size_ms
        end = start + self.size_ms
        mark = event.time_ms - self.grace_ms
        if mark > self.watermarks.get(tenant, -(2**62)):
            self.watermarks[tenant] = mark
        if end <= self.closed_through.get(tenant, self.default_closed):
            self.late += 1
            return False
        window = self.open.get((tenant, start))
        if window is None:
            window = self.open[(tenant, start)] = TextWindow(tenant, start, end, event.offset)
        window.documents += 1
        window.languages[event.language] += 1
        window.terms.update(set(event.terms))
        if event.task is not None and event.label is not None:
            window.classes.setdefault(event.task, Counter())[event.label] += 1
        return True

    def seen(self, offset: int) -> None:
        """A record at ``offset`` was read (a text or anything else: the commit may pass it)."""
        if self.next_offset is None or offset >= self.next_offset:
            self.next_offset = offset + 1

    def close_due(self) -> list[TextWindow]:
        """Windows whose firm's watermark reached their end, oldest first; they leave the state."""
        due = [w for w in self.open.values() if w.end_ms <= self.watermarks.get(w.tenant, -(2**62))]
        due.sort(key=lambda w: (w.end_ms, w.tenant))
        for window in due:
            del self.open[(window.tenant, window.start_ms)]
            if window.end_ms > self.closed_through.get(window.tenant, -(2**62)):
                self.closed_through[window.tenant] = window.end_ms
        return due

    def commit_point(self, max_bytes: int = KAFKA_METADATA_MAX_BYTES) -> tuple[int, str] | None:
        """``(offset, metadata)`` to commit: re-reading from there rebuilds this state."""
        if self.next_offset is None:
            return None
        offset = min((w.first_offset for w in self.open.values()), default=self.next_offset)
        through = {t: end // self.size_ms for t, end in self.closed_through.items()}
        doc = {"u": self.size_ms // 1000, "c": through, "p": self.published}
        text = orjson.dumps(doc).decode()
        if len(text) > max_bytes:  # keep the firms with open windows, the latest closes first
            keep = {w.tenant for w in self.open.values()}
            ranked = sorted(through, key=lambda t: (t not in keep, -through[t]))
            while len(text) > max_bytes and ranked:
                dropped = ranked.pop()
                doc["d"] = max(int(str(doc.get("d", 0))), through[dropped])
                del through[dropped]
                text = orjson.dumps(doc).decode()
        return offset, text

    @classmethod
    def restore(cls, size_s: int, grace_ms: int, metadata: str | None) -> PartitionTexts:
        """State to resume from a commit made with :meth:`commit_point` (None: a fresh start).

        A firm left out of the metadata (``d``) is taken as closed through the largest mark
        left out: its texts for windows it may have closed are late rather than counted twice."""
        try:
            doc = orjson.loads(metadata) if metadata else {}
        except orjson.JSONDecodeError:
            doc = {}
        if not isinstance(doc, dict) or doc.get("u") != size_s:
            return cls(size_s, grace_ms)  # none, unreadable, or another window size: fresh
        size_ms = size_s * 1000
        through = {str(t): int(units) * size_ms for t, units in dict(doc.get("c", {})).items()}
        default = int(doc["d"]) * size_ms if "d" in doc else -(2**62)
        return cls(
            size_s,
            grace_ms,
            closed_through=through,
            published=int(doc.get("p", -1)),
            default_closed=default,
        )
