"""The work of ``POST /v1/events``: read the body as a stream, parse it, validate, publish, answer.

The content type decides the parser:

- ``application/json`` — a JSON array of events; a body that is not JSON or not an array is a
  whole-request error (400); an element that is not an event is refused on its own;
- ``application/x-ndjson`` (also ``application/ndjson``, ``application/jsonl``) — one event per
  line; a line that is not JSON is refused on its own, blank lines are skipped; a refusal's
  ``index`` is the 0-based line number;
- ``text/csv`` — see :mod:`services.ingest.csvmap`; the event type comes from ``?type=`` and
  ``?version=`` (422 when they name no contract), a refusal's ``index`` is the 0-based data row.

For JSON and NDJSON the type is per record, so a record of an unknown type or version is a
per-record refusal (``field: "type"``), not a 422: the other records of the request still go in.

The body is read chunk by chunk into one buffer and the size limit is enforced while reading
(413 as soon as it is exceeded, or at once when ``Content-Length`` says so). NDJSON lines are
validated straight from their bytes in Rust (:func:`~services.ingest.intake.validate_json_lines`;
only a line that fails is decoded, to say why); JSON arrays are decoded with orjson and validated
record by record. The accepted ones and the dead letters of the refused ones are published
together and the answer (202) is sent only after Kafka acknowledged all of them (``acks=all``).
The answer: ``{accepted, refused, refusals: [{index, field, reason}], request_id}``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import ContentEncodingError
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Histogram
from pydantic import BaseModel, ConfigDict, Field

from schemas.events import DEFAULT_EVENT_TIME, EventTimeBounds
from services.ingest.csvmap import CsvError, parse_csv, resolve_type
from services.ingest.intake import (
    ForeignTenant,
    Incoming,
    Intake,
    publish_intake,
    validate_json_lines,
    validate_records,
)
from shared.codec import DecodeError, decode, encode, json_response
from shared.httpauth import authenticated_tenant
from shared.kafka import (
    BatchPublisher,
    KafkaHealth,
    OutRecord,
    Text,
    is_broken_producer_error,
)

log = logging.getLogger(__name__)

JSON_TYPES = frozenset({"application/json"})
NDJSON_TYPES = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"}
)
CSV_TYPES = frozenset({"text/csv"})


# --------------------------------------------------------------------------- answers (documented)


class Refusal(BaseModel):
    """One reason one record was refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    index: int = Field(description="Position of the record: array index, NDJSON line, CSV row.")
    field: str = Field(description="Dotted path of the field, or '' for the whole record.")
    reason: str = Field(description="What is wrong, in words a partner can act on.")


