"""Python SDK for the network's subscribers and publishers.

Two ways to receive insights, both yielding typed models (:data:`schemas.insights.INSIGHT_MODELS`):

- :class:`InsightStream` — **the tenant path.** Reads ``GET /v1/insights/stream`` (Server-Sent
  Events) of the gateway with the tenant's API key. The gateway decides what the key may read,
  per insight, when it is sent; a revoked agreement stops the flow on the open stream.
- :class:`Subscriber` — **the operator / trusted-consumer path.** A Kafka consumer group on the
  insight topics that filters with the same rule (:func:`shared.control.reading_grants`) against a
  :class:`~shared.control.ControlRegistry` it keeps up to date. The filter runs in the
  subscriber's own process, so it protects only against mistakes, not against a hostile
  client: whoever can read the insight topics directly can read everything. In production the
  barrier for direct Kafka access is Kafka's ACLs (only the operator's and trusted services'
  principals may read ``insights.*``); partners use the gateway.

:class:`GatewayClient` covers the rest of the HTTP API: listing insights, publishing events and
managing sharing agreements (what ``xietong share`` uses).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError

from schemas.control import Grant
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
from shared.codec import DecodeError, decode, encode
from shared.control import ControlRegistry, now, reading_grants
from shared.kafka import create_consumer, ensure_topics, stop_consumer
from shared.pseudonyms import as_read
from shared.settings import XietongSettings

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8080"
NOTICE_EVENTS = frozenset({"grant_revoked", "access_revoked", "gap", "end"})
"""SSE events that are not insights: the gateway tells the client about its access."""
FINAL_EVENTS = frozenset({"access_revoked"})
"""Notices after which reconnecting cannot help."""


def parse_insight(data: Any) -> Insight:
    """A decoded insight as its typed model; raises ``ValueError`` for anything else."""
    if not isinstance(data, dict) or data.get("type") not in INSIGHT_MODELS:
        raise ValueError(f"not an insight: {str(data)[:80]}")
    return INSIGHT_MODELS[data["type"]].model_validate(data)


def metrics_of(insight: Insight) -> tuple[str, ...]:
    """The metric names an insight is about (what ``?metric=`` matches)."""
    if isinstance(insight, Statistics | Benchmark):
        return (insight.metric,)
    if isinstance(insight, Correlation):
        return tuple(insight.metrics)
    if isinstance(insight, Prediction):
        return (insight.target,)
    if isinstance(insight, ClusterAssignment):
        return tuple(insight.features)
    return ()


@dataclass(frozen=True)
class InsightFilter:
    """The query filters of the list and stream routes; None matches anything."""

    types: frozenset[str] | None = None
    metric: str | None = None
    window_start: datetime | None = None
    owner: str | None = None

    def matches(self, insight: Insight) -> bool:
        if self.types is not None and insight.type not in self.types:
            return False
        if self.owner is not None and insight.tenant != self.owner:
            return False
        if self.metric is not None and self.metric not in metrics_of(insight):
            return False
        return self.window_start is None or insight.provenance.window_start == self.window_start


# --------------------------------------------------------------------------- Server-Sent Events


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None = None


class SseParser:
    """Incremental parser of a ``text/event-stream`` (the WHATWG rules that matter here)."""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self.last_event_id: str | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        """Feed one line (without its end-of-line); returns an event when a blank line ends one."""
        if line == "":
            if not self._data:
                self._event = ""
                return None
            event = ServerSentEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None  # a comment: heartbeats
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = self.last_event_id = value
        return None


async def iter_sse(lines: AsyncIterable[bytes]) -> AsyncIterator[ServerSentEvent]:
    """Server-Sent Events from an async iterator of raw lines (e.g. ``response.content``)."""
    parser = SseParser()
    async for raw in lines:
        event = parser.feed(raw.decode().rstrip("\r\n"))
        if event is not None:
            yield event


# --------------------------------------------------------------------------- HTTP clients


class GatewayError(RuntimeError):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"gateway answered {status}: {body[:500]}")
        self.status = status
        self.body = body


async def _raise_for(response: aiohttp.ClientResponse) -> None:
    if response.status >= 400:
        raise GatewayError(response.status, await response.text())


def _grant_of(data: dict[str, Any]) -> Grant:
    return Grant.model_validate({k: v for k, v in data.items() if k != "status"})


class _HttpClient:
    def __init__(
        self, url: str, api_key: str, *, session: aiohttp.ClientSession | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self._session = session
        self._own_session = session is None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None


class GatewayClient(_HttpClient):
    """The gateway's HTTP API with one tenant's key: insights, events and sharing agreements."""

    async def __aenter__(self) -> GatewayClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        async with self.session.request(
            method, self.url + path, headers=self.headers, **kwargs
        ) as response:
            await _raise_for(response)
            return decode(await response.read())

    async def insights(
        self,
        *,
        types: Iterable[str] = (),
        metric: str | None = None,
        owner: str | None = None,
        window_start: datetime | None = None,
        limit: int = 100,
    ) -> list[Insight]:
        """The latest insights this tenant may read, newest first."""
        params: list[tuple[str, str]] = [("type", t) for t in types]
        params += [("limit", str(limit))]
        if metric:
            params.append(("metric", metric))
        if owner:
            params.append(("owner", owner))
        if window_start is not None:
            params.append(("window_start", window_start.isoformat()))
        body = await self._json("GET", "/v1/insights", params=params)
        return [parse_insight(item) for item in body["insights"]]

    async def publish(self, events: Sequence[dict[str, Any]]) -> Any:
        """Publish events (``POST /v1/events``); returns the gateway's answer as decoded JSON."""
        return await self._post("/v1/events", list(events))

    async def _post(self, path: str, body: Any) -> Any:
        async with self.session.post(
            self.url + path,
            data=encode(body),
            headers={**self.headers, "Content-Type": "application/json"},
        ) as response:
            await _raise_for(response)
            return decode(await response.read())

    async def grant(
        self,
        grantee: str,
        insight_types: Iterable[str],
        *,
        expires_at: datetime | None = None,
        purpose: str = "",
    ) -> Grant:
        """Let ``grantee`` read this tenant's insights of ``insight_types`` until ``expires_at``."""
        body = {
            "grantee": grantee,
            "insight_types": list(insight_types),
            "expires_at": expires_at.isoformat() if expires_at else None,
            "purpose": purpose,
        }
        return _grant_of(await self._post("/v1/shares", body))

    async def revoke(self, grant_id: str) -> Grant:
        return _grant_of(await self._json("DELETE", f"/v1/shares/{grant_id}"))

    async def shares(self) -> dict[str, list[dict[str, Any]]]:
        """``{"granted": [...], "received": [...]}``, each grant with its ``status``."""
        result: dict[str, list[dict[str, Any]]] = await self._json("GET", "/v1/shares")
        return result

    async def audit(self) -> list[dict[str, Any]]:
        """This tenant's grant history (granted, revoked, expired), oldest first."""
        result = await self._json("GET", "/v1/shares/audit")
        history: list[dict[str, Any]] = result["history"]
        return history

    def stream(self, **kwargs: Any) -> InsightStream:
        return InsightStream(self.url, self.api_key, session=self.session, **kwargs)


