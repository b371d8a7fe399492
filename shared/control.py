"""The control plane: tenants, API keys and sharing agreements, kept on compacted Kafka topics.

:class:`ControlWriter` publishes changes (the CLI and the gateway use it); :class:`ControlRegistry`
reads the three topics from the beginning into memory and then tails them, so every replica of
every service sees the same registry and a revocation reaches open streams within moments.

API keys look like ``xt_<key_id>_<secret>``; only ``sha256(secret)`` is stored. The secret is
256 random bits, so a fast hash is the right one (a slow password hash protects low-entropy
secrets; this one has none to protect). Comparison is constant-time.

Who may read an insight (:func:`reading_grants`, the one rule): its owner; everyone if it is
public (benchmarks); a grantee of an active agreement of the owner covering its type.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from schemas.control import ApiKey, Grant, Tenant
from schemas.topics import CONTROL_GRANTS, CONTROL_KEYS, CONTROL_TENANTS
from shared.codec import decode, encode
from shared.kafka import BatchPublisher, OutRecord, create_consumer, create_producer, ensure_topics
from shared.settings import XietongSettings

log = logging.getLogger(__name__)

CONTROL_TOPICS = (CONTROL_TENANTS, CONTROL_KEYS, CONTROL_GRANTS)
KEY_PREFIX = "xt"


def now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return secrets.token_hex(8)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def issue_api_key(tenant: str, label: str = "") -> tuple[str, ApiKey]:
    """A new key: the plaintext (show it once) and the record to store (digest only)."""
    key_id = new_id()
    secret = secrets.token_urlsafe(32)
    record = ApiKey(
        key_id=key_id, tenant=tenant, sha256=digest(secret), label=label, created_at=now()
    )
    return f"{KEY_PREFIX}_{key_id}_{secret}", record


def parse_api_key(api_key: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else None."""
    prefix, _, rest = api_key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not key_id or not secret:
        return None
    return key_id, secret


def reading_grants(
    reader: str,
    *,
    owner: str,
    visibility: str,
    insight_type: str,
    grants: Iterable[Grant],
    at: datetime,
) -> list[Grant] | None:
    """The sharing rule, the one function every path out of the platform applies.

    None when ``reader`` may not read an insight of ``owner``; otherwise the agreements that let
    it (an empty list for its own insights and public ones, which need none) — a stream keeps
    them to tell its client when one of them ends."""
    if reader == owner or visibility == "public":
        return []
    allowing = [
        g
        for g in grants
        if g.grantee == reader
        and g.owner == owner
        and insight_type in g.insight_types
        and g.active_at(at)
    ]
    return allowing or None


def may_read(
    reader: str,
    *,
    owner: str,
    visibility: str,
    insight_type: str,
    grants: Iterable[Grant],
    at: datetime,
) -> bool:
    """Whether :func:`reading_grants` lets ``reader`` read."""
    return (
        reading_grants(
            reader,
            owner=owner,
            visibility=visibility,
            insight_type=insight_type,
            grants=grants,
            at=at,
        )
        is not None
    )


class ControlWriter:
    """Publishes tenants, keys and grants (acks=all) to their compacted topics."""

    def __init__(self, settings: XietongSettings) -> None:
        self.settings = settings
        self._producer = create_producer(settings)
        self._publisher = BatchPublisher(self._producer)

    async def start(self) -> None:
        await ensure_topics(self.settings, CONTROL_TOPICS, compacted=CONTROL_TOPICS)
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def __aenter__(self) -> ControlWriter:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def put_tenant(self, tenant: Tenant) -> None:
        await self._publisher.publish(
            CONTROL_TENANTS, [OutRecord(tenant.tenant.encode(), encode(tenant))]
        )

    async def put_key(self, key: ApiKey) -> None:
        await self._publisher.publish(CONTROL_KEYS, [OutRecord(key.key_id.encode(), encode(key))])

    async def put_grant(self, grant: Grant) -> None:
        await self._publisher.publish(
            CONTROL_GRANTS, [OutRecord(grant.grant_id.encode(), encode(grant))]
        )


