"""The model registry: trained model versions as bytes in S3, described by cards on Kafka.

Shared by every service that trains or serves models (ml, nlp). A version is an artifact (any
bytes: a joblib dump, a Keras archive) stored in the object store under
``<bucket>/models/<name>/<version>-<sha256 prefix>.<serialization>`` and a
:class:`~schemas.models.ModelCard` on the compacted topic ``control.models.v1`` (key
``<name>/<version>``); aliases (``champion``, ``challenger``) are
:class:`~schemas.models.ModelAlias` records on ``control.model-aliases.v1`` (key
``<name>/<alias>``), each keeping the versions it pointed at before, so a rollback needs
nothing else.

The whole API::

    async with ModelRegistry(settings) as registry:         # loads both topics, then tails them
        card = await registry.register(artifact_bytes, {...card fields...}, by="ml")
        await registry.set_alias(card.name, "champion", card.version, by="ml")
        registry.resolve("supplier-delay", "champion")      # -> ModelCard | None
        registry.versions(name); registry.card(name, version); registry.aliases_of(name)
        data = await registry.fetch(card)                    # sha256 verified, else ArtifactError
        await registry.rollback(name, "champion", by="cli")  # back to the previous version
        registry.problem()                                   # None when current (see below)
        await registry.current()                             # holds every write acked before
        await registry.wait_changed(seen_version, timeout)   # for tails that react to moves

Following the topics is :class:`shared.compacted.CompactedView`, as for the control plane: a
background task tails them and every ``control_sync_interval_seconds`` confirms it has read up
to the broker's end; :meth:`ModelRegistry.problem` reports when it could not for
``control_max_staleness_seconds`` (readiness says so; a scorer keeps serving the version it
has, it never loads one it cannot vouch for). Waiting for a change holds no lock (an event per
change). Keyless, unreadable and mis-keyed records are skipped and logged. Writes wait until
the view has read them back, so ``register`` then ``resolve`` in one process sees the write.

Versions are numbered 1, 2, ... per name from the view (after a sync): two trainers
registering the same name at the same moment could pick the same number; the later card wins
the compacted key, each card still names its own artifact and digest, so nothing is served
that was not described.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer, ConsumerRecord, TopicPartition
from botocore.exceptions import ClientError
from pydantic import ValidationError

from schemas.models import ModelAlias, ModelCard
from schemas.topics import CONTROL_MODEL_ALIASES, CONTROL_MODELS
from shared.codec import decode, encode
from shared.compacted import CompactedView, Where
from shared.kafka import create_consumer, create_producer, ensure_topics, started
from shared.s3 import s3_client
from shared.settings import XietongSettings

log = logging.getLogger(__name__)

HISTORY_KEPT = 50
"""Previous versions an alias remembers (rollbacks further back name a version explicitly)."""


class ArtifactError(RuntimeError):
    """An artifact is missing, unreadable or not the bytes its card's sha256 describes."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def card_key(name: str, version: int) -> str:
    return f"{name}/{version}"


def alias_key(name: str, alias: str) -> str:
    return f"{name}/{alias}"