class InsightStream(_HttpClient):
    """Live insights over the gateway's SSE stream — the path partners and consumers use.

    ``async with InsightStream(url, key, types=["statistics"]) as stream: async for insight in
    stream: ...`` yields typed insight models. Notices (``grant_revoked``, ``access_revoked``,
    ``gap``, ``end``) go to ``on_notice`` and :attr:`notices`. ``access_revoked`` ends the
    iteration; when the connection drops or the gateway ends the stream, the client reconnects
    (up to ``reconnect_attempts`` times in a row, ``retry_seconds`` apart) with
    ``Last-Event-ID``, and the gateway replays what it still holds after that insight (a ``gap``
    notice says it no longer does). ``replay=N`` starts with the latest N readable insights.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        types: Iterable[str] = (),
        metric: str | None = None,
        owner: str | None = None,
        replay: int = 0,
        last_event_id: str | None = None,
        reconnect_attempts: int = 5,
        retry_seconds: float = 3.0,
        session: aiohttp.ClientSession | None = None,
        on_notice: Callable[[ServerSentEvent], None] | None = None,
    ) -> None:
        super().__init__(url, api_key, session=session)
        self.params: list[tuple[str, str]] = [("type", t) for t in types]
        if metric:
            self.params.append(("metric", metric))
        if owner:
            self.params.append(("owner", owner))
        self.replay = replay
        self.last_event_id = last_event_id
        self.reconnect_attempts = reconnect_attempts
        self.retry_seconds = retry_seconds
        self.on_notice = on_notice
        self.notices: list[ServerSentEvent] = []
        self._response: aiohttp.ClientResponse | None = None

    async def open(self) -> None:
        """Connect; when this returns, the gateway is delivering new insights to this stream."""
        headers = {**self.headers, "Accept": "text/event-stream"}
        params = list(self.params)
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        elif self.replay:
            params.append(("replay", str(self.replay)))
        response = await self.session.get(
            self.url + "/v1/insights/stream",
            params=params,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        )
        try:
            await _raise_for(response)
            # The gateway's first frame (": connected") says this stream is subscribed.
            while (await response.content.readline()).strip():
                pass
        except BaseException:
            response.release()
            raise
        self._response = response

    def _drop_connection(self) -> None:
        if self._response is not None:
            self._response.close()
            self._response = None

    async def __aenter__(self) -> InsightStream:
        try:
            await self.open()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._drop_connection()
        await self.close()

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        """Every event of the current connection, insights and notices alike, as parsed."""
        if self._response is None:
            raise RuntimeError("the stream is not open (use `async with` or `await open()`)")
        async for event in iter_sse(self._response.content):
            if event.id:
                self.last_event_id = event.id
            yield event

    async def __aiter__(self) -> AsyncIterator[Insight]:
        failures = 0
        while True:
            if self._response is None:
                try:
                    await self.open()
                except aiohttp.ClientError as error:
                    if failures >= self.reconnect_attempts:
                        raise
                    failures += 1
                    log.warning("stream reconnect failed (%s); retrying", error)
                    await asyncio.sleep(self.retry_seconds)
                    continue
            try:
                async for event in self.events():
                    failures = 0
                    if event.event in NOTICE_EVENTS:
                        self.notices.append(event)
                        if self.on_notice is not None:
                            self.on_notice(event)
                        if event.event in FINAL_EVENTS:
                            return
                        if event.event == "end":
                            break
                        continue
                    try:
                        yield parse_insight(decode(event.data))
                    except (DecodeError, ValueError) as error:  # ValidationError is a ValueError
                        log.warning("unreadable stream event skipped: %s", error)
            except aiohttp.ClientError as error:
                log.warning("stream connection lost: %s", error)
            self._drop_connection()
            if failures >= self.reconnect_attempts:
                return
            failures += 1
            await asyncio.sleep(self.retry_seconds)


# --------------------------------------------------------------------------- Kafka subscriber


class Subscriber:
    """A consumer group on the insight topics yielding the insights ``tenant`` may read.

    For the operator and trusted services (see the module docstring: over Kafka, ACLs are the
    barrier, this filter is not). Delivery is at-least-once: the offsets of a batch are committed
    when the next one is asked for, or on :meth:`stop` once all of it was handed out. The rule
    is applied when a record is read, against the registry as it is then.
    """

    def __init__(
        self,
        settings: XietongSettings,
        tenant: str,
        registry: ControlRegistry | None = None,
        *,
        types: Iterable[str] | None = None,
        group_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.tenant = tenant
        self.types = tuple(types) if types is not None else tuple(INSIGHT_TOPICS)
        unknown = sorted(set(self.types) - INSIGHT_TOPICS.keys())
        if unknown:
            raise ValueError(f"unknown insight type(s) {unknown}")
        self.group_id = group_id or f"subscriber.{tenant}"
        self._registry = registry
        self._own_registry = registry is None
        self._consumer: AIOKafkaConsumer | None = None
        self._pending: dict[TopicPartition, int] = {}
        self._handed_out = True
        secret = settings.network_secret
        self._network_key = secret.get_secret_value().encode() if secret else None

    @property
    def registry(self) -> ControlRegistry:
        if self._registry is None:
            raise RuntimeError("the subscriber is not started")
        return self._registry

    async def start(self) -> None:
        topics = [INSIGHT_TOPICS[t] for t in self.types]
        await ensure_topics(self.settings, topics)
        if self._registry is None:
            self._registry = ControlRegistry(self.settings)
            await self._registry.start()
        consumer = create_consumer(self.settings, self.group_id, *topics)
        try:
            await consumer.start()
        except BaseException:
            await self._stop_registry()
            raise
        self._consumer = consumer

    async def _stop_registry(self) -> None:
        if self._own_registry and self._registry is not None:
            await self._registry.stop()
            self._registry = None

    async def stop(self) -> None:
        if self._consumer is not None:
            if self._handed_out:
                await self.commit()
            await stop_consumer(self._consumer)
            self._consumer = None
        await self._stop_registry()

    async def __aenter__(self) -> Subscriber:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    @property
    def consumer(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("the subscriber is not started")
        return self._consumer

    async def commit(self) -> None:
        """Commit what was handed out so far."""
        if not self._pending:
            return
        offsets, self._pending = self._pending, {}
        try:
            await self.consumer.commit(offsets)
        except CommitFailedError:  # a rebalance moved the partitions: they are read again
            log.warning("commit failed after a rebalance; records may be delivered again")

    async def poll(self, timeout_ms: int | None = None) -> list[Insight]:
        """The next batch of readable insights (possibly empty); commits the previous batch."""
        await self.commit()
        batch = await self.consumer.getmany(
            timeout_ms=timeout_ms
            if timeout_ms is not None
            else self.settings.kafka_fetch_timeout_ms,
            max_records=self.settings.kafka_fetch_max_records,
        )
        at = now()
        grants = self.registry.grants_to(self.tenant, at)
        found: list[Insight] = []
        for tp, records in batch.items():
            for record in records:
                try:
                    insight = parse_insight(decode(record.value))
                except (DecodeError, ValueError):
                    log.error(
                        "unreadable insight skipped",
                        extra={
                            "topic": tp.topic,
                            "partition": tp.partition,
                            "offset": record.offset,
                        },
                    )
                    continue
                allowing = reading_grants(
                    self.tenant,
                    owner=insight.tenant,
                    visibility=insight.visibility,
                    insight_type=insight.type,
                    grants=grants,
                    at=at,
                )
                if allowing is not None:
                    # a grantee sees the pseudonyms of its agreement, as through the gateway
                    found.append(as_read(insight, allowing, self._network_key))
            self._pending[tp] = records[-1].offset + 1
        return found

    async def __aiter__(self) -> AsyncIterator[Insight]:
        while True:
            batch = await self.poll()
            self._handed_out = False
            for insight in batch:
                yield insight
            self._handed_out = True

    async def at_end(self) -> bool:
        """True when every assigned partition has been read up to its current end."""
        assigned = list(self.consumer.assignment())
        if not assigned:
            return False
        end = await self.consumer.end_offsets(assigned)
        for tp in assigned:
            if await self.consumer.position(tp) < end[tp]:
                return False
        return True


__all__ = [
    "DEFAULT_URL",
    "GatewayClient",
    "GatewayError",
    "InsightStream",
    "ServerSentEvent",
    "SseParser",
    "Subscriber",
    "iter_sse",
    "parse_insight",
]