class IngestAnswer(BaseModel):
    """202: what happened to every record of the request, after Kafka acknowledged them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    accepted: int = Field(ge=0, description="Records published to events.raw.v1.")
    refused: int = Field(ge=0, description="Records refused (and sent to events.raw.v1.dlq).")
    refusals: list[Refusal] = Field(description="Why each refused record was refused.")
    request_id: str = Field(description="Id of this request, also in the X-Request-Id header.")


class ErrorAnswer(BaseModel):
    """A whole-request error: nothing of the request was published."""

    model_config = ConfigDict(frozen=True, extra="allow")

    error: str = Field(description="What is wrong with the request as a whole.")
    request_id: str | None = Field(None, description="Id of this request, when it has one.")


class RequestError(Exception):
    """A whole-request error with its HTTP status; ``close`` ends the connection after the
    answer (the rest of a body that could not be read cannot be told from the next request)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        close: bool = False,
        retry_after: int | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.retry_after = retry_after
        self.details = details


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of its own (one per app)."""

    registry: CollectorRegistry
    requests: Counter
    accepted: Counter
    refused: Counter
    publish_seconds: Histogram
    round_requests: Histogram
    _children: dict[tuple[str, ...], Any] = dataclasses.field(default_factory=dict, compare=False)

    def request_counter(self, route: str, method: str, status: int) -> Any:
        """The child counter of these labels, looked up once (``labels()`` takes a lock)."""
        key = ("requests", route, method, str(status))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(route, method, key[3])
        return child

    def accepted_counter(self, body_format: str) -> Any:
        key = ("accepted", body_format)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.accepted.labels(body_format)
        return child

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> GatewayMetrics:
        registry = registry or CollectorRegistry()
        return cls(
            registry=registry,
            requests=Counter(
                "xietong_ingest_http_requests",
                "HTTP requests by route, method and status.",
                ["route", "method", "status"],
                registry=registry,
            ),
            accepted=Counter(
                "xietong_ingest_records_accepted",
                "Records published to the raw topic, by body format.",
                ["format"],
                registry=registry,
            ),
            refused=Counter(
                "xietong_ingest_records_refused",
                "Records refused and dead-lettered, by reason.",
                ["reason"],
                registry=registry,
            ),
            publish_seconds=Histogram(
                "xietong_ingest_publish_seconds",
                "Time from the first send of a request's records to the last acknowledgement.",
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                registry=registry,
            ),
            round_requests=Histogram(
                "xietong_ingest_publish_round_requests",
                "Requests whose records shared one publish round (group commit).",
                buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                registry=registry,
            ),
        )


class CoalescingPublisher(BatchPublisher):
    """Group commit: the records of concurrent requests travel in the same producer batches.

    Each request still publishes all its records at once and is answered only after every one
    of them is acknowledged; but instead of each request building its own per-partition batch
    (which Kafka would take one round trip after another on a busy partition), the records of
    every request that arrives while the rounds are in flight are sent together in the next one:
    throughput grows with concurrency and a request waits about one round trip.

    With more than one producer (``lanes``), up to that many rounds are in flight at once, each
    on its own producer (a producer has one request in flight per partition). The records of one
    request always travel in one round, so they stay in order; requests answered one after the
    other stay in order too. A failed round fails every request in it (each answers 503 and its
    client retries; event ids make that safe). A lane whose producer broke (its idempotence
    state lost: :func:`shared.kafka.is_broken_producer_error`) gets a new producer from
    ``renew_with`` before it takes another round; until then :meth:`problem` says so.
    """

    def __init__(
        self,
        producer: Any,
        *,
        lanes: Sequence[Any] = (),
        round_requests: Histogram | None = None,
        renew_with: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(producer)
        self._round_requests = round_requests
        self.lanes: list[BatchPublisher] = [
            BatchPublisher(p, renew_with=renew_with) for p in (producer, *lanes)
        ]
        self._idle: list[BatchPublisher] = list(self.lanes)
        self._pending: dict[str, list[OutRecord]] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._rounds: set[asyncio.Task[None]] = set()

    async def publish_many(self, batches: dict[str, Sequence[OutRecord]]) -> int:
        count = 0
        for topic, records in batches.items():
            if records:
                self._pending.setdefault(topic, []).extend(records)
                count += len(records)
        if not count:
            return 0
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._start_rounds()
        await waiter
        return count

    def _start_rounds(self) -> None:
        while self._waiters and self._idle:
            lane = self._idle.pop()
            pending: dict[str, Sequence[OutRecord]] = dict(self._pending)
            waiters = self._waiters
            self._pending, self._waiters = {}, []
            if self._round_requests is not None:
                self._round_requests.observe(len(waiters))
            task = asyncio.create_task(self._round(lane, pending, waiters), name="ingest-round")
            self._rounds.add(task)
            task.add_done_callback(self._rounds.discard)

    async def _round(
        self,
        lane: BatchPublisher,
        pending: dict[str, Sequence[OutRecord]],
        waiters: list[asyncio.Future[None]],
    ) -> None:
        try:
            await lane.publish_many(pending)
        except BaseException as error:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            if isinstance(error, asyncio.CancelledError):
                raise
            if is_broken_producer_error(error) or lane.broken() is not None:
                try:  # a new producer id before the lane takes another round
                    await lane.renew()
                except (KafkaError, OSError, TimeoutError) as renewal:
                    log.warning("producer not replaced yet", extra={"error": repr(renewal)})
        else:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        finally:
            self._idle.append(lane)
            self._start_rounds()

    def problem(self) -> str | None:
        """Why the gateway cannot publish, as far as its producers know; None if it can."""
        return next((p for lane in self.lanes if (p := lane.problem()) is not None), None)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the rounds in flight (before the producers stop)."""
        rounds = list(self._rounds)
        if not rounds:
            return
        _, late = await asyncio.wait(rounds, timeout=timeout)
        if late:
            log.error("publish rounds still unacknowledged at shutdown; abandoning them")
            for task in late:
                task.cancel()
            await asyncio.wait(late)


PUBLISHER_KEY = web.AppKey("publisher", BatchPublisher)
METRICS_KEY = web.AppKey("metrics", GatewayMetrics)
MAX_BODY_KEY = web.AppKey("max_body_bytes", int)
PUBLISH_TIMEOUT_KEY = web.AppKey("publish_timeout", float)
KAFKA_HEALTH_KEY = web.AppKey("kafka_health", KafkaHealth)
RETRY_AFTER_SECONDS = 5
"""``Retry-After`` of a 503 for Kafka: a broker restart or a producer replacement takes seconds."""
EVENT_TIME_KEY = web.AppKey("event_time_bounds", EventTimeBounds)
REQUEST_ID_KEY = web.RequestKey("request_id", str)
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def route_name(request: web.Request) -> str:
    """The route template (``/v1/shares/{grant_id}``), never the raw path (bounded labels)."""
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def reason_label(reason: str) -> str:
    """A bounded metric label: the reason up to its first colon."""
    return reason.partition(":")[0][:60]


