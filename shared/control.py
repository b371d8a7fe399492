"""The control plane: tenants, API keys and sharing agreements, kept on compacted Kafka topics.

:class:`ControlWriter` publishes changes (the CLI and the gateway use it); :class:`ControlRegistry`
reads the three topics from the beginning into memory and then tails them, so every replica of
every service sees the same registry and a revocation reaches open streams within moments.

API keys look like ``xt_<key_id>_<secret>``; only ``sha256(secret)`` is stored. The secret is
256 random bits, so a fast hash is the right one (a slow password hash protects low-entropy
secrets; this one has none to protect). Comparison is constant-time.

Who may read an insight (:func:`may_read`): its owner; everyone if it is public (benchmarks that
passed their thresholds); a grantee of an active agreement of the owner covering its type.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
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


def may_read(
    reader: str,
    *,
    owner: str,
    visibility: str,
    insight_type: str,
    grants: Iterable[Grant],
    at: datetime,
) -> bool:
    """The sharing rule, the same on every path out of the platform."""
    if reader == owner or visibility == "public":
        return True
    return any(
        g.grantee == reader
        and g.owner == owner
        and insight_type in g.insight_types
        and g.active_at(at)
        for g in grants
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
    """An in-memory, continuously updated view of the control topics."""

    def __init__(self, settings: XietongSettings) -> None:
        self.settings = settings
        self.tenants: dict[str, Tenant] = {}
        self.keys: dict[str, ApiKey] = {}
        self.grants: dict[str, Grant] = {}
        self.version = 0
        self._changed = asyncio.Condition()
        self._consumer: AIOKafkaConsumer | None = None
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

    async def _load_all(self, consumer: AIOKafkaConsumer) -> None:
        partitions = [
            TopicPartition(topic, p)
            for topic in CONTROL_TOPICS
            for p in sorted(await self._partitions(consumer, topic))
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        while any([await consumer.position(tp) < offset for tp, offset in end.items()]):
            await self._apply(await consumer.getmany(timeout_ms=200))

    @staticmethod
    async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
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
        assert self._consumer is not None
        while True:
            batch = await self._consumer.getmany(timeout_ms=500)
            if batch:
                await self._apply(batch)

    async def _apply(self, batch: dict[TopicPartition, list[Any]]) -> None:
        stores: dict[str, tuple[dict[str, Any], type[Any]]] = {
            CONTROL_TENANTS: (self.tenants, Tenant),
            CONTROL_KEYS: (self.keys, ApiKey),
            CONTROL_GRANTS: (self.grants, Grant),
        }
        for tp, records in batch.items():
            store, model = stores[tp.topic]
            for record in records:
                key = record.key.decode()
                if record.value is None:  # a tombstone deletes
                    store.pop(key, None)
                    continue
                try:
                    store[key] = model.model_validate(decode(record.value))
                except (ValidationError, ValueError):
                    log.error(
                        "unreadable control record skipped",
                        extra={
                            "topic": tp.topic,
                            "partition": tp.partition,
                            "offset": record.offset,
                        },
                    )
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    async def wait_changed(self, seen_version: int, timeout: float) -> int:
        """Wait until the registry moved past ``seen_version`` (or ``timeout``); return it."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.version > seen_version), timeout
                )
            return self.version

    # ------------------------------------------------------------------ queries

    def tenant(self, tenant_id: str) -> Tenant | None:
        return self.tenants.get(tenant_id)

    def authenticate(self, api_key: str | None) -> Tenant | None:
        """The active tenant a valid, unrevoked key belongs to; None for anything else."""
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
        moment = at or now()
        return [g for g in self.grants.values() if g.grantee == grantee and g.active_at(moment)]

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
