"""Durable insight history: any past window of the insights a partner may see, with paging.

``GET /v1/insights/history?type=&owner=&metric=&from=&to=&cursor=&limit=`` reads the archive
(both stores) and the *live tail* — the records of each insight topic from the archive group's
committed offset to the end, not yet in an object — so what was published a moment ago is there
too. ``from``/``to`` bound the insight's window start (its production time when it has none);
results are ordered by that time and insight id; ``next_cursor`` continues. An insight archived
and still in the tail is given once (by id). Every insight passes the one sharing rule,
:func:`shared.control.reading_grants`, with the caller's grants at the moment of the request —
the rule of the live list and stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from schemas.control import Grant
from schemas.insights import INSIGHT_MODELS, NETWORK_TENANT
from services.storage.files import FileError
from services.storage.reader import ArchiveReader, in_range, parse_moment
from services.storage.segments import ArchivedRecord, describe
from services.storage.settings import StorageSettings
from shared.codec import json_response
from shared.control import may_read, now
from shared.httpauth import REGISTRY_KEY, authenticated_tenant
from shared.kafka import create_consumer, kafka_problem, stop_consumer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HistoryQuery:
    types: tuple[str, ...]
    owner: str | None
    metric: str | None
    start: datetime | None
    end: datetime | None
    after: tuple[int, str] | None
    limit: int


def parse_query(query: Any, max_limit: int) -> HistoryQuery:
    """The query string as a :class:`HistoryQuery`; ``ValueError`` with the reason."""
    types = tuple(
        sorted({t.strip() for raw in query.getall("type", []) for t in raw.split(",") if t.strip()})
    )
    unknown = sorted(set(types) - INSIGHT_MODELS.keys())
    if unknown:
        raise ValueError(f"unknown insight type(s) {unknown}; known: {sorted(INSIGHT_MODELS)}")
    try:
        limit = int(query.get("limit", "100"))
    except ValueError:
        raise ValueError("limit must be an integer") from None
    if not 1 <= limit <= max_limit:
        raise ValueError(f"limit must be between 1 and {max_limit}")
    start = parse_moment(query.get("from"), "from")
    end = parse_moment(query.get("to"), "to")
    if start and end and end <= start:
        raise ValueError("to must be after from")
    return HistoryQuery(
        types=types or tuple(sorted(INSIGHT_MODELS)),
        owner=query.get("owner") or None,
        metric=query.get("metric") or None,
        start=start,
        end=end,
        after=decode_cursor(query.get("cursor")),
        limit=limit,
    )


def encode_cursor(at_ms: int, insight_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([at_ms, insight_id])).decode().rstrip("=")


def decode_cursor(text: str | None) -> tuple[int, str] | None:
    if not text:
        return None
    try:
        at_ms, insight_id = orjson.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        return int(at_ms), str(insight_id)
    except (ValueError, TypeError):
        raise ValueError("cursor is not one this service gave") from None


def readable_owners(reader: str, grants: Iterable[Grant], owner: str | None) -> set[str]:
    """Whose insights may hold something for ``reader``: itself, the network's public
    aggregates and the owners of its grants (every record is still checked one by one)."""
    owners = {reader, NETWORK_TENANT} | {g.owner for g in grants}
    return owners & {owner} if owner else owners


def select(
    records: Iterable[ArchivedRecord],
    reader: str,
    grants: list[Grant],
    at: datetime,
    query: HistoryQuery,
) -> dict[str, tuple[int, str, bytes]]:
    """``insight_id -> (time, id, json)`` of the records ``reader`` may read that match."""
    out: dict[str, tuple[int, str, bytes]] = {}
    for r in records:
        if r.kind not in query.types or not in_range(r.at_ms, query.start, query.end):
            continue
        if query.owner and r.tenant != query.owner:
            continue
        if not may_read(
            reader,
            owner=r.tenant,
            visibility=r.visibility,
            insight_type=r.kind,
            grants=grants,
            at=at,
        ):
            continue
        doc = orjson.loads(r.value)
        if query.metric and doc.get("metric") != query.metric:
            continue
        insight_id = str(doc.get("insight_id", ""))
        key = (r.at_ms, insight_id)
        if query.after is not None and key <= query.after:
            continue
        out[insight_id] = (r.at_ms, insight_id, r.value)
    return out


async def live_tail(
    settings: StorageSettings, admin: AIOKafkaAdminClient, topics: list[str], group: str
) -> list[ArchivedRecord]:
    """Records of ``topics`` from the archive group's committed offsets to the current ends."""
    consumer = create_consumer(settings, None)
    await consumer.start()
    try:
        described = await admin.describe_topics(topics)
        partitions = [
            TopicPartition(topic["topic"], p["partition"])
            for topic in described
            if topic["error_code"] == 0
            for p in topic["partitions"]
        ]
        if not partitions:
            return []
        committed = await admin.list_consumer_group_offsets(group, partitions=partitions)
        ends = await consumer.end_offsets(partitions)
        begins = await consumer.beginning_offsets(partitions)
        todo = {}
        for tp in partitions:
            found = committed.get(tp)
            start = found.offset if found is not None and found.offset >= 0 else begins[tp]
            if start < ends[tp]:
                todo[tp] = max(start, begins[tp])
        if not todo:
            return []
        consumer.assign(list(todo))
        for tp, start in todo.items():
            consumer.seek(tp, start)
        out: list[ArchivedRecord] = []
        remaining = set(todo)
        async with asyncio.timeout(30):
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=200, max_records=10_000)
                for tp, records in batch.items():
                    for record in records:
                        if record.offset < ends[tp] and record.value is not None:
                            with contextlib.suppress(ValueError):
                                out.append(
                                    describe(
                                        record.offset,
                                        record.timestamp,
                                        record.key,
                                        record.value,
                                        record.headers or (),
                                    )
                                )
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
        return out
    finally:
        await stop_consumer(consumer)