class ModelRegistry(CompactedView):
    """A continuously updated view of the model registry that can also write to it."""

    what = "model registry"

    def __init__(
        self,
        settings: XietongSettings,
        *,
        cards_topic: str = CONTROL_MODELS,
        aliases_topic: str = CONTROL_MODEL_ALIASES,
        bucket: str | None = None,
    ) -> None:
        super().__init__(settings, (cards_topic, aliases_topic))
        self.cards_topic = cards_topic
        self.aliases_topic = aliases_topic
        self.bucket = bucket or settings.models_bucket
        self.cards: dict[tuple[str, int], ModelCard] = {}
        self.aliases: dict[tuple[str, str], ModelAlias] = {}
        self._producer: AIOKafkaProducer | None = None
        self._s3: Any = None
        self._bucket_ready = False
        self._stack = AsyncExitStack()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        topics = (self.cards_topic, self.aliases_topic)
        await ensure_topics(self.settings, topics, compacted=topics)
        try:
            self._producer = await self._stack.enter_async_context(
                started(create_producer(self.settings, linger_ms=0))
            )
            consumer = await self._stack.enter_async_context(
                started(create_consumer(self.settings, None))
            )
            self._s3 = await self._stack.enter_async_context(s3_client(self.settings))
            await self.follow(consumer)
        except BaseException:
            await self._stack.aclose()
            raise

    async def stop(self) -> None:
        await self.stop_following()
        await self._stack.aclose()

    async def __aenter__(self) -> ModelRegistry:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def take(self, record: ConsumerRecord[bytes, bytes], key: str, where: Where) -> None:
        value = record.value
        is_card = record.topic == self.cards_topic
        name, _, second = key.partition("/")
        if value is None:  # a tombstone deletes
            if is_card and second.isdigit():
                self.cards.pop((name, int(second)), None)
            else:
                self.aliases.pop((name, second), None)
            return
        try:
            data = decode(value)
            entry: ModelCard | ModelAlias = (
                ModelCard.model_validate(data) if is_card else ModelAlias.model_validate(data)
            )
        except (ValidationError, ValueError, TypeError):
            log.error("unreadable registry record skipped", extra=where)
            return
        if isinstance(entry, ModelCard):
            if card_key(entry.name, entry.version) != key:
                log.error("registry card whose key is not its id skipped", extra=where)
                return
            self.cards[(entry.name, entry.version)] = entry
        else:
            if alias_key(entry.name, entry.alias) != key:
                log.error("registry alias whose key is not its id skipped", extra=where)
                return
            self.aliases[(entry.name, entry.alias)] = entry

    # ------------------------------------------------------------------ queries

    def card(self, name: str, version: int) -> ModelCard | None:
        return self.cards.get((name, version))

    def versions(self, name: str | None = None) -> list[ModelCard]:
        """Cards of ``name`` (every name if None), by name then version."""
        return sorted(
            (c for c in self.cards.values() if name is None or c.name == name),
            key=lambda c: (c.name, c.version),
        )

    def aliases_of(self, name: str) -> dict[str, int]:
        """Alias -> version of ``name`` (cleared aliases left out)."""
        return {
            a.alias: a.version
            for (n, _), a in sorted(self.aliases.items())
            if n == name and a.version is not None
        }

    def resolve(self, name: str, alias: str) -> ModelCard | None:
        """The card ``alias`` of ``name`` points at, or None."""
        record = self.aliases.get((name, alias))
        if record is None or record.version is None:
            return None
        return self.cards.get((name, record.version))

    # ------------------------------------------------------------------ writes

    async def register(self, artifact: bytes, card: dict[str, Any], *, by: str) -> ModelCard:
        """Store ``artifact`` and publish its card as the next version of ``card["name"]``.

        ``card`` holds the :class:`ModelCard` fields but version, artifact_bucket,
        artifact_key, sha256, size_bytes, created_at and created_by, which this fills."""
        assert self._s3 is not None
        name = str(card["name"])
        await self.current()
        version = max((v for n, v in self.cards if n == name), default=0) + 1
        digest = sha256_of(artifact)
        serialization = str(card["serialization"])
        key = f"models/{name}/{version}-{digest[:12]}.{serialization}"
        await self._ensure_bucket()
        await self._s3.put_object(Bucket=self.bucket, Key=key, Body=artifact)
        full = ModelCard.model_validate(
            {
                **card,
                "version": version,
                "artifact_bucket": self.bucket,
                "artifact_key": key,
                "sha256": digest,
                "size_bytes": len(artifact),
                "created_at": datetime.now(UTC),
                "created_by": by,
            }
        )
        await self._write(self.cards_topic, card_key(name, version), encode(full))
        log.info("model registered", extra={"model": name, "version": version, "sha256": digest})
        return full

    async def set_alias(
        self, name: str, alias: str, version: int | None, *, by: str, reason: str = ""
    ) -> ModelAlias:
        """Point ``alias`` at ``version`` (None clears it); the old target goes to history."""
        await self.current()
        if version is not None and (name, version) not in self.cards:
            raise KeyError(f"{name} has no version {version}")
        old = self.aliases.get((name, alias))
        history = list(old.history) if old else []
        if old is not None and old.version is not None and old.version != version:
            history = [*history, old.version][-HISTORY_KEPT:]
        record = ModelAlias(
            name=name,
            alias=alias,
            version=version,
            history=history,
            set_at=datetime.now(UTC),
            set_by=by,
            reason=reason,
        )
        await self._write(self.aliases_topic, alias_key(name, alias), encode(record))
        return record

    async def rollback(self, name: str, alias: str = "champion", *, by: str) -> ModelAlias:
        """Move ``alias`` back to the version it pointed at before the current one."""
        await self.current()
        old = self.aliases.get((name, alias))
        if old is None or not old.history:
            raise KeyError(f"{name}/{alias} has no earlier version to roll back to")
        record = ModelAlias(
            name=name,
            alias=alias,
            version=old.history[-1],
            history=old.history[:-1],
            set_at=datetime.now(UTC),
            set_by=by,
            reason=f"rollback from {old.version}",
        )
        await self._write(self.aliases_topic, alias_key(name, alias), encode(record))
        return record

    async def _write(self, topic: str, key: str, value: bytes) -> None:
        """Publish (acks=all) and wait until the view has read the record back."""
        assert self._producer is not None
        meta = await self._producer.send_and_wait(topic, value, key=key.encode())
        tp = TopicPartition(topic, meta.partition)
        async with asyncio.timeout(30):
            while self.positions.get(tp, 0) <= meta.offset:
                await self.wait_changed(self.version, 1.0)

    async def _ensure_bucket(self) -> None:
        if self._bucket_ready:
            return
        try:
            await self._s3.head_bucket(Bucket=self.bucket)
        except ClientError:
            with contextlib.suppress(ClientError):  # created meanwhile by another writer
                await self._s3.create_bucket(Bucket=self.bucket)
        self._bucket_ready = True

    # ------------------------------------------------------------------ artifacts

    async def fetch(self, card: ModelCard) -> bytes:
        """The artifact's bytes, proven to be the ones the card describes."""
        assert self._s3 is not None
        try:
            got = await self._s3.get_object(Bucket=card.artifact_bucket, Key=card.artifact_key)
            async with got["Body"] as body:
                data: bytes = await body.read()
        except ClientError as error:
            raise ArtifactError(
                f"artifact of {card.name} v{card.version} unreadable "
                f"(s3://{card.artifact_bucket}/{card.artifact_key}): {error}"
            ) from error
        if sha256_of(data) != card.sha256:
            raise ArtifactError(
                f"artifact of {card.name} v{card.version} is corrupt: sha256 "
                f"{sha256_of(data)[:12]}... is not the card's {card.sha256[:12]}..."
            )
        return data
