"""The web console on the gateway: static files under ``/console/``, and the two small routes
only the console needs.

Routes:

- ``GET /console/`` and ``GET /console/<file>`` — the page (HTML, JS, CSS, the vendored chart
  library). **Public and static**: no tenant data is in anything served here; the page signs in
  by sending the key (or the operator token) as a bearer header from JS to the authenticated
  APIs. Every answer carries a Content-Security-Policy that allows scripts, styles and
  connections from this origin only (no inline script, no foreign origin, no framing).
- ``GET /v1/console/me`` — who the key belongs to (tenant, name, kind, industry, region): the
  page picks the caller's industry benchmark with it.
- ``GET /v1/console/publishing?minutes=`` — the caller's publishing health: records accepted and
  refused per minute, and the refusals counted by field and reason.

Consumes (publishing health only, and only once a partner first asks for it): ``events.raw.v1``
(key: tenant — only keys and timestamps are looked at) and ``events.raw.v1.dlq`` (dead letters,
their tenant and per-field reasons), with no consumer group, from ``recent_per_partition``
records back. Counts are per minute of the record's Kafka timestamp (when the gateway published
it), so every gateway replica reports the same, whichever replica took the request.
Produces: nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mimetypes
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from schemas.insights import DeadLetter, Statistics
from schemas.topics import EVENTS_RAW, dlq
from services.ingest.insights import INSIGHTS_KEY
from shared.codec import DecodeError, decode, json_response
from shared.httpauth import authenticated_tenant
from shared.kafka import create_consumer, ensure_topics, stop_consumer
from shared.settings import XietongSettings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parents[2] / "console" / "static"
"""The console's files (``console/static`` of the checkout; the chart library vendored by make)."""

PREFIX = "/console"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}

MINUTE_MS = 60_000
KEPT_MINUTES = 3 * 60
"""Publishing health looks back three hours (per tenant, per minute)."""


# --------------------------------------------------------------------------- static files


def static_files(folder: Path = STATIC_DIR) -> dict[str, Path]:
    """URL name -> file, every file of the folder (read once: nothing outside it is served)."""
    return {
        path.relative_to(folder).as_posix(): path
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def _content_type(path: Path) -> str:
    if path.suffix == ".js":
        return "text/javascript"
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


# --------------------------------------------------------------------------- publishing health


@dataclass
class TenantTally:
    """One tenant's publishing, per minute, and its refusals by (field, reason)."""

    accepted: Counter[int] = field(default_factory=Counter)
    refused: Counter[int] = field(default_factory=Counter)
    reasons: Counter[tuple[str, str]] = field(default_factory=Counter)

    def forget_before(self, minute: int) -> None:
        for counts in (self.accepted, self.refused):
            for old in [m for m in counts if m < minute]:
                del counts[old]


def refusal_reasons(letter: DeadLetter) -> list[tuple[str, str]]:
    """``(field, reason)`` of each per-field error, or ``("", reason)`` for the whole record."""
    return [(e.field, e.reason) for e in letter.errors] or [("", letter.reason)]


class PublishingTally:
    """Accepted (raw topic) and refused (its dead-letter topic) records per tenant and minute."""

    def __init__(self, settings: XietongSettings, *, recent_per_partition: int = 200_000) -> None:
        self.settings = settings
        self.recent_per_partition = recent_per_partition
        self.tenants: defaultdict[str, TenantTally] = defaultdict(TenantTally)
        self.latest_minute = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._started = asyncio.Lock()
        self._progress = asyncio.Event()
        self._partitions: list[TopicPartition] = []

    async def ensure_started(self) -> None:
        """Start reading on first use: gateways nobody opens the console on never read."""
        async with self._started:
            if self._consumer is not None:
                return
            topics = [EVENTS_RAW, dlq(EVENTS_RAW)]
            await ensure_topics(self.settings, topics)
            consumer = create_consumer(self.settings, None)
            await consumer.start()
            try:
                partitions: list[TopicPartition] = []
                for topic in topics:
                    await consumer._client.force_metadata_update()
                    found = consumer.partitions_for_topic(topic) or set()
                    partitions += [TopicPartition(topic, p) for p in sorted(found)]
                consumer.assign(partitions)
                begin = await consumer.beginning_offsets(partitions)
                end = await consumer.end_offsets(partitions)
                # from the first record of the kept span (by timestamp), at most a bounded count
                since = int(time.time() * 1000) - KEPT_MINUTES * MINUTE_MS
                found = await consumer.offsets_for_times(dict.fromkeys(partitions, since))
                for tp in partitions:
                    first = found[tp].offset if found.get(tp) is not None else end[tp]
                    floor = max(begin[tp], end[tp] - self.recent_per_partition)
                    consumer.seek(tp, max(first, floor))
            except BaseException:
                await stop_consumer(consumer)
                raise
            self._consumer, self._partitions = consumer, partitions
            self._task = asyncio.create_task(self._tail(), name="publishing-tally")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await stop_consumer(self._consumer)

    async def _tail(self) -> None:
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=self.settings.kafka_fetch_timeout_ms)
            for tp, records in batch.items():
                self.add(tp.topic == EVENTS_RAW, records)
            self._progress.set()

    def add(self, accepted: bool, records: Iterable[ConsumerRecord[bytes, bytes]]) -> None:
        for record in records:
            minute = record.timestamp // MINUTE_MS
            self.latest_minute = max(self.latest_minute, minute)
            if accepted:
                if record.key:
                    self.tenants[record.key.decode(errors="replace")].accepted[minute] += 1
                continue
            try:
                letter = DeadLetter.model_validate(decode(record.value))
            except (DecodeError, ValueError):
                continue  # not ours to judge here; the topic's readers report it
            if letter.tenant is None:
                continue
            tally = self.tenants[letter.tenant]
            tally.refused[minute] += 1
            tally.reasons.update(refusal_reasons(letter))
        if self.latest_minute:
            for tally in self.tenants.values():
                tally.forget_before(self.latest_minute - KEPT_MINUTES)

    async def caught_up(self, timeout: float) -> bool:
        """Everything written before this call is counted (False on timeout)."""
        consumer = self._consumer
        assert consumer is not None
        end = await consumer.end_offsets(self._partitions)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while any([await consumer.position(tp) < end[tp] for tp in self._partitions]):
                    self._progress.clear()
                    await self._progress.wait()
                return True
        return False

    def report(self, tenant: str, minutes: int) -> dict[str, object]:
        tally = self.tenants.get(tenant) or TenantTally()
        last = max([*tally.accepted, *tally.refused], default=self.latest_minute)
        first = last - minutes + 1
        series = [
            {
                "minute": m * 60,
                "accepted": tally.accepted.get(m, 0),
                "refused": tally.refused.get(m, 0),
            }
            for m in range(first, last + 1)
        ]
        return {
            "tenant": tenant,
            "minutes": series,
            "accepted": sum(tally.accepted.values()),
            "refused": sum(tally.refused.values()),
            "reasons": [
                {"field": f, "reason": r, "count": n} for (f, r), n in tally.reasons.most_common()
            ],
        }