class ControlRegistry:
    """An in-memory, continuously updated view of the control topics that fails closed.

    A background task reads the topics; every ``control_sync_interval_seconds`` it asks the broker
    where they end and, once it has read up to there, records that moment as :attr:`synced_at`.
    So a change acknowledged by Kafka at time ``t`` is applied by the first sync that starts after
    ``t``: within one interval plus one fetch. When no sync has completed for
    ``control_max_staleness_seconds`` (the broker is away, the task is failing), :meth:`problem`
    says why and :meth:`authenticate` vouches for no key: a registry that cannot prove it is
    current must not keep honouring keys that may have been revoked meanwhile.

    Waiting for a change (:meth:`wait_changed`) holds no lock: each change sets the event the
    waiters of that moment hold and replaces it, so a waiter cancelled at any point (a stream
    whose client went away) can never stop the registry from applying the next change.
    """

    def __init__(self, settings: XietongSettings) -> None:
        self.settings = settings
        self.tenants: dict[str, Tenant] = {}
        self.keys: dict[str, ApiKey] = {}
        self.grants: dict[str, Grant] = {}
        self.version = 0
        self.synced_at: float | None = None
        """Monotonic time at which the last completed sync started (None: never synced)."""
        self._failure: str | None = None
        self._changed = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load everything written so far, then keep tailing in the background."""
        await ensure_topics(self.settings, CONTROL_TOPICS, compacted=CONTROL_TOPICS)
        consumer = create_consumer(self.settings, None)
        await consumer.start()
        self._consumer = consumer
        try:
            await self._load_all(consumer)
        except BaseException:
            await consumer.stop()
            raise
        self._task = asyncio.create_task(self._tail(), name="control-registry-tail")
        self._task.add_done_callback(self._report_end)

    async def _load_all(self, consumer: AIOKafkaConsumer) -> None:
        partitions = [
            TopicPartition(topic, p)
            for topic in CONTROL_TOPICS
            for p in sorted(await self._partitions_of(consumer, topic))
        ]
        consumer.assign(partitions)
        self._partitions = partitions
        await consumer.seek_to_beginning(*partitions)
        started = time.monotonic()
        end = await consumer.end_offsets(partitions)
        while any([await consumer.position(tp) < offset for tp, offset in end.items()]):
            await self._apply(await consumer.getmany(timeout_ms=200))
        self.synced_at = started
        self._notify()

    @staticmethod
    async def _partitions_of(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
        for _ in range(50):
            found = consumer.partitions_for_topic(topic)
            if found:
                return set(found)
            await consumer._client.force_metadata_update()  # new topic: metadata lags a moment
            await asyncio.sleep(0.1)
        raise RuntimeError(f"control topic {topic} has no partitions")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()

    async def __aenter__(self) -> ControlRegistry:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _tail(self) -> None:
        """Follow the topics for ever; a failure is logged, reported and retried, never final."""
        backoff = 0.5
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # anything: the registry goes stale and says why
                self._failure = f"control registry cannot follow the control topics: {error!r}"
                log.error(self._failure, exc_info=error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _follow(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        interval = self.settings.control_sync_interval_seconds
        # Asking for the ends must not hang the loop for the client's whole request timeout.
        ask_timeout = max(interval, self.settings.control_max_staleness_seconds / 2)
        target: dict[TopicPartition, int] | None = None
        target_asked_at = 0.0
        next_sync = 0.0
        while True:
            if target is None and time.monotonic() >= next_sync:
                target_asked_at = time.monotonic()
                async with asyncio.timeout(ask_timeout):
                    target = await consumer.end_offsets(self._partitions)
                next_sync = target_asked_at + interval
            batch = await consumer.getmany(timeout_ms=min(200, int(interval * 1000)))
            if batch:
                await self._apply(batch)
            if target is not None and all(
                [await consumer.position(tp) >= offset for tp, offset in target.items()]
            ):
                self.synced_at, target, self._failure = target_asked_at, None, None

    def _report_end(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failure = f"control registry stopped: {task.exception()!r}"
            log.error(self._failure, exc_info=task.exception())

    async def _apply(self, batch: dict[TopicPartition, list[Any]]) -> None:
        stores: dict[str, tuple[dict[str, Any], type[Any]]] = {
            CONTROL_TENANTS: (self.tenants, Tenant),
            CONTROL_KEYS: (self.keys, ApiKey),
            CONTROL_GRANTS: (self.grants, Grant),
        }
        for tp, records in batch.items():
            store, model = stores[tp.topic]
            for record in records:
                where = {"topic": tp.topic, "partition": tp.partition, "offset": record.offset}
                if record.key is None:  # not ours: every control record is keyed by its id
                    log.error("control record without a key skipped", extra=where)
                    continue
                key = record.key.decode(errors="replace")
                if record.value is None:  # a tombstone deletes
                    store.pop(key, None)
                    continue
                try:
                    value = model.model_validate(decode(record.value))
                except (ValidationError, ValueError, TypeError):
                    log.error("unreadable control record skipped", extra=where)
                    continue
                if _id_of(value) != key:
                    # A record filed under another id would shadow (or revive) that id's entry.
                    log.error("control record whose key is not its id skipped", extra=where)
                    continue
                store[key] = value
        self._notify()

    def _notify(self) -> None:
        self.version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_changed(self, seen_version: int, timeout: float) -> int:
        """Wait until the registry moved past ``seen_version`` (or ``timeout``); return it.

        Safe to cancel at any point: it holds nothing another task needs."""
        if self.version <= seen_version:
            event = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await event.wait()
        return self.version

    # ------------------------------------------------------------------ health

    def problem(self) -> str | None:
        """Why the registry cannot vouch for keys right now, or None when it is current."""
        if self.synced_at is None:
            return "control registry has not loaded the control topics yet"
        age = time.monotonic() - self.synced_at
        if age > self.settings.control_max_staleness_seconds:
            reason = self._failure or "the broker has not confirmed the control topics' end"
            return f"control registry not confirmed current for {age:.0f} s ({reason})"
        return None

    # ------------------------------------------------------------------ queries

    def tenant(self, tenant_id: str) -> Tenant | None:
        return self.tenants.get(tenant_id)

    def authenticate(self, api_key: str | None) -> Tenant | None:
        """The active tenant a valid, unrevoked key belongs to; None for anything else, and for
        every key while the registry is not current (:meth:`problem`)."""
        if self.problem() is not None:
            return None
        parsed = parse_api_key(api_key or "")
        if parsed is None:
            return None
        key_id, secret = parsed
        record = self.keys.get(key_id)
        if record is None or record.revoked_at is not None:
            return None
        if not hmac.compare_digest(record.sha256, digest(secret)):
            return None
        tenant = self.tenants.get(record.tenant)
        return tenant if tenant is not None and tenant.active else None

    def grants_to(self, grantee: str, at: datetime | None = None) -> list[Grant]:
        """The agreements in force for ``grantee``; none while the registry is not current."""
        if self.problem() is not None:
            return []
        moment = at or now()
        tenant = self.tenants.get(grantee)
        if tenant is None:
            return []
        # A grant made before its grantee existed named an id nobody held then: it never applies
        # (the gateway does not tell a grantor which ids exist, so such grants can be made).
        return [
            g
            for g in self.grants.values()
            if g.grantee == grantee and g.created_at >= tenant.created_at and g.active_at(moment)
        ]

    def grants_by(self, owner: str) -> list[Grant]:
        return [g for g in self.grants.values() if g.owner == owner]

    def may_read(self, reader: str, *, owner: str, visibility: str, insight_type: str) -> bool:
        return may_read(
            reader,
            owner=owner,
            visibility=visibility,
            insight_type=insight_type,
            grants=self.grants_to(reader),
            at=now(),
        )


def _id_of(record: Tenant | ApiKey | Grant) -> str:
    if isinstance(record, Tenant):
        return record.tenant
    if isinstance(record, ApiKey):
        return record.key_id
    return record.grant_id