# --------------------------------------------------------------------------- reading and parsing


async def read_body(request: web.Request, limit: int) -> bytes | bytearray:
    """The body as one buffer, refused with 413 as soon as it grows past ``limit`` bytes.

    It is the only copy of the body the gateway holds: the records parsed from it are views
    into it (see :func:`split_ndjson`, :func:`parse_json_array`) until Kafka's batches take
    them."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise RequestError(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    stream = request.content
    try:
        # Whatever has arrived already, in one piece; a body that arrived whole is not copied.
        first = await stream.readany()
        if len(first) > limit:
            raise RequestError(413, f"body exceeds the limit of {limit} bytes")
        if stream.at_eof():
            return first
        body = bytearray(first)
        while chunk := await stream.readany():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"body exceeds the limit of {limit} bytes")
    except (web.RequestPayloadError, ContentEncodingError) as error:
        # aiohttp inflates a Content-Encoding body as it reads it: this one does not inflate
        encoding = request.headers.get("Content-Encoding", "")
        cause = error.__cause__ or error
        raise RequestError(
            400,
            f"the body cannot be decoded as Content-Encoding {encoding!r}: {cause}",
            close=True,
        ) from None
    return body


@dataclass
class Parsed:
    """Records of a body (every refusal the intake makes keeps its record's own text)."""

    items: list[Incoming]
    format: str
    source_system: str = "http"
    lines: list[tuple[int, Text]] | None = None
    """NDJSON: the non-blank lines, JSON: the elements, as (index, view into the body),
    validated straight from their bytes."""


def parse_json_array(body: bytes | bytearray) -> Parsed:
    """A JSON array of events (400 if the body is not JSON or not an array), as the JSON text of
    each element: validated straight from it like an NDJSON line."""
    try:
        elements: list[Text] = [memoryview(element) for element in JSON_ARRAY.decode(body)]
    except (msgspec.DecodeError, RecursionError):
        # Says precisely what is wrong; should orjson read what msgspec did not, use that.
        elements = [encode(record) for record in _json_array(body)]
    return Parsed([], "json", lines=list(enumerate(elements)))


JSON_ARRAY = msgspec.json.Decoder(list[msgspec.Raw])
"""A JSON array as the undecoded text of each element (each refers to the body, no copy)."""

BLANK = frozenset(b" \t\r\x0b\x0c")


def _json_array(body: bytes | bytearray) -> list[Any]:
    """The body decoded, or 400 with what is wrong: not JSON, or JSON but not an array."""
    try:
        data = decode(body)
    except DecodeError as error:
        raise RequestError(400, f"the body is not valid JSON: {error}") from None
    if not isinstance(data, list):
        raise RequestError(
            400,
            f"the body must be a JSON array of events, not a JSON {type(data).__name__}",
        )
    return data


def split_ndjson(body: bytes | bytearray) -> Parsed:
    """NDJSON as its non-blank lines, not decoded and not copied (views into the body):
    :func:`validate_json_lines` validates each straight from its bytes (and decodes only the
    ones it refuses, to say why)."""
    view = memoryview(body)
    lines: list[tuple[int, Text]] = []
    find, size, start, index = body.find, len(body), 0, 0
    while start < size:
        end = find(b"\n", start)
        if end < 0:
            end = size
        if end > start and (body[start] not in BLANK or not bytes(view[start:end]).isspace()):
            lines.append((index, view[start:end]))
        start, index = end + 1, index + 1
    return Parsed([], "ndjson", lines=lines)


def parse_csv_body(body: bytes | bytearray, request: web.Request, tenant: str) -> Parsed:
    try:
        type_name, version = resolve_type(request.query.get("type"), request.query.get("version"))
        items = parse_csv(body, tenant, type_name, version)
    except CsvError as error:
        raise RequestError(error.status, str(error)) from None
    return Parsed(items, "csv", source_system="csv")


def parse_body(body: bytes | bytearray, request: web.Request, tenant: str) -> Parsed:
    """Choose the parser by content type (415 for anything else)."""
    media = request.content_type
    charset = (request.charset or "utf-8").lower()
    if charset not in ("utf-8", "utf8"):
        raise RequestError(415, f"the body must be UTF-8, not {charset}")
    if media in JSON_TYPES:
        return parse_json_array(body)
    if media in NDJSON_TYPES:
        return split_ndjson(body)
    if media in CSV_TYPES:
        return parse_csv_body(body, request, tenant)
    known = ", ".join(sorted(JSON_TYPES | NDJSON_TYPES | CSV_TYPES))
    raise RequestError(415, f"unsupported content type {media!r}; use one of: {known}")


def validate_parsed(
    parsed: Parsed, tenant: str, bounds: EventTimeBounds = DEFAULT_EVENT_TIME
) -> Intake:
    """Validate a parsed body for ``tenant``, received now: lines from their bytes, CSV rows as
    decoded. Raises :class:`~services.ingest.intake.ForeignTenant`."""
    if parsed.lines is not None:
        return validate_json_lines(
            parsed.lines, tenant, source_system=parsed.source_system, bounds=bounds
        )
    return validate_records(parsed.items, tenant, source_system=parsed.source_system, bounds=bounds)


def refusals_of(intake: Intake) -> list[dict[str, Any]]:
    return [
        {"index": refused.index, "field": error.field, "reason": error.reason}
        for refused in intake.refused
        for error in refused.errors
    ]


# --------------------------------------------------------------------------- the handler


async def post_events(request: web.Request) -> web.Response:
    """Publish events: a JSON array, NDJSON or CSV (``?type=&version=``); 202 once acknowledged."""
    request_id = request.get(REQUEST_ID_KEY) or uuid.uuid4().hex
    tenant = authenticated_tenant(request)
    if tenant.kind == "consumer":
        raise RequestError(403, f"tenant {tenant.tenant!r} is a consumer: it may not publish")
    if request.content_type not in JSON_TYPES | NDJSON_TYPES | CSV_TYPES:
        parse_body(b"", request, tenant.tenant)  # raises the precise 415 before reading
    # Asked before the body is read and checked: validating a large body holds the event loop,
    # which delays the broker probe's answer too — asked after, a healthy broker looked away.
    unreachable = request.app[KAFKA_HEALTH_KEY].unreachable()
    if unreachable is not None:  # answer now rather than hold the client for the timeout
        raise RequestError(
            503,
            f"{unreachable}; nothing was published: retry the same request later",
            retry_after=RETRY_AFTER_SECONDS,
        )
    body = await read_body(request, request.app[MAX_BODY_KEY])
    if not body:
        raise RequestError(400, "the body is empty")
    parsed = parse_body(body, request, tenant.tenant)
    try:
        intake = validate_parsed(parsed, tenant.tenant, request.app[EVENT_TIME_KEY])
    except ForeignTenant as error:
        raise RequestError(403, str(error), index=error.index) from None
    fmt = parsed.format
    del body, parsed  # the records are all that is needed from here on

    metrics = request.app[METRICS_KEY]
    publisher = request.app[PUBLISHER_KEY]
    started = time.perf_counter()
    try:
        async with asyncio.timeout(request.app[PUBLISH_TIMEOUT_KEY]):
            await publish_intake(publisher, intake, tenant.tenant, source_ref=f"http:{request_id}")
    except (KafkaError, TimeoutError) as error:
        log.error("publish failed", extra={"request_id": request_id, "error": repr(error)})
        raise RequestError(
            503,
            "Kafka did not acknowledge the records in time; retry the same request (records "
            "that did get through carry the same event ids and are dropped as duplicates)",
            retry_after=RETRY_AFTER_SECONDS,
        ) from None
    metrics.publish_seconds.observe(time.perf_counter() - started)

    metrics.accepted_counter(fmt).inc(len(intake.accepted))
    for refused in intake.refused:
        metrics.refused.labels(reason_label(refused.reason)).inc()
    return json_response(
        {
            "accepted": len(intake.accepted),
            "refused": len(intake.refused),
            "refusals": refusals_of(intake),
            "request_id": request_id,
        },
        status=202,
        headers={"X-Request-Id": request_id},
    )


# --------------------------------------------------------------------------- middlewares

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: every request counted by route and status, a request id on every answer."""
    offered = request.headers.get("X-Request-Id", "")
    request_id = offered if SAFE_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
    request[REQUEST_ID_KEY] = request_id
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as error:
        status = error.status
        raise
    finally:
        request.app[METRICS_KEY].request_counter(route_name(request), request.method, status).inc()


@web.middleware
async def answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """:class:`RequestError` -> its JSON answer; anything unexpected is logged, never leaked."""
    request_id = request.get(REQUEST_ID_KEY)
    try:
        return await handler(request)
    except RequestError as error:
        headers = {"X-Request-Id": request_id or ""}
        if error.retry_after is not None:
            headers["Retry-After"] = str(error.retry_after)
        response = json_response(
            {"error": error.message, **error.details, "request_id": request_id},
            status=error.status,
            headers=headers,
        )
        if error.close:
            response.force_close()
        return response
    except web.HTTPException:
        raise
    except Exception:
        log.exception("unexpected error", extra={"request_id": request_id, "path": request.path})
        return json_response({"error": "internal error", "request_id": request_id}, status=500)