# --------------------------------------------------------------------------- routes

TALLY_KEY = web.AppKey("console.tally", PublishingTally)


async def who_am_i(request: web.Request) -> web.Response:
    """The tenant the key belongs to, as the console shows it, and the metrics of its own
    statistics the gateway holds (one list route answer is capped: the page asks per metric)."""
    tenant = authenticated_tenant(request)
    cache = request.app[INSIGHTS_KEY].cache
    own = cache.latest(
        lambda insight: insight.type == "statistics", cache.per_series * 1000, [tenant.tenant]
    )
    metrics = sorted(
        {
            c.insight.metric
            for c in own
            if isinstance(c.insight, Statistics) and c.insight.tenant == tenant.tenant
        }
    )
    return json_response(
        {
            **tenant.model_dump(
                mode="json", include={"tenant", "name", "kind", "industry", "region"}
            ),
            "statistics_metrics": metrics,
        }
    )


async def publishing_health(request: web.Request) -> web.Response:
    """The caller's accepted and refused records per minute, refusals by field and reason."""
    tenant = authenticated_tenant(request).tenant
    try:
        minutes = int(request.query.get("minutes", "60"))
    except ValueError:
        minutes = 0
    if not 1 <= minutes <= KEPT_MINUTES:
        return json_response({"error": f"minutes must be 1..{KEPT_MINUTES}"}, status=400)
    tally = request.app[TALLY_KEY]
    await tally.ensure_started()
    await tally.caught_up(5.0)  # read-your-writes for a page opened right after publishing
    return json_response(tally.report(tenant, minutes))


def document_routes() -> None:
    """Describe the console's routes in the gateway's OpenAPI document."""
    from services.ingest.openapi import describe

    page = {
        "summary": "The web console (static files: no data before sign-in).",
        "security": [],
        "responses": {
            "200": {"description": "A file of the console", "content": {"text/html": {}}},
            "302": {"description": "To /console/"},
            "404": {"description": "No such file", "content": {"text/plain": {}}},
        },
    }
    describe("GET", PREFIX, page)
    describe("GET", f"{PREFIX}/", page)
    describe(
        "GET",
        f"{PREFIX}/{{name}}",
        {
            **page,
            "parameters": [
                {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
        },
    )
    json_object = {"application/json": {"schema": {"type": "object"}}}
    describe(
        "GET",
        "/v1/console/me",
        {
            "summary": "The caller's tenant (id, name, kind, industry, region) and the metrics "
            "of its statistics the gateway holds.",
            "responses": {"200": {"description": "The tenant", "content": json_object}},
        },
    )
    describe(
        "GET",
        "/v1/console/publishing",
        {
            "summary": "The caller's records accepted and refused per minute, and its refusals "
            "by field and reason.",
            "parameters": [
                {
                    "name": "minutes",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": KEPT_MINUTES},
                }
            ],
            "responses": {
                "200": {"description": "Publishing health", "content": json_object},
                "400": {"description": "minutes out of range", "content": json_object},
            },
        },
    )


def setup_console(
    app: web.Application, settings: XietongSettings, folder: Path = STATIC_DIR
) -> None:
    """Serve the console's files (public) and add its two authenticated routes."""
    document_routes()
    files = static_files(folder)
    tally = app[TALLY_KEY] = PublishingTally(settings)

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info.get("name") or "index.html"
        path = files.get(name)
        if path is None:
            raise web.HTTPNotFound(text="no such console file")
        return web.FileResponse(path, headers={"Content-Type": _content_type(path)})

    async def to_index(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{PREFIX}/")

    async def secure(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith(PREFIX):
            response.headers.update(SECURITY_HEADERS)

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await tally.stop()

    app.on_response_prepare.append(secure)
    app.cleanup_ctx.append(lifecycle)
    app.router.add_get(PREFIX, to_index)
    app.router.add_get(f"{PREFIX}/", serve)
    app.router.add_get(f"{PREFIX}/{{name:.+}}", serve)
    app.router.add_get("/v1/console/me", who_am_i)
    app.router.add_get("/v1/console/publishing", publishing_health)
