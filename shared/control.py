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

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from schemas.control import ApiKey, Grant, Tenant
from schemas.insights import NETWORK_TENANT
from schemas.topics import CONTROL_GRANTS, CONTROL_KEYS, CONTROL_TENANTS
from shared.codec import decode, encode
from shared.compacted import CompactedView, Where
from shared.kafka import (
    BatchPublisher,
    OutRecord,
    create_consumer,
    create_producer,
    ensure_topics,
    stop_consumer,
)
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


MODEL_TRAINING = "model_training"
"""The grant type by which a firm lets the network train models on its events."""


def training_firms(firms: Iterable[str], grants: Iterable[Grant], at: datetime) -> set[str]:
    """The firms whose agreements let the network train models on their events: each must have
    granted ``network`` the type ``model_training`` (:func:`reading_grants` decides)."""
    grants = list(grants)
    return {
        firm
        for firm in firms
        if firm != NETWORK_TENANT
        and may_read(
            NETWORK_TENANT,
            owner=firm,
            visibility="private",
            insight_type=MODEL_TRAINING,
            grants=grants,
            at=at,
        )
    }


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


class ControlRegistry(CompactedView):
    """An in-memory, continuously updated view of the control topics that fails closed.

    How it follows the topics, confirms it is current and wakes waiters without a lock is
    :class:`shared.compacted.CompactedView`. So a change acknowledged by Kafka at time ``t`` is
    applied within one ``control_sync_interval_seconds`` plus one fetch, and when no sync has
    completed for ``control_max_staleness_seconds`` (the broker is away, the tail is failing),
    :meth:`problem` says why and :meth:`authenticate` vouches for no key: a registry that cannot
    prove it is current must not keep honouring keys that may have been revoked meanwhile.
    """

    what = "control registry"

    def __init__(self, settings: XietongSettings) -> None:
        super().__init__(settings, CONTROL_TOPICS)
        self.tenants: dict[str, Tenant] = {}
        self.keys: dict[str, ApiKey] = {}
        self.grants: dict[str, Grant] = {}
        self._stores: dict[str, tuple[dict[str, Any], type[Tenant | ApiKey | Grant]]] = {
            CONTROL_TENANTS: (self.tenants, Tenant),
            CONTROL_KEYS: (self.keys, ApiKey),
            CONTROL_GRANTS: (self.grants, Grant),
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load everything written so far, then keep tailing in the background."""
        await ensure_topics(self.settings, CONTROL_TOPICS, compacted=CONTROL_TOPICS)
        consumer = create_consumer(self.settings, None)
        await consumer.start()
        try:
            await self.follow(consumer)
        except BaseException:
            await stop_consumer(consumer)
            raise

    async def stop(self) -> None:
        await self.stop_following()
        if self._consumer is not None:
            await stop_consumer(self._consumer)

    async def __aenter__(self) -> ControlRegistry:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def take(self, record: ConsumerRecord[bytes, bytes], key: str, where: Where) -> None:
        value = record.value
        store, model = self._stores[record.topic]
        if value is None:  # a tombstone deletes
            store.pop(key, None)
            return
        try:
            entry = model.model_validate(decode(value))
        except (ValidationError, ValueError, TypeError):
            log.error("unreadable control record skipped", extra=where)
            return
        if _id_of(entry) != key:
            # A record filed under another id would shadow (or revive) that id's entry.
            log.error("control record whose key is not its id skipped", extra=where)
            return
        store[key] = entry

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
