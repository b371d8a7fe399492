"""The catalog: what a tenant has stored, where, under which rule, and who may read it.

One entry per archived dataset (topic, kind, store, rule: its objects, records, bytes and
dates) and one per file. ``readers`` are the owner, every tenant holding an active grant that
covers the kind (``file.<kind>`` for files), or ``everyone`` for public insights.
``GET /v1/catalog`` shows the caller its own; ``xietong catalog`` shows the operator any tenant's.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from aiohttp import web

from schemas.control import Grant
from services.storage.files import FILES_KEY, StoredFile, file_grant_type
from services.storage.reader import ArchiveReader, Found
from shared.codec import json_response
from shared.control import now
from shared.httpauth import REGISTRY_KEY, authenticated_tenant


def readers_of(
    owner: str, kind: str, public: bool, grants: Iterable[Grant], at: datetime
) -> list[str]:
    if public:
        return ["everyone"]
    return sorted(
        {owner}
        | {
            g.grantee
            for g in grants
            if g.owner == owner and kind in g.insight_types and g.active_at(at)
        }
    )


def catalog_entries(
    tenant: str,
    manifests: Iterable[Found],
    files: Iterable[StoredFile],
    grants: Iterable[Grant],
    at: datetime,
) -> list[dict[str, Any]]:
    grants = list(grants)
    datasets: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for found in manifests:
        m = found.manifest
        if m.tenant != tenant:
            continue
        kind = m.labels.get("kind", ",".join(m.kinds))
        entry = datasets.setdefault(
            (m.topic, kind, m.store, m.rule),
            {
                "what": "archive",
                "topic": m.topic,
                "kind": kind,
                "store": m.store,
                "rule": m.rule,
                "labels": m.labels,
                "objects": 0,
                "records": 0,
                "bytes": 0,
                "first_date": m.date,
                "last_date": m.date,
                "readers": readers_of(
                    tenant, kind, m.labels.get("sensitivity") == "public", grants, at
                ),
            },
        )
        entry["objects"] += 1
        entry["records"] += m.record_count
        entry["bytes"] += m.object_bytes
        entry["first_date"] = min(entry["first_date"], m.date)
        entry["last_date"] = max(entry["last_date"], m.date)
    entries = sorted(datasets.values(), key=lambda e: (e["topic"], e["kind"], e["store"]))
    for f in sorted(files, key=lambda f: f.created_at):
        if f.tenant != tenant:
            continue
        kind = f.labels.get("kind", "")
        entries.append(
            {
                "what": "file",
                "file_id": f.file_id,
                "name": f.name,
                "kind": kind,
                "store": f.store,
                "rule": f.rule,
                "labels": f.labels,
                "bytes": f.size,
                "sha256": f.sha256,
                "readers": readers_of(tenant, file_grant_type(kind), False, grants, at),
            }
        )
    return entries


async def build_catalog(
    reader: ArchiveReader, files: Any, tenant: str, grants: Iterable[Grant]
) -> list[dict[str, Any]]:
    manifests = [
        found
        for topic in await _topics(reader)
        for found in await reader.manifests(topic, [tenant])
    ]
    return catalog_entries(tenant, manifests, await files.files_of(tenant), grants, now())


async def _topics(reader: ArchiveReader) -> list[str]:
    names: set[str] = set()
    for store in reader.stores.values():
        names.update(p.rstrip("/") for p in await store.prefixes(""))
    return sorted(n for n in names if n not in ("files", "files-meta", "uploads"))


CATALOG_KEY = web.AppKey("catalog_reader", ArchiveReader)


async def get_catalog(request: web.Request) -> web.Response:
    tenant = authenticated_tenant(request).tenant
    registry = request.app[REGISTRY_KEY]
    entries = await build_catalog(
        request.app[CATALOG_KEY], request.app[FILES_KEY], tenant, registry.grants_by(tenant)
    )
    return json_response({"tenant": tenant, "count": len(entries), "entries": entries})
