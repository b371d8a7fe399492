"""Insights and sharing agreements on the gateway.

Routes (every one authenticated by a tenant key, see :mod:`shared.httpauth`):

- ``GET /v1/insights?type=&metric=&window_start=&owner=&limit=`` — the latest insights the caller
  may read, newest first;
- ``GET /v1/insights/stream?type=&metric=&owner=&replay=`` — Server-Sent Events: ``event:
  <type>``, ``id: <insight_id>``, ``data: <json>``; ``: heartbeat`` comments keep the connection
  open; ``event: grant_revoked`` tells the client an agreement it was reading under has ended.
  A reconnecting client sends ``Last-Event-ID`` and gets what it may read of what the cache still
  holds after that insight, up to half the stream's queue (``event: gap`` when the cache no longer
  holds that insight — or the caller may not read it — and ``gap`` with ``missed: N`` when more
  came since than one resume sends); ``replay=N`` starts with the latest N;
- ``POST /v1/shares`` (the caller grants), ``GET /v1/shares`` (granted by and to the caller),
  ``DELETE /v1/shares/{grant_id}`` (the owner revokes), ``GET /v1/shares/audit`` (history).

Consumes: every insight topic, with no consumer group — each gateway replica assigns all
partitions and reads a bounded recent span (``recent_per_partition`` records per partition) into
an in-memory cache that keeps the latest ``per_series`` insights per (owner, type, metric) and
fans new ones out to open streams. Produces: only ``control.grants.v1`` (compacted, key: grant
id, ``acks=all``) — a grant and its revocation are the same record, updated.

Delivery: the cache is a view, not a log: SSE delivers each insight at most once per
connection, and a reconnect with ``Last-Event-ID`` resumes from what this replica still holds
(the latest ``per_series`` of each series); durable subscriptions use the SDK over Kafka.

Enforcement: the one rule, :func:`shared.control.reading_grants`, is evaluated against the live
:class:`~shared.control.ControlRegistry` at the moment each insight leaves — for every listed
insight and for every SSE event when it is written, so a revocation takes effect on open streams
as soon as the registry has read it. Grants and revocations are logged on ``xietong.audit`` as
structured lines and stay in the compacted topic (each record holds its whole lifecycle:
created, expiry, revoked), which is where ``/v1/shares/audit`` reads the history from.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from aiohttp import web
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import AwareDatetime, BeforeValidator, Field, ValidationError

from schemas.control import Grant
from schemas.events import Contract, TenantId
from schemas.insights import (
    INSIGHT_MODELS,
    Benchmark,
    ClusterAssignment,
    Correlation,
    Insight,
    Prediction,
    Statistics,
)
from schemas.topics import INSIGHT_TOPICS
from shared.codec import DecodeError, decode, encode, json_response
from shared.control import ControlRegistry, ControlWriter, new_id, now, reading_grants
from shared.deadletter import field_errors
from shared.httpauth import REGISTRY_KEY, api_key_of, authenticated_tenant
from shared.kafka import create_consumer, ensure_topics, stop_consumer, topic_partitions
from shared.pseudonyms import as_read
from shared.sdk import InsightFilter
from shared.settings import XietongSettings

log = logging.getLogger(__name__)
audit = logging.getLogger("xietong.audit")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
GRANT_ID_PATTERN = "[a-z0-9]{8,32}"
"""The shape of a grant id (``schemas.control.Grant.grant_id``), in the route and the document."""
SSE_NOTICES = ("grant_revoked", "access_revoked", "gap", "end")
"""Events of the stream that are no insight."""


# --------------------------------------------------------------------------- pure helpers


def series_of(insight: Insight) -> str:
    """What makes insights of one owner and type "the same series" (their metric, target...)."""
    if isinstance(insight, Statistics):
        return insight.metric
    if isinstance(insight, Benchmark):
        return f"{insight.industry}/{insight.region}/{insight.metric}"
    if isinstance(insight, Correlation):
        return ",".join(insight.metrics)
    if isinstance(insight, Prediction):
        return f"{insight.model_name}/{insight.target}"
    if isinstance(insight, ClusterAssignment):
        return ",".join(insight.features)
    return ""


def parse_filter(query: Mapping[str, str], values: Callable[[str], list[str]]) -> InsightFilter:
    """Build the filter from query parameters; raises ``ValueError`` with a readable reason.

    ``type`` may be repeated or comma-separated (no empty item); ``window_start`` is RFC 3339
    with an offset (given empty, it is refused: the OpenAPI document says ``date-time``).
    """
    types = {t.strip() for raw in values("type") for t in raw.split(",")}
    unknown = sorted(types - INSIGHT_MODELS.keys())
    if unknown:
        raise ValueError(f"unknown insight type(s) {unknown}; known: {sorted(INSIGHT_MODELS)}")
    window_start = None
    if "window_start" in query:
        try:
            window_start = datetime.fromisoformat(query["window_start"].replace("Z", "+00:00"))
        except ValueError:
            raise ValueError("window_start must be an RFC 3339 timestamp") from None
        if window_start.tzinfo is None:
            raise ValueError("window_start needs a UTC offset (e.g. 2026-11-01T00:00:00Z)")
    return InsightFilter(
        types=frozenset(types) or None,
        metric=query.get("metric") or None,
        window_start=window_start,
        owner=query.get("owner") or None,
    )


def reading_grants_of(
    reader: str, insight: Insight, grants: Iterable[Grant], at: datetime
) -> list[Grant] | None:
    """:func:`shared.control.reading_grants` applied to an insight."""
    return reading_grants(
        reader,
        owner=insight.tenant,
        visibility=insight.visibility,
        insight_type=insight.type,
        grants=grants,
        at=at,
    )


def readable(reader: str, insight: Insight, grants: Iterable[Grant], at: datetime) -> bool:
    return reading_grants_of(reader, insight, grants, at) is not None


def body_as_read(item: CachedInsight, allowing: list[Grant] | None, key: bytes | None) -> bytes:
    """The body a reader gets: pseudonyms re-keyed under its agreement (:func:`as_read`)."""
    shown = as_read(item.insight, allowing, key)
    return item.body if shown is item.insight else encode(shown)


def grant_status(grant: Grant, at: datetime) -> str:
    if grant.revoked_at is not None and grant.revoked_at <= at:
        return "revoked"
    if grant.expires_at is not None and grant.expires_at <= at:
        return "expired"
    return "active"


def grant_view(grant: Grant, at: datetime) -> dict[str, Any]:
    return {**grant.model_dump(mode="json"), "status": grant_status(grant, at)}


def grant_history(tenant: str, grants: Iterable[Grant], at: datetime) -> list[dict[str, Any]]:
    """Every grant, expiry and revocation the tenant took part in, oldest first."""
    entries: list[tuple[datetime, dict[str, Any]]] = []
    for g in grants:
        if tenant not in (g.owner, g.grantee):
            continue
        base = {
            "grant_id": g.grant_id,
            "owner": g.owner,
            "grantee": g.grantee,
            "insight_types": g.insight_types,
            "purpose": g.purpose,
        }
        entries.append(
            (
                g.created_at,
                {"action": "granted", "at": g.created_at, **base, "expires_at": g.expires_at},
            )
        )
        if g.revoked_at is not None and (g.expires_at is None or g.revoked_at < g.expires_at):
            entries.append((g.revoked_at, {"action": "revoked", "at": g.revoked_at, **base}))
        elif g.expires_at is not None and g.expires_at <= at:
            entries.append((g.expires_at, {"action": "expired", "at": g.expires_at, **base}))
    entries.sort(key=lambda entry: (entry[0], entry[1]["grant_id"]))
    return [entry for _, entry in entries]


def sse_event(event: str, data: bytes, event_id: str | None = None) -> bytes:
    """One Server-Sent Event frame (``data`` is one line of compact JSON)."""
    head = f"event: {event}\n" + (f"id: {event_id}\n" if event_id else "")
    return head.encode() + b"data: " + data + b"\n\n"


# --------------------------------------------------------------------------- the cache


@dataclass(frozen=True)
class CachedInsight:
    insight: Insight
    body: bytes
    seq: int


class Subscription:
    """The queue of one open stream; it is closed when the stream cannot keep up."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[CachedInsight | None] = asyncio.Queue(size)
        self.closed = False
        self.overflowed = False

    def offer(self, item: CachedInsight) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            # The reader sees the end marker after what is queued; make room if needed.
            if self.queue.full():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


