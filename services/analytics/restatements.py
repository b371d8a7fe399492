"""Closed firm windows kept on disk, so that late events restate them instead of being dropped.

A back-fill, a nightly file drop or a change-data snapshot brings events for windows of a firm
that have already closed. Each closed window's rows are kept in a RocksDB store under the
service's ``state_dir`` (``analytics-restatements``) for ``analytics_restatement_days`` of the
firm's own event time. A late event goes into its stored window (a correction replaces the row
it names there, a delete removes it) and the window's statistics and correlation are published
again as the next *revision* (:func:`revise`): a new deterministic insight id, ``revision`` one
more, ``provenance.restates`` the id it replaces, computed over the original rows plus the late
ones. Benchmarks are never revised: a late firm misses that window's benchmark.

Idempotence: a stored window keeps the ids of every event it took, so an event read again after
a restart is a duplicate. A window is written before its revision is published and marked
published after Kafka acknowledged it; a worker that restarts in between publishes the pending
revisions again (same ids, same content) before reading on. A window closed again after a restart
(its events re-read) keeps what is stored: it may already have been restated.

What is not restated, counted as late (``xietong_analytics_late_events_total``) and logged with
the reason, as before: an event for a window beyond the horizon; for a window that closed with
no row of its firm (nothing was published to restate); and for any window closed before this
store held the partition — after a restart on a new disk, or when the partition moved from
another worker (the commit metadata names the store that wrote it; a store that did not write
the last commit drops what it holds of the partition and starts over from there).
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
from rocksdict import Rdict

from schemas.insights import Correlation, Insight, Statistics
from services.analytics.windows import Window, WindowKey


def revision_id(first: uuid.UUID, revision: int) -> uuid.UUID:
    """The id of ``revision`` of the insight whose first revision has id ``first``."""
    return first if revision == 1 else uuid.uuid5(first, f"revision {revision}")


def revise(insights: Sequence[Insight], revision: int) -> list[Insight]:
    """The insights of a restated window as its ``revision``."""
    if revision == 1:
        return list(insights)
    out: list[Insight] = []
    for insight in insights:
        if not isinstance(insight, Statistics | Correlation):
            continue
        first = insight.insight_id
        provenance = insight.provenance.model_copy(
            update={"restates": revision_id(first, revision - 1)}
        )
        out.append(
            insight.model_copy(
                update={
                    "insight_id": revision_id(first, revision),
                    "revision": revision,
                    "provenance": provenance,
                }
            )
        )
    return out


def _dump(window: Window, published: bool) -> bytes:
    return orjson.dumps(
        {
            "size_s": window.size_s,
            "tenant": window.tenant,
            "start_ms": window.start_ms,
            "times_ms": window.times_ms,
            "rows": window.rows,
            "schema_versions": window.schema_versions,
            "row_ids": window.row_ids,
            "seen_ids": sorted(window.seen_ids),
            "revision": window.revision,
            "published": published,
        }
    )


def _load(value: bytes) -> tuple[Window, bool]:
    d: dict[str, Any] = orjson.loads(value)
    window = Window(
        size_s=d["size_s"],
        tenant=d["tenant"],
        start_ms=d["start_ms"],
        first_offset=-1,
        times_ms=d["times_ms"],
        rows=d["rows"],
        schema_versions=d["schema_versions"],
        row_ids=d["row_ids"],
        seen_ids=set(d["seen_ids"]),
        revision=d["revision"],
    )
    return window, bool(d["published"])


class RestatementStore:
    """Closed windows per (source topic, partition), on disk."""

    def __init__(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(path))

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def _prefix(source: str, partition: int) -> str:
        return f"w|{source}|{partition:06d}|"

    def _key(self, source: str, partition: int, key: WindowKey) -> str:
        size, tenant, start = key
        return f"{self._prefix(source, partition)}{tenant}|{size:08d}|{start:017d}"

    def _scan(self, prefix: str) -> Iterator[tuple[str, bytes]]:
        for key, value in self.db.items(from_key=prefix):
            if not str(key).startswith(prefix):
                break
            yield str(key), value

    # ------------------------------------------------------------------ ownership

    def token(self, source: str, partition: int) -> str | None:
        value = self.db.get(f"t|{source}|{partition:06d}")
        return None if value is None else str(value)

    def claim(self, source: str, partition: int, committed_token: str | None) -> str:
        """This store's token for the partition, after dropping what it holds of it unless it
        wrote the last commit (``committed_token``): then what it holds is current."""
        mine = self.token(source, partition)
        if mine is not None and mine == committed_token:
            return mine
        for key, _ in list(self._scan(self._prefix(source, partition))):
            del self.db[key]
        fresh = secrets.token_hex(6)
        self.db[f"t|{source}|{partition:06d}"] = fresh
        return fresh

    def keep_full_metadata(self, source: str, partition: int, reference: str, full: str) -> None:
        """The complete metadata of a commit that had to leave firms out (the last three)."""
        key = f"c|{source}|{partition:06d}"
        value = self.db.get(key)
        kept = [] if value is None else orjson.loads(value)
        kept = [*[k for k in kept if k[0] != reference][-2:], [reference, full]]
        self.db[key] = orjson.dumps(kept)

    def full_metadata(self, source: str, partition: int) -> Callable[[str], str | None]:
        value = self.db.get(f"c|{source}|{partition:06d}")
        kept = {} if value is None else {k[0]: k[1] for k in orjson.loads(value)}
        return kept.get

    # ------------------------------------------------------------------ windows

    def get(self, source: str, partition: int, key: WindowKey) -> Window | None:
        value = self.db.get(self._key(source, partition, key))
        return None if value is None else _load(value)[0]

    def keep_closed(self, source: str, partition: int, window: Window) -> None:
        """A window just closed: kept, unless already stored (closed before a restart, and
        maybe restated since)."""
        key = self._key(source, partition, window.key)
        if self.db.get(key) is None:
            self.db[key] = _dump(window, published=True)

    def put_revision(self, source: str, partition: int, window: Window) -> None:
        """A restated window, to publish."""
        self.db[self._key(source, partition, window.key)] = _dump(window, published=False)

    def published(self, source: str, partition: int, windows: Sequence[Window]) -> None:
        for window in windows:
            self.db[self._key(source, partition, window.key)] = _dump(window, published=True)

    def pending(self, source: str, partition: int) -> list[Window]:
        """Revisions written but perhaps not published (a restart in between)."""
        out = []
        for _, value in self._scan(self._prefix(source, partition)):
            window, published = _load(value)
            if not published:
                out.append(window)
        return out

    def forget_before(
        self, source: str, partition: int, tenant: str, size_s: int, end_ms: int
    ) -> None:
        """Drop the firm's stored windows of ``size_s`` that end at or before ``end_ms``."""
        prefix = f"{self._prefix(source, partition)}{tenant}|{size_s:08d}|"
        for key, _ in list(self._scan(prefix)):
            start = int(key.rsplit("|", 1)[1])
            if start + size_s * 1000 > end_ms:
                break
            del self.db[key]
