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

Like :class:`shared.control.ControlRegistry` (whose lessons it follows): a background task
tails the topics and every ``control_sync_interval_seconds`` confirms it has read up to the
broker's end; :meth:`ModelRegistry.problem` reports when it could not for
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
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from botocore.exceptions import ClientError
from pydantic import ValidationError

from schemas.models import ModelAlias, ModelCard
from schemas.topics import CONTROL_MODEL_ALIASES, CONTROL_MODELS
from shared.codec import decode, encode
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


class ModelRegistry:
    """A continuously updated view of the model registry that can also write to it."""

    def __init__(
        self,
        settings: XietongSettings,
        *,
        cards_topic: str = CONTROL_MODELS,
        aliases_topic: str = CONTROL_MODEL_ALIASES,
        bucket: str | None = None,
    ) -> None:
        self.settings = settings
        self.cards_topic = cards_topic
        self.aliases_topic = aliases_topic
        self.bucket = bucket or settings.models_bucket
        self.cards: dict[tuple[str, int], ModelCard] = {}
        self.aliases: dict[tuple[str, str], ModelAlias] = {}
        self.version = 0
        """Bumped on every change applied and every completed sync."""
        self.synced_at: float | None = None
        self._failure: str | None = None
        self._changed = asyncio.Event()
        self._positions: dict[TopicPartition, int] = {}
        self._partitions: list[TopicPartition] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._s3: Any = None
        self._bucket_ready = False
        self._stack = AsyncExitStack()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        topics = (self.cards_topic, self.aliases_topic)
        await ensure_topics(self.settings, topics, compacted=topics)
        try:
            self._producer = await self._stack.enter_async_context(
                started(create_producer(self.settings, linger_ms=0))
            )
            self._consumer = await self._stack.enter_async_context(
                started(create_consumer(self.settings, None))
            )
            self._s3 = await self._stack.enter_async_context(s3_client(self.settings))
            await self._load_all(self._consumer, topics)
        except BaseException:
            await self._stack.aclose()
            raise
        self._task = asyncio.create_task(self._tail(), name="model-registry-tail")
        self._task.add_done_callback(self._report_end)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._stack.aclose()

    async def __aenter__(self) -> ModelRegistry:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def _load_all(self, consumer: AIOKafkaConsumer, topics: tuple[str, ...]) -> None:
        partitions: list[TopicPartition] = []
        for topic in topics:
            for _ in range(50):
                found = consumer.partitions_for_topic(topic)
                if found:
                    break
                await consumer._client.force_metadata_update()  # a new topic's metadata lags
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError(f"registry topic {topic} has no partitions")
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        self._partitions = partitions
        await consumer.seek_to_beginning(*partitions)
        started = time.monotonic()
        end = await consumer.end_offsets(partitions)
        while any([await consumer.position(tp) < offset for tp, offset in end.items()]):
            self._apply(await consumer.getmany(timeout_ms=200))
        for tp in partitions:
            self._positions[tp] = await consumer.position(tp)
        self.synced_at = started
        self._notify()

    async def _tail(self) -> None:
        backoff = 0.5
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the view goes stale and says why; retried for ever
                self._failure = f"model registry cannot follow its topics: {error!r}"
                log.error(self._failure, exc_info=error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _follow(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        interval = self.settings.control_sync_interval_seconds
        ask_timeout = max(interval, self.settings.control_max_staleness_seconds / 2)
        target: dict[TopicPartition, int] | None = None
        asked_at = 0.0
        next_sync = 0.0
        while True:
            if target is None and time.monotonic() >= next_sync:
                asked_at = time.monotonic()
                async with asyncio.timeout(ask_timeout):
                    target = await consumer.end_offsets(self._partitions)
                next_sync = asked_at + interval
            batch = await consumer.getmany(timeout_ms=min(200, int(interval * 1000)))
            if batch:
                self._apply(batch)
            for tp in self._partitions:
                self._positions[tp] = await consumer.position(tp)
            if target is not None and all(
                self._positions[tp] >= offset for tp, offset in target.items()
            ):
                self.synced_at, target, self._failure = asked_at, None, None
                self._notify()

    def _report_end(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failure = f"model registry stopped: {task.exception()!r}"
            log.error(self._failure, exc_info=task.exception())

    def _apply(self, batch: dict[TopicPartition, list[Any]]) -> None:
        for tp, records in batch.items():
            is_card = tp.topic == self.cards_topic
            for record in records:
                where = {"topic": tp.topic, "partition": tp.partition, "offset": record.offset}
                if record.key is None:
                    log.error("registry record without a key skipped", extra=where)
                    continue
                key = record.key.decode(errors="replace")
                name, _, second = key.partition("/")
                if record.value is None:  # a tombstone deletes
                    if is_card and second.isdigit():
                        self.cards.pop((name, int(second)), None)
                    else:
                        self.aliases.pop((name, second), None)
                    continue
                try:
                    data = decode(record.value)
                    value: ModelCard | ModelAlias = (
                        ModelCard.model_validate(data)
                        if is_card
                        else ModelAlias.model_validate(data)
                    )
                except (ValidationError, ValueError, TypeError):
                    log.error("unreadable registry record skipped", extra=where)
                    continue
                if isinstance(value, ModelCard):
                    if card_key(value.name, value.version) != key:
                        log.error("registry card whose key is not its id skipped", extra=where)
                        continue
                    self.cards[(value.name, value.version)] = value
                else:
                    if alias_key(value.name, value.alias) != key:
                        log.error("registry alias whose key is not its id skipped", extra=where)
                        continue
                    self.aliases[(value.name, value.alias)] = value
        self._notify()

    def _notify(self) -> None:
        self.version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_changed(self, seen_version: int, timeout: float) -> int:
        """Wait until the view moved past ``seen_version`` (or ``timeout``); safe to cancel."""
        if self.version <= seen_version:
            event = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await event.wait()
        return self.version

    def problem(self) -> str | None:
        """Why the view cannot be vouched for as current right now, or None."""
        if self.synced_at is None:
            return "model registry has not loaded its topics yet"
        age = time.monotonic() - self.synced_at
        if age > self.settings.control_max_staleness_seconds:
            reason = self._failure or "the broker has not confirmed the registry topics' end"
            return f"model registry not confirmed current for {age:.0f} s ({reason})"
        return None

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

    async def current(self, timeout: float = 10.0) -> None:
        """Return once a sync that started after this call completed (the view holds every
        write acknowledged before the call)."""
        called = time.monotonic()
        async with asyncio.timeout(timeout):
            while self.synced_at is None or self.synced_at < called:
                await self.wait_changed(self.version, timeout)

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
            while self._positions.get(tp, 0) <= meta.offset:
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
