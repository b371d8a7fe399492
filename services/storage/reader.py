"""Reading the archive back: find the manifests of a topic, tenant and time range in both
stores, and the records of an object checked against its manifest (history, catalog, replay)."""

from __future__ import annotations

import asyncio
import functools
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
    """Manifests are immutable once their object is final: they are cached by key and size.

    Each S3 call costs a round trip and ~2 ms of client CPU (signing, botocore's hooks), which
    was most of a small replay's time: listings run concurrently (under the reader's
    concurrency limit) and as few as the archive's layout allows (:meth:`manifests`)."""

    def __init__(self, stores: dict[str, Store], concurrency: int = 16) -> None:
        self.stores = stores
        self._cache: dict[tuple[str, str, int], Manifest] = {}
        self._limit = asyncio.Semaphore(concurrency)

    async def tenants(self, topic: str) -> set[str]:
        listed = await asyncio.gather(
            *(self._tenants_in(store, topic) for store in self.stores.values())
        )
        return set().union(*listed)

    async def manifests(
        self,
        topic: str,
        tenants: Iterable[str],
        start: datetime | None = None,
        end: datetime | None = None,
    ) -> list[Found]:
        """Manifests of ``topic`` for ``tenants`` whose dates meet ``[start, end)``.

        One listing per tenant and store, from the first day of the range (``StartAfter``) to
        the last (keys sort by date within a tenant); with more than two tenants, each store's
        tenants are listed first (one call per store) so a tenant absent from a store costs
        no listing there."""
        first_day = day_of(int(start.timestamp() * 1000)) if start else None
        last_day = day_of(int(end.timestamp() * 1000) - 1) if end else None
        wanted = sorted(set(tenants))
        stores = list(self.stores.values())
        if len(wanted) > 2:
            present = await asyncio.gather(*(self._tenants_in(store, topic) for store in stores))
        else:
            present = [set(wanted)] * len(stores)
        listed = await asyncio.gather(
            *(
                self._manifests_of(store, f"{topic}/tenant={tenant}/", first_day, last_day)
                for tenant in wanted
                for store, there in zip(stores, present, strict=True)
                if tenant in there
            )
        )
        return [found for under in listed for found in under]

    async def all_manifests(self, prefix: str = "") -> list[Found]:
        listed = await asyncio.gather(
            *(self._manifests_of(store, prefix) for store in self.stores.values())
        )
        return [found for under in listed for found in under]

    async def _tenants_in(self, store: Store, topic: str) -> set[str]:
        async with self._limit:
            prefixes = await store.prefixes(f"{topic}/")
        found = set()
        for prefix in prefixes:
            name = prefix.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("tenant="):
                found.add(name.removeprefix("tenant="))
        return found

    async def _manifests_of(
        self,
        store: Store,
        prefix: str,
        first_day: str | None = None,
        last_day: str | None = None,
    ) -> list[Found]:
        """The manifests under ``prefix`` in ``store``, in key order; when days are given,
        ``prefix`` is a tenant's (``<topic>/tenant=<t>/``) and only the days between are kept."""
        async with self._limit:
            keys = await _manifest_keys(store, prefix, first_day, last_day)
        loaded = await asyncio.gather(*(self._manifest(store, key, size) for key, size in keys))
        return [Found(store, manifest) for manifest in loaded if manifest is not None]

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


async def _manifest_keys(
    store: Store, prefix: str, first_day: str | None, last_day: str | None
) -> list[tuple[str, int]]:
    """``(key, size)`` of the manifests under ``prefix`` whose ``date=`` is in the days given:
    one listing from the first day (``StartAfter``), stopped after the last."""
    params = {"Bucket": store.bucket, "Prefix": prefix}
    if first_day:
        # Not "date=<first day>" itself: SeaweedFS takes a StartAfter that names a "directory"
        # as that whole directory (S3 does not). One character less sorts before the first
        # day and after most earlier ones; the few days it lets in are skipped below.
        params["StartAfter"] = f"{prefix}date={first_day[:-1]}"
    found: list[tuple[str, int]] = []
    async for page in store.client.get_paginator("list_objects_v2").paginate(**params):
        for item in page.get("Contents", ()):
            key: str = item["Key"]
            rest = key[len(prefix) :]
            if rest.startswith("date="):
                day = rest[5:15]
                if last_day and day > last_day:
                    return found  # keys sort by date: every later one is later still
                if first_day and day < first_day:
                    continue
            if key.endswith(".manifest.json") and "/tenant=" in key:
                found.append((key, int(item["Size"])))
    return found


def in_range(at_ms: int, start: datetime | None, end: datetime | None) -> bool:
    if start is not None and at_ms < _epoch_ms(start):
        return False
    return end is None or at_ms < _epoch_ms(end)


@functools.lru_cache(maxsize=256)
def _epoch_ms(moment: datetime) -> int:
    """Asked for every record a replay or a history page reads, of the same few moments."""
    return int(moment.timestamp() * 1000)


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