@dataclass
class History:
    settings: StorageSettings
    reader: ArchiveReader
    admin: AIOKafkaAdminClient
    group: str

    async def page(
        self, reader: str, grants: list[Grant], query: HistoryQuery
    ) -> tuple[list[bytes], str | None]:
        at = now()
        known = self.settings.storage_insight_topics
        topics = [known[t] for t in query.types if t in known]
        owners = readable_owners(reader, grants, query.owner)
        found: dict[str, tuple[int, str, bytes]] = {}
        for topic in topics:
            for item in await self.reader.manifests(topic, owners, query.start, query.end):
                m = item.manifest
                if query.start and m.max_at_ms < int(query.start.timestamp() * 1000):
                    continue
                records = await self.reader.records(item)
                found.update(select(records, reader, grants, at, query))
        tail = await live_tail(self.settings, self.admin, topics, self.group)
        found.update(select(tail, reader, grants, at, query))
        ordered = sorted(found.values())
        page = ordered[: query.limit]
        cursor = encode_cursor(*page[-1][:2]) if len(ordered) > query.limit and page else None
        return [value for _, _, value in page], cursor


HISTORY_KEY = web.AppKey("history", History)


async def insight_history(request: web.Request) -> web.Response:
    reader = authenticated_tenant(request).tenant
    history = request.app[HISTORY_KEY]
    try:
        query = parse_query(request.query, history.settings.storage_max_page)
    except ValueError as error:
        raise FileError(400, str(error)) from None
    registry = request.app[REGISTRY_KEY]
    grants = registry.grants_to(reader)
    try:
        values, cursor = await history.page(reader, grants, query)
    except (KafkaError, TimeoutError) as error:  # the live tail needs the broker
        problem = kafka_problem(error, history.settings.kafka_bootstrap_servers)
        log.warning("insight history not served: %s", problem)
        return json_response(
            {"error": "cannot read the recent history right now; retry shortly", "reason": problem},
            status=503,
            headers={"Retry-After": "5"},
        )
    body = (
        b'{"count":%d,"next_cursor":%s,"insights":[' % (len(values), orjson.dumps(cursor))
        + b",".join(values)
        + b"]}"
    )
    return web.Response(body=body, content_type="application/json")
