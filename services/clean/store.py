"""The clean hop's state on disk: one RocksDB (``rocksdict``) per clean-topic partition.

The store of partition ``p`` is a local copy of what clean partition ``p`` (the changelog)
implies, so losing it costs only a rebuild from Kafka. Keys, all raw bytes:

- ``i`` + event id (16 bytes) -> when the id was cleaned (ms since the epoch, 8 bytes big-endian);
- ``t`` + that time + event id -> empty: the same ids in the order they expire, so forgetting
  everything older than a moment is one ordered scan from the start and a range delete;
- ``w`` + (tenant, metric) -> that rolling window's values in arrival order (float64s);
- ``c`` + (tenant, type, entity, field) -> the last carry-forward value and its event time;
- ``o`` -> the clean-topic offset below which every record is reflected in the windows and
  carry values here (the ids may run ahead of it: adding an id twice changes nothing);
- ``f`` -> :func:`digest` of the record just below that offset, so a store is not trusted
  against a clean topic that was deleted and created again (a fresh local broker).

Every flush is one ``WriteBatch``, so the store is always at a batch boundary, whatever point
a crash interrupts. Its memory is bounded by ``memory_mb`` (write buffers and a block cache
that also holds the index and filter blocks), whatever the number of ids.
"""

from __future__ import annotations

import hashlib
import shutil
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch

from shared.codec import decode, encode

CarryKey = tuple[str, str, tuple[Any, ...], str]
WindowKey = tuple[str, str]

_IDS, _EXPIRY, _WINDOWS, _CARRY, _CHECKPOINT, _TAIL = b"i", b"t", b"w", b"c", b"o", b"f"


def digest(value: bytes | memoryview) -> bytes:
    """What the store keeps of the record below its checkpoint to recognise it."""
    return hashlib.blake2b(value, digest_size=8).digest()


def _stamp(ms: int) -> bytes:
    return max(ms, 0).to_bytes(8, "big")


def _options(memory_mb: int) -> Options:
    budget = max(memory_mb, 1) << 20
    options = Options(raw_mode=True)
    options.create_if_missing(True)
    options.set_write_buffer_size(max(budget // 4, 256 << 10))  # two of them: half the budget
    options.set_max_write_buffer_number(2)
    table = BlockBasedOptions()
    table.set_block_cache(Cache(max(budget // 2, 256 << 10)))  # the other half
    table.set_cache_index_and_filter_blocks(True)
    table.set_bloom_filter(10, False)  # a miss (the usual case: a new id) rarely reads a block
    options.set_block_based_table_factory(table)
    return options


class PartitionStore:
    """The on-disk state of one partition (see the module docstring)."""

    def __init__(self, path: Path, memory_mb: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = Rdict(str(path), _options(memory_mb))

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def destroy(path: Path) -> None:
        """Delete the store at ``path`` (closed) and everything in it."""
        shutil.rmtree(path, ignore_errors=True)

    @property
    def checkpoint(self) -> int | None:
        """The clean-topic offset the windows and carry values are complete up to, if any."""
        value = self.db.get(_CHECKPOINT)
        return None if value is None else int.from_bytes(value, "big")

    @property
    def tail(self) -> bytes | None:
        """:func:`digest` of the clean record at ``checkpoint - 1``, if known."""
        value = self.db.get(_TAIL)
        return None if value is None else bytes(value)

    def seen_since(self, ids: Sequence[bytes], since_ms: int) -> list[bool]:
        """For each 16-byte id: was it cleaned at ``since_ms`` or later? One multi-get."""
        if not ids:
            return []
        since = _stamp(since_ms)
        found = self._get_many([_IDS + event_id for event_id in ids])
        return [at is not None and at >= since for at in found]

    def memory_in_use(self) -> int:
        """Bytes of the write buffers plus the block cache (index and filter blocks included)."""
        tables = self.db.property_int_value("rocksdb.cur-size-all-mem-tables") or 0
        cache = self.db.property_int_value("rocksdb.block-cache-usage") or 0
        return tables + cache

    def write(
        self,
        ids: Mapping[bytes, int],
        windows: Mapping[WindowKey, Sequence[float]] | None = None,
        carry: Mapping[CarryKey, tuple[Any, float]] | None = None,
        checkpoint: int | None = None,
        tail: bytes | None = None,
    ) -> None:
        """Write ``ids`` (id -> when cleaned), the windows and carry values given and the
        checkpoint with the ``tail`` digest (none: unknown) in one atomic batch."""
        batch = WriteBatch(raw_mode=True)
        put = batch.put
        for event_id, cleaned_ms in ids.items():
            stamp = _stamp(cleaned_ms)
            put(_IDS + event_id, stamp)
            put(_EXPIRY + stamp + event_id, b"")
        for (tenant, metric), values in (windows or {}).items():
            put(_WINDOWS + encode([tenant, metric]), array("d", values).tobytes())
        for (tenant, type_name, entity, name), (value, at) in (carry or {}).items():
            put(_CARRY + encode([tenant, type_name, entity, name]), encode([value, at]))
        if checkpoint is not None:
            put(_CHECKPOINT, checkpoint.to_bytes(8, "big"))
            if tail is None:
                batch.delete(_TAIL)
            else:
                put(_TAIL, tail)
        self.db.write(batch)

    def expire(self, before_ms: int, limit: int = 20_000) -> int:
        """Forget the ids cleaned before ``before_ms``, at most ``limit`` of them (the oldest),
        so one call never holds the event loop long; return how many."""
        end = _EXPIRY + _stamp(before_ms)
        expired: list[tuple[bytes, bytes]] = []  # (stamp, id)
        scan = self.db.iter()
        scan.seek(_EXPIRY)
        while scan.valid() and len(expired) < limit:
            key = scan.key()
            if key >= end:
                break
            expired.append((key[1:9], key[9:]))
            scan.next()
        del scan
        if not expired:
            return 0
        end = min(end, _EXPIRY + expired[-1][0] + expired[-1][1] + b"\x00")
        batch = WriteBatch(raw_mode=True)
        current = self._get_many([_IDS + event_id for _, event_id in expired])
        for (stamp, event_id), at in zip(expired, current, strict=True):
            if at == stamp:  # not an id forgotten once and cleaned again since
                batch.delete(_IDS + event_id)
        self.db.write(batch)
        self.db.delete_range(_EXPIRY, end)
        return len(expired)

    def windows(self) -> Iterator[tuple[WindowKey, list[float]]]:
        for key, value in self._prefixed(_WINDOWS):
            tenant, metric = decode(key)
            yield (tenant, metric), array("d", value).tolist()

    def carried(self) -> Iterator[tuple[CarryKey, tuple[Any, float]]]:
        for key, value in self._prefixed(_CARRY):
            tenant, type_name, entity, name = decode(key)
            carried, at = decode(value)
            yield (tenant, type_name, tuple(entity), name), (carried, at)

    def _get_many(self, keys: list[Any]) -> list[bytes | None]:
        found = self.db.get(keys)  # a list of keys: one multi-get, a list of values
        assert isinstance(found, list)
        return found

    def _prefixed(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        scan = self.db.iter()
        scan.seek(prefix)
        while scan.valid():
            key = scan.key()
            if not key.startswith(prefix):
                break
            yield key[len(prefix) :], scan.value()
            scan.next()