class InsightCache:
    """The latest insights of every series, read from the insight topics without a group."""

    def __init__(
        self,
        settings: XietongSettings,
        *,
        per_series: int = 50,
        recent_per_partition: int = 10_000,
        queue_size: int = 10_000,
        topics: Iterable[str] = tuple(INSIGHT_TOPICS.values()),
    ) -> None:
        self.settings = settings
        self.per_series = per_series
        self.recent_per_partition = recent_per_partition
        self.queue_size = queue_size
        self.topics = tuple(topics)
        self._series: dict[tuple[str, str, str], deque[CachedInsight]] = {}
        self._by_id: dict[UUID, CachedInsight] = {}
        self._keys_by_owner: dict[str, set[tuple[str, str, str]]] = {}
        self._public_keys: set[tuple[str, str, str]] = set()
        self._subscriptions: set[Subscription] = set()
        self._partitions: list[TopicPartition] = []
        self._progress = asyncio.Event()
        self._adding = False
        """True while the tail adds a fetched batch (its positions are already past it)."""
        self._seq = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await ensure_topics(self.settings, self.topics)
        consumer = create_consumer(self.settings, None)
        await consumer.start()
        self._consumer = consumer
        try:
            partitions = [
                tp for topic in self.topics for tp in await topic_partitions(consumer, topic)
            ]
            consumer.assign(partitions)
            self._partitions = partitions
            begin = await consumer.beginning_offsets(partitions)
            end = await consumer.end_offsets(partitions)
            for tp in partitions:
                start = max(begin[tp], end[tp] - self.recent_per_partition)
                consumer.seek(tp, start)
        except BaseException:
            await stop_consumer(consumer)
            raise
        self._task = asyncio.create_task(self._tail(), name="insight-cache-tail")
        self._task.add_done_callback(_report_crash)

    async def stop(self) -> None:
        for subscription in list(self._subscriptions):
            subscription.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await stop_consumer(self._consumer)

    async def _tail(self) -> None:
        assert self._consumer is not None
        # One fetch can hold more insights than a stream's queue: offered all at once, they
        # would fill every open stream's queue before any stream ran, and drop them all as
        # too slow. So the streams get a turn after each quarter of a queue.
        chunk = max(1, self.queue_size // 4)
        while True:
            batch = await self._consumer.getmany(timeout_ms=self.settings.kafka_fetch_timeout_ms)
            self._adding = True
            try:
                for records in batch.values():
                    for start in range(0, len(records), chunk):
                        self.add_records(records[start : start + chunk])
                        if self._subscriptions:
                            await asyncio.sleep(0)
            finally:
                self._adding = False
            self._progress.set()

    def add_records(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        for record in records:
            try:
                data = decode(record.value)
                insight = INSIGHT_MODELS[data["type"]].model_validate(data)
            except (DecodeError, KeyError, TypeError, ValidationError):
                log.error(
                    "unreadable insight skipped",
                    extra={
                        "topic": record.topic,
                        "partition": record.partition,
                        "offset": record.offset,
                    },
                )
                continue
            self.add(insight)

    def add(self, insight: Insight) -> None:
        """Keep ``insight`` (unless it is a redelivery) and offer it to every open stream."""
        if insight.insight_id in self._by_id:
            return  # at-least-once producers may deliver an insight twice
        key = (insight.tenant, insight.type, series_of(insight))
        kept = self._series.get(key)
        if kept is None:
            kept = self._series[key] = deque(maxlen=self.per_series)
            self._keys_by_owner.setdefault(insight.tenant, set()).add(key)
        elif len(kept) == kept.maxlen:
            del self._by_id[kept[0].insight.insight_id]  # the oldest of the series goes
        self._seq += 1
        item = CachedInsight(insight, encode(insight), self._seq)
        kept.append(item)
        self._by_id[insight.insight_id] = item
        if insight.visibility == "public":
            self._public_keys.add(key)
        for subscription in list(self._subscriptions):
            subscription.offer(item)
            if subscription.closed:
                self._subscriptions.discard(subscription)

    def latest(
        self,
        keep: Callable[[Insight], bool],
        limit: int,
        owners: Iterable[str] | None = None,
    ) -> list[CachedInsight]:
        """Newest first, at most ``limit``; only series of ``owners`` and public ones if given."""
        if owners is None:
            series: Iterable[deque[CachedInsight]] = self._series.values()
        else:
            keys = {key for owner in set(owners) for key in self._keys_by_owner.get(owner, ())}
            series = [self._series[key] for key in keys | self._public_keys]
        return heapq.nlargest(
            limit, (c for kept in series for c in kept if keep(c.insight)), key=lambda c: c.seq
        )

    def readable_by(
        self, reader: str, grants: Iterable[Grant], at: datetime, wanted: InsightFilter, limit: int
    ) -> list[CachedInsight]:
        """The latest insights ``reader`` may read now and ``wanted`` matches, newest first."""
        grants = list(grants)
        owners = {reader, *(g.owner for g in grants if g.grantee == reader)}
        if wanted.owner is not None:
            owners &= {wanted.owner}
        return self.latest(
            lambda insight: wanted.matches(insight) and readable(reader, insight, grants, at),
            limit,
            owners,
        )

    def after(
        self, insight_id: str, keep: Callable[[Insight], bool], limit: int
    ) -> tuple[list[CachedInsight], int] | None:
        """What ``keep`` accepts of what came after ``insight_id``, oldest first, at most the
        newest ``limit`` of it, and how many older ones that limit left out. None when the id is
        not (or no longer) here, or names an insight ``keep`` refuses: a reader learns nothing of
        insights it may not read, not even that one exists."""
        try:
            seen = self._by_id.get(UUID(insight_id))
        except ValueError:
            return None
        if seen is None or not keep(seen.insight):
            return None
        found = sorted(
            (c for kept in self._series.values() for c in kept if c.seq > seen.seq),
            key=lambda c: c.seq,
        )
        wanted = [c for c in found if keep(c.insight)]
        return wanted[-limit:] if limit else [], max(0, len(wanted) - limit)

    @property
    def max_replay(self) -> int:
        """The most a new stream starts with: half its queue, leaving room for what arrives."""
        return self.queue_size // 2

    def subscribe(self, replay: Iterable[CachedInsight] = ()) -> Subscription:
        """A new stream's queue, starting with ``replay`` (then everything added from now on)."""
        subscription = Subscription(self.queue_size)
        replay = list(replay)
        if len(replay) > self.max_replay:
            raise ValueError(f"a replay holds at most {self.max_replay} insights")
        for item in replay:
            subscription.queue.put_nowait(item)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
        subscription.closed = True

    async def wait_caught_up(self, timeout: float) -> bool:
        """Wait until everything written before this call is in the cache (False on timeout)."""
        assert self._consumer is not None
        consumer = self._consumer
        end = await consumer.end_offsets(self._partitions)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while True:
                    # Outside of adding a batch, a position past the end means those records
                    # are in the cache (the tail adds a batch as soon as getmany returns it).
                    behind = [
                        tp for tp, offset in end.items() if await consumer.position(tp) < offset
                    ]
                    if not behind and not self._adding:
                        return True
                    self._progress.clear()
                    await self._progress.wait()
        return False


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "insight cache stopped reading: streams get nothing new", exc_info=task.exception()
        )


# --------------------------------------------------------------------------- app wiring


@dataclass
class InsightRoutes:
    """What the routes share: the cache and the grant writer (both set at startup)."""

    per_series: int = 50
    recent_per_partition: int = 10_000
    heartbeat: float = 15.0
    registry_timeout: float = 10.0
    history_timeout: float = 60.0
    """How long start-up waits for the cache to read the recent insights before serving."""
    recheck: float = 5.0
    """How often an open stream re-checks, even with no change, that the registry is current."""
    _cache: InsightCache | None = None
    _writer: ControlWriter | None = None
    streams: set[Subscription] = field(default_factory=set)
    network_key: bytes | None = None
    """Keys the pseudonyms a grantee reads (:mod:`shared.pseudonyms`); None without a secret."""

    @property
    def cache(self) -> InsightCache:
        if self._cache is None:
            raise RuntimeError("insight routes are not started")
        return self._cache

    @property
    def writer(self) -> ControlWriter:
        if self._writer is None:
            raise RuntimeError("insight routes are not started")
        return self._writer


INSIGHTS_KEY = web.AppKey("insights", InsightRoutes)


def setup_insight_routes(
    app: web.Application,
    *,
    per_series: int = 50,
    recent_per_partition: int = 10_000,
    heartbeat: float = 15.0,
) -> None:
    """Add the insight and sharing routes, and the startup/cleanup of the cache and writer.

    ``app[REGISTRY_KEY]`` must hold a started :class:`ControlRegistry` by the time the app starts
    (set it before, or in a ``cleanup_ctx`` appended before calling this).
    """
    state = InsightRoutes(per_series, recent_per_partition, heartbeat)
    app[INSIGHTS_KEY] = state

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        settings = app[REGISTRY_KEY].settings
        secret = settings.network_secret
        state.network_key = secret.get_secret_value().encode() if secret else None
        cache = InsightCache(
            settings, per_series=state.per_series, recent_per_partition=state.recent_per_partition
        )
        await cache.start()
        try:
            # Serve once the recent history is loaded: a stream opened while the cache still
            # reads it would be sent all of it as if new (and a slow client overflow on it).
            if not await cache.wait_caught_up(state.history_timeout):
                log.warning(
                    "insight history still loading; serving meanwhile",
                    extra={"waited_seconds": state.history_timeout},
                )
            async with ControlWriter(settings) as writer:
                state._cache, state._writer = cache, writer
                yield
        finally:
            state._cache = state._writer = None
            await cache.stop()

    async def end_streams(_: web.Application) -> None:
        # Before the server waits for handlers: open streams finish instead of being cut off.
        for subscription in list(state.streams):
            subscription.close()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(end_streams)
    document_routes()
    app.router.add_get("/v1/insights", list_insights)
    app.router.add_get("/v1/insights/stream", stream_insights)
    app.router.add_post("/v1/shares", create_share)
    app.router.add_post("/v1/shares/preview", preview_share)
    app.router.add_get("/v1/shares", list_shares)
    app.router.add_get("/v1/shares/audit", share_audit)
    # Only a grant id's shape: without it DELETE /v1/shares/audit would be a revocation of
    # "audit" (aiohttp tries the next resource when a path matches but its method does not).
    app.router.add_delete(f"/v1/shares/{{grant_id:{GRANT_ID_PATTERN}}}", revoke_share)


def _error(status: type[web.HTTPException], reason: str, **details: Any) -> web.HTTPException:
    return status(
        text=encode({"error": reason, **details}).decode(), content_type="application/json"
    )


def _filter_of(request: web.Request) -> InsightFilter:
    try:
        return parse_filter(request.query, lambda name: list(request.query.getall(name, [])))
    except ValueError as error:
        raise _error(web.HTTPBadRequest, str(error)) from None


def _limit_of(request: web.Request) -> int:
    raw = request.query.get("limit", str(DEFAULT_LIMIT))
    try:
        limit = int(raw)
    except ValueError:
        raise _error(web.HTTPBadRequest, "limit must be an integer") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise _error(web.HTTPBadRequest, f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def _replay_of(request: web.Request) -> int:
    raw = request.query.get("replay", "0")
    try:
        count = int(raw)
    except ValueError:
        raise _error(web.HTTPBadRequest, "replay must be an integer") from None
    if not 0 <= count <= MAX_LIMIT:
        raise _error(web.HTTPBadRequest, f"replay must be between 0 and {MAX_LIMIT}")
    return count


# --------------------------------------------------------------------------- insight routes


async def list_insights(request: web.Request) -> web.Response:
    """The latest insights the caller may read, newest first."""
    reader = authenticated_tenant(request).tenant
    wanted = _filter_of(request)
    limit = _limit_of(request)
    registry = request.app[REGISTRY_KEY]
    at = now()
    grants = registry.grants_to(reader, at)
    state = request.app[INSIGHTS_KEY]
    found = state.cache.readable_by(reader, grants, at, wanted, limit)
    bodies = [
        body_as_read(c, reading_grants_of(reader, c.insight, grants, at), state.network_key)
        for c in found
    ]
    body = b'{"count":%d,"insights":[' % len(found) + b",".join(bodies) + b"]}"
    return web.Response(body=body, content_type="application/json")


async def stream_insights(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events of new insights the caller may read, checked when each is sent."""
    tenant = authenticated_tenant(request)
    reader = tenant.tenant
    api_key = api_key_of(request)
    wanted = _filter_of(request)
    state = request.app[INSIGHTS_KEY]
    registry = request.app[REGISTRY_KEY]
    last_event_id = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    replay_count = _replay_of(request)
    # No await between choosing the replay and subscribing: nothing falls in between.
    notices: list[bytes] = []
    replay: list[CachedInsight] = []
    at = now()
    grants = registry.grants_to(reader, at)
    if last_event_id:
        resumed = state.cache.after(
            last_event_id,
            lambda insight: wanted.matches(insight) and readable(reader, insight, grants, at),
            state.cache.max_replay,
        )
        if resumed is None:
            notices.append(sse_event("gap", encode({"last_event_id": last_event_id})))
        else:
            replay, left_out = resumed
            if left_out:
                # The client is told what it misses; it can page back with GET /v1/insights.
                notices.append(
                    sse_event("gap", encode({"last_event_id": last_event_id, "missed": left_out}))
                )
    elif replay_count:
        replay = state.cache.readable_by(reader, grants, at, wanted, replay_count)[::-1]
    subscription = state.cache.subscribe(replay)
    state.streams.add(subscription)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # proxies must not buffer a stream
        }
    )
    loop = asyncio.get_running_loop()
    # Grants this stream has delivered insights under: when one ends, the client is told.
    used: dict[str, Grant] = {}
    next_item: asyncio.Task[CachedInsight | None] | None = None
    changed: asyncio.Task[int] | None = None
    try:
        await response.prepare(request)
        await response.write(b": connected\nretry: 3000\n\n" + b"".join(notices))
        last_write = loop.time()
        version = registry.version
        while True:
            if next_item is None:
                next_item = asyncio.ensure_future(subscription.queue.get())
            if changed is None:
                changed = asyncio.ensure_future(
                    registry.wait_changed(version, min(state.heartbeat, state.recheck))
                )
            done, _ = await asyncio.wait(
                {next_item, changed}, timeout=state.heartbeat, return_when=asyncio.FIRST_COMPLETED
            )
            frames: list[bytes] = []
            if registry.problem() is not None:
                # Fail closed: nothing more is sent under rules that cannot be confirmed current.
                reason = "access cannot be verified right now; reconnect shortly"
                await response.write(sse_event("end", encode({"reason": reason})))
                break
            if changed in done:
                version, changed = changed.result(), None
                if registry.authenticate(api_key) is None:
                    frames.append(
                        sse_event("access_revoked", encode({"reason": "key or tenant revoked"}))
                    )
                    await response.write(b"".join(frames))
                    break
                at = now()
                for grant_id, grant in list(used.items()):
                    current = registry.grants.get(grant_id, grant)
                    if not current.active_at(at):
                        del used[grant_id]
                        frames.append(sse_event("grant_revoked", encode(grant_view(current, at))))
            if next_item in done:
                # Everything queued by now, in one turn: the queue holds every tenant's
                # insights, and one loop turn per item could not keep up with a busy network.
                items, next_item = [next_item.result()], None
                while items[-1] is not None and not subscription.queue.empty():
                    items.append(subscription.queue.get_nowait())
                at = now()
                grants = registry.grants_to(reader, at)
                for item in items:
                    if item is None:
                        reason = (
                            "too slow: stream dropped"
                            if subscription.overflowed
                            else "shutting down"
                        )
                        frames.append(sse_event("end", encode({"reason": reason})))
                        break
                    if not wanted.matches(item.insight):
                        continue
                    # The rule is evaluated now, at send time, against the live registry.
                    allowing = reading_grants_of(reader, item.insight, grants, at)
                    if allowing is not None:
                        for grant in allowing:
                            used.setdefault(grant.grant_id, grant)
                        body = body_as_read(item, allowing, state.network_key)
                        frames.append(
                            sse_event(item.insight.type, body, str(item.insight.insight_id))
                        )
                if items[-1] is None:
                    await response.write(b"".join(frames))
                    break
            if not frames and loop.time() - last_write >= state.heartbeat:
                frames.append(b": heartbeat\n\n")
            if frames:
                await response.write(b"".join(frames))
                last_write = loop.time()
    except ConnectionResetError:
        log.info("stream client went away", extra={"tenant": reader})
    finally:
        for task in (next_item, changed):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        state.streams.discard(subscription)
        state.cache.unsubscribe(subscription)
    return response


# --------------------------------------------------------------------------- sharing routes


def _timestamp_text(value: object) -> object:
    """A timestamp of a request body is RFC 3339 text, as the document says: a number is not
    read as seconds since 1970 (pydantic's lax mode would)."""
    if value is not None and not isinstance(value, str):
        raise ValueError("must be an RFC 3339 timestamp string")
    return value


class ShareRequest(Contract):
    """Body of ``POST /v1/shares``: the caller (the owner) grants ``grantee`` some insight types."""

    grantee: TenantId
    insight_types: list[str] = Field(min_length=1)
    expires_at: Annotated[AwareDatetime, BeforeValidator(_timestamp_text)] | None = Field(
        None, description="RFC 3339 with an offset; None: until revoked."
    )
    purpose: str = Field("", max_length=500)
    preview: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{32}$",
        description="The `preview` of a `POST /v1/shares/preview` answer: the grant is then the "
        "one previewed (its id, so the text pseudonyms the grantee reads equal the preview's). "
        "Each preview grants once.",
    )


def previewed_grant_id(owner: str, preview: str) -> str:
    """The id of the grant ``owner`` previewed with token ``preview``.

    Derived from the owner, so another tenant who learns a token (or a grant id) can never
    make a grant of that id: it would need a preimage of the owner's hash."""
    return hashlib.sha256(f"xietong/grant/{owner}/{preview}".encode()).hexdigest()[:16]


async def _until_registry(
    registry: ControlRegistry, done: Callable[[], bool], timeout: float
) -> None:
    """Read-your-writes: wait until the registry reflects what was just published."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while not done():
                await registry.wait_changed(registry.version, timeout)


def _audit(action: str, actor: str, grant: Grant) -> None:
    audit.info(
        f"{action} {grant.grant_id}",
        extra={
            "audit": action,
            "actor": actor,
            "grant_id": grant.grant_id,
            "owner": grant.owner,
            "grantee": grant.grantee,
            "insight_types": grant.insight_types,
            "purpose": grant.purpose,
            "expires_at": grant.expires_at.isoformat() if grant.expires_at else None,
            "revoked_at": grant.revoked_at.isoformat() if grant.revoked_at else None,
        },
    )


async def _proposed_grant(request: web.Request, owner: str, preview: str | None = None) -> Grant:
    """The grant a ``POST /v1/shares`` body asks for (checked; not written), or the 4xx why not;
    its id is the previewed one when the body (or, for a preview, ``preview``) names a token.

    Whether the grantee exists is not said: the answer would tell any tenant which tenant ids
    the network has. A grant to an id no tenant holds is inert, and stays so if a tenant of that
    id is created later (the registry honours grants made after their grantee existed only)."""
    try:
        body = ShareRequest.model_validate(decode(await request.read()))
    except DecodeError:
        raise _error(web.HTTPBadRequest, "body must be JSON") from None
    except ValidationError as error:
        raise _error(
            web.HTTPUnprocessableEntity,
            "invalid share",
            errors=[e.model_dump() for e in field_errors(error)],
        ) from None
    unknown = sorted(set(body.insight_types) - INSIGHT_MODELS.keys())
    if unknown:
        raise _error(web.HTTPUnprocessableEntity, f"unknown insight type(s) {unknown}")
    if body.grantee == owner:
        raise _error(web.HTTPUnprocessableEntity, "a tenant always reads its own insights")
    at = now()
    if body.expires_at is not None and body.expires_at <= at:
        raise _error(web.HTTPUnprocessableEntity, "expires_at is in the past")
    token = preview or body.preview
    return Grant(
        grant_id=new_id() if token is None else previewed_grant_id(owner, token),
        owner=owner,
        grantee=body.grantee,
        insight_types=sorted(set(body.insight_types)),
        purpose=body.purpose,
        created_at=at,
        expires_at=body.expires_at,
    )


async def create_share(request: web.Request) -> web.Response:
    """Grant another tenant read access to some of the caller's insight types (201 + the grant)."""
    owner = authenticated_tenant(request).tenant
    registry = request.app[REGISTRY_KEY]
    state = request.app[INSIGHTS_KEY]
    grant = await _proposed_grant(request, owner)
    if grant.grant_id in registry.grants:
        raise _error(web.HTTPConflict, "this preview has already been granted; preview again")
    await state.writer.put_grant(grant)
    _audit("grant.created", owner, grant)
    await _until_registry(
        registry, lambda: grant.grant_id in registry.grants, state.registry_timeout
    )
    return json_response(grant_view(grant, grant.created_at), status=201)


async def preview_share(request: web.Request) -> web.Response:
    """What ``grantee`` would read of the caller's insights under the proposed grant — computed
    by the same rule and cache as ``GET /v1/insights``; nothing is granted or written."""
    owner = authenticated_tenant(request).tenant
    registry = request.app[REGISTRY_KEY]
    state = request.app[INSIGHTS_KEY]
    limit = _limit_of(request)
    token = secrets.token_hex(16)
    proposed = await _proposed_grant(request, owner, token)
    at = proposed.created_at
    # The agreements in force for the grantee plus the proposed one: what the list route would
    # use once it is granted. Computed alike whether the grantee exists or not (the answer must
    # not tell which tenant ids the network has). Pseudonyms (text entities) are keyed by the
    # grant id: the answer's token makes the grant this id, so they are the grantee's too.
    grants = [*registry.grants_to(proposed.grantee, at)]
    if proposed.active_at(at):
        grants.append(proposed)
    wanted = InsightFilter(owner=owner)
    grantee = proposed.grantee
    found = state.cache.readable_by(grantee, grants, at, wanted, limit)
    bodies = [
        body_as_read(c, reading_grants_of(grantee, c.insight, grants, at), state.network_key)
        for c in found
    ]
    return web.Response(
        body=b'{"count":%d,"preview":"%s","insights":[' % (len(found), token.encode())
        + b",".join(bodies)
        + b"]}",
        content_type="application/json",
    )


async def list_shares(request: web.Request) -> web.Response:
    """Agreements granted by the caller and granted to the caller, each with its status."""
    tenant = authenticated_tenant(request).tenant
    registry = request.app[REGISTRY_KEY]
    at = now()
    grants = sorted(registry.grants.values(), key=lambda g: (g.created_at, g.grant_id))
    return json_response(
        {
            "granted": [grant_view(g, at) for g in grants if g.owner == tenant],
            "received": [grant_view(g, at) for g in grants if g.grantee == tenant],
        }
    )


async def revoke_share(request: web.Request) -> web.Response:
    """Revoke an agreement the caller granted; open streams stop delivering under it."""
    tenant = authenticated_tenant(request).tenant
    registry = request.app[REGISTRY_KEY]
    state = request.app[INSIGHTS_KEY]
    grant = registry.grants.get(request.match_info["grant_id"])
    if grant is None or tenant not in (grant.owner, grant.grantee):
        raise _error(web.HTTPNotFound, "no such grant")
    if grant.owner != tenant:
        raise _error(web.HTTPForbidden, "only the owner revokes a grant")
    at = now()
    if grant.revoked_at is not None:
        return json_response(grant_view(grant, at))  # already revoked: nothing changes
    revoked = grant.model_copy(update={"revoked_at": at})
    await state.writer.put_grant(revoked)
    _audit("grant.revoked", tenant, revoked)
    await _until_registry(
        registry,
        lambda: (
            (current := registry.grants.get(grant.grant_id)) is not None
            and current.revoked_at is not None
        ),
        state.registry_timeout,
    )
    return json_response(grant_view(revoked, at))


async def share_audit(request: web.Request) -> web.Response:
    """The caller's agreement history: granted, revoked, expired, oldest first."""
    tenant = authenticated_tenant(request).tenant
    registry = request.app[REGISTRY_KEY]
    return json_response(
        {"tenant": tenant, "history": grant_history(tenant, registry.grants.values(), now())}
    )


# --------------------------------------------------------------------------- OpenAPI


def document_routes() -> None:
    """Describe the routes in the gateway's OpenAPI document (schemas inline, no references)."""
    from services.ingest.openapi import describe

    types = sorted(INSIGHT_MODELS)
    one_type = "|".join(types)
    error: dict[str, Any] = {
        "description": "Error",
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": {"error": {"type": "string"}}}
            }
        },
    }
    grant = {
        **Grant.model_json_schema(),
        "properties": {
            **Grant.model_json_schema()["properties"],
            "status": {"enum": ["active", "expired", "revoked"]},
        },
    }
    grant_answer = {"content": {"application/json": {"schema": grant}}}
    share_request = ShareRequest.model_json_schema()
    share_request["properties"]["insight_types"]["items"] = {"enum": types}
    query = [
        {
            "name": "type",
            "in": "query",
            "schema": {
                "type": "array",
                "items": {
                    "type": "string",
                    "pattern": rf"^\s*(?:{one_type})\s*(?:,\s*(?:{one_type})\s*)*$",
                },
            },
            "style": "form",
            "explode": True,
            "description": f"Insight type(s), repeat or comma-separate: {', '.join(types)}.",
        },
        {"name": "metric", "in": "query", "schema": {"type": "string"}},
        {
            "name": "owner",
            "in": "query",
            "schema": {"type": "string"},
            "description": "Tenant the insights are about ('network' for benchmarks).",
        },
    ]
    insight_note = (
        "Insights are the models of schemas/json/insights (one per `type`): the caller's own, "
        "public benchmarks, and those another tenant granted to the caller."
    )
    describe(
        "GET",
        "/v1/insights",
        {
            "summary": "The latest insights the caller may read, newest first.",
            "description": insight_note,
            "parameters": [
                *query,
                {
                    "name": "window_start",
                    "in": "query",
                    "schema": {"type": "string", "format": "date-time"},
                    "description": "Only insights of the window starting then (RFC 3339 with "
                    "offset; an empty value is refused).",
                },
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_LIMIT,
                        "default": DEFAULT_LIMIT,
                    },
                },
            ],
            "responses": {
                "200": {
                    "description": "Insights",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "count": {"type": "integer"},
                                    "preview": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                                    "insights": {"type": "array", "items": {"type": "object"}},
                                },
                            }
                        }
                    },
                },
                "400": error,
                "401": error,
            },
        },
    )
    describe(
        "GET",
        "/v1/insights/stream",
        {
            "summary": "New insights the caller may read, as Server-Sent Events.",
            "description": insight_note + " Each event: `event: <type>`, `id: <insight_id>`, "
            "`data: <insight JSON>`. Notices: `grant_revoked`, `access_revoked`, `gap`, `end`. "
            "Comments "
            "(`: heartbeat`) keep the connection open. Access is checked when each event is sent.",
            "parameters": [
                *query,
                {
                    "name": "replay",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 0, "maximum": MAX_LIMIT},
                    "description": "Start with the latest N readable insights.",
                },
                {
                    "name": "Last-Event-ID",
                    "in": "header",
                    "schema": {"type": "string"},
                    "description": "Resume after this insight id (a reconnecting client).",
                },
            ],
            "responses": {
                "200": {
                    "description": "An event stream",
                    "content": {
                        "text/event-stream": {
                            # OpenAPI 3.1: the schema of a text/event-stream is that of each event
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "event": {"enum": [*types, *SSE_NOTICES]},
                                    "id": {"type": "string"},
                                    "data": {
                                        "type": "string",
                                        "description": "The insight (JSON) or the notice.",
                                    },
                                    "retry": {"type": "integer", "minimum": 0},
                                },
                            }
                        }
                    },
                },
                "400": error,
                "401": error,
            },
        },
    )
    describe(
        "POST",
        "/v1/shares",
        {
            "summary": "Grant another tenant read access to some of the caller's insight types.",
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": share_request}},
            },
            "responses": {
                "201": {"description": "The grant", **grant_answer},
                "400": error,
                "401": error,
                "409": error,
                "422": error,
            },
        },
    )
    describe(
        "POST",
        "/v1/shares/preview",
        {
            "summary": "What the grantee would read of the caller's insights under a proposed "
            "grant (nothing is granted).",
            "description": "The same rule and cache as GET /v1/insights?owner=<caller> for the "
            "grantee; a grantee no tenant holds reads nothing. Send the answer's `preview` with "
            "POST /v1/shares to grant exactly this (text pseudonyms included).",
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_LIMIT,
                        "default": DEFAULT_LIMIT,
                    },
                }
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": share_request}},
            },
            "responses": {
                "200": {
                    "description": "Insights the grantee would read, newest first",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "count": {"type": "integer"},
                                    "preview": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
                                    "insights": {"type": "array", "items": {"type": "object"}},
                                },
                            }
                        }
                    },
                },
                "400": error,
                "401": error,
                "422": error,
            },
        },
    )
    describe(
        "GET",
        "/v1/shares",
        {
            "summary": "Agreements granted by and to the caller.",
            "responses": {
                "200": {
                    "description": "Grants",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "granted": {"type": "array", "items": grant},
                                    "received": {"type": "array", "items": grant},
                                },
                            }
                        }
                    },
                },
                "401": error,
            },
        },
    )
    describe(
        "DELETE",
        "/v1/shares/{grant_id}",
        {
            "summary": "Revoke an agreement (owner only); open streams stop delivering under it.",
            "parameters": [
                {
                    "name": "grant_id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "pattern": f"^{GRANT_ID_PATTERN}$"},
                }
            ],
            "responses": {
                "200": {"description": "The revoked grant", **grant_answer},
                "401": error,
                "403": error,
                "404": {
                    "description": "No such grant (JSON), or the path names no grant id at all "
                    "(the router's plain-text answer).",
                    "content": {
                        **error["content"],
                        "text/plain": {"schema": {"type": "string"}},
                    },
                },
            },
        },
    )
    describe(
        "GET",
        "/v1/shares/audit",
        {
            "summary": "The caller's agreement history: granted, revoked, expired, oldest first.",
            "responses": {
                "200": {
                    "description": "History",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "tenant": {"type": "string"},
                                    "history": {"type": "array", "items": {"type": "object"}},
                                },
                            }
                        }
                    },
                },
                "401": error,
            },
        },
    )
