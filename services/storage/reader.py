"""Reading the archive back: find the manifests of a topic, tenant and time range in both
stores, and the records of an object checked against its manifest (history, catalog, replay)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from services.storage.objects import ArchiveMismatch, Manifest, verify
from services.storage.segments import ArchivedRecord, day_of
from services.storage.stores import Store


@dataclass(frozen=True)
class Found:
    store: Store
    manifest: Manifest


class ArchiveReader:
    """Manifests are immutable once their object is final: they are cached by key and size."""

    def __init__(self, stores: dict[str, Store], concurrency: int = 16) -> None:
        self.stores = stores
        self._cache: dict[tuple[str, str, int], Manifest] = {}
        self._limit = asyncio.Semaphore(concurrency)

    async def tenants(self, topic: str) -> set[str]:
        found: set[str] = set()
        for store in self.stores.values():
            for prefix in await store.prefixes(f"{topic}/"):
                name = prefix.rstrip("/").rsplit("/", 1)[-1]
                if name.startswith("tenant="):
                    found.add(name.removeprefix("tenant="))
        return found

    async def manifests(
        self,
        topic: str,
        tenants: Iterable[str],
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[Found]:
        """Manifests of ``topic`` for ``tenants`` whose dates meet ``[start, end)``."""
        first_day = day_of(int(start.timestamp() * 1000)) if start else None
        last_day = day_of(int(end.timestamp() * 1000) - 1) if end else None
        keys: list[tuple[Store, str, int]] = []
        for tenant in sorted(set(tenants)):
            for store in self.stores.values():
                base = f"{topic}/tenant={tenant}/"
                for prefix in await store.prefixes(base):
                    day = prefix.rstrip("/").rsplit("date=", 1)[-1]
                    if (first_day and day < first_day) or (last_day and day > last_day):
                        continue
                    async for key, size in store.keys(prefix):
                        if key.endswith(".manifest.json"):
                            keys.append((store, key, size))
        loaded = await asyncio.gather(*(self._manifest(*item) for item in keys))
        return [
            Found(store, manifest)
            for (store, _, _), manifest in zip(keys, loaded, strict=True)
            if manifest is not None
        ]

    async def all_manifests(self, prefix: str = "") -> list[Found]:
        keys: list[tuple[Store, str, int]] = []
        for store in self.stores.values():
            async for key, size in store.keys(prefix):
                if key.endswith(".manifest.json") and "/tenant=" in key:
                    keys.append((store, key, size))
        loaded = await asyncio.gather(*(self._manifest(*item) for item in keys))
        return [
            Found(store, m) for (store, _, _), m in zip(keys, loaded, strict=True) if m is not None
        ]

    async def _manifest(self, store: Store, key: str, size: int) -> Manifest | None:
        cached = self._cache.get((store.name, key, size))
        if cached is not None:
            return cached
        async with self._limit:
            raw = await store.get_or_none(key)
        if raw is None:
            return None
        manifest = Manifest.model_validate_json(raw)
        self._cache[(store.name, key, size)] = manifest
        return manifest

    async def records(self, found: Found) -> list[ArchivedRecord]:
        """The object's records; :class:`ArchiveMismatch` when it does not match its manifest."""
        async with self._limit:
            data = await found.store.get_or_none(found.manifest.key)
        if data is None:
            raise ArchiveMismatch(f"{found.manifest.key}: the manifest's object is missing")
        return await asyncio.to_thread(verify, data, found.manifest)


def in_range(at_ms: int, start: datetime | None, end: datetime | None) -> bool:
    if start is not None and at_ms < int(start.timestamp() * 1000):
        return False
    return end is None or at_ms < int(end.timestamp() * 1000)


def parse_moment(text: str | None, name: str) -> datetime | None:
    """An RFC 3339 time with an offset, or a date (midnight UTC); ``ValueError`` otherwise."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name} must be an RFC 3339 time or a date") from None
    if moment.tzinfo is None:
        if len(text) == 10:
            return moment.replace(tzinfo=UTC)
        raise ValueError(f"{name} needs a UTC offset (e.g. 2026-11-01T00:00:00Z)")
    return moment
