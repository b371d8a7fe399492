"""The archive loop: every clean event and every insight to object storage as Parquet.

Consumes the archived topics (``storage_topics``: ``events.clean.v1`` and every insight topic) in
the consumer group ``storage``; writes objects and manifests (:mod:`services.storage.objects`)
to the store the placement policy picks for each (:mod:`services.storage.placement`); produces
dead letters to ``<topic>.dlq`` for records it cannot archive (unreadable, or labels no store
may receive), with their original bytes and the reason.

Delivery: **exactly once into the archive**, with size- and time-based flushing
(:mod:`services.storage.segments` says how): objects are named by offsets, a partition's commit
carries the metadata that lets a restart skip what is written and rewrite under the same name
what was written but not committed. Offsets are committed only after the objects (and the dead
letters) of everything below them are durable. Dead letters are at-least-once.

When the broker goes away the loop waits for it and carries on by itself: dead letters are sent
again until acknowledged (:func:`shared.kafka.deliver`), a commit and the read of the commit
points on assignment are tried again (a commit refused after a rebalance is safe: what was
written is skipped or rewritten under the same names), and readiness says so within
``kafka_unready_after_seconds`` (:class:`shared.kafka.KafkaHealth`). Failures are logged in one
line, repeats collapsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Histogram

from schemas.topics import dlq
from services.storage.handlers import SERVICE, Labeller, plan_segment
from services.storage.objects import manifest_key
from services.storage.placement import Policy
from services.storage.segments import PartitionSegments, Segment, describe
from services.storage.settings import StorageSettings
from services.storage.stores import Store
from shared.codec import encode
from shared.deadletter import dead_letter_record, record_dead_letter
from shared.kafka import (
    BatchPublisher,
    KafkaHealth,
    OutRecord,
    commit_offsets,
    committed_points,
    connection_config,
    create_consumer,
    deliver,
    kafka_problem,
    stop_consumer,
)

log = logging.getLogger(__name__)

RECORDS = Counter("xietong_storage_archived_records_total", "Records written to the archive.")
OBJECTS = Counter("xietong_storage_objects_total", "Archive objects written.", ["store"])
BYTES = Counter("xietong_storage_object_bytes_total", "Bytes of archive objects written.")
DEAD = Counter("xietong_storage_dead_letters_total", "Records the archive could not store.")
FLUSH_SECONDS = Histogram(
    "xietong_storage_flush_seconds",
    "Write one flushed segment's objects and manifests.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)


@dataclass
class ArchiveStatus:
    started: bool = False
    records: int = 0
    objects: int = 0
    dead_letters: int = 0
    skipped: int = 0
    assigned: set[TopicPartition] = field(default_factory=set)
    failure: str | None = None
    health: KafkaHealth | None = None

    def problem(self) -> str | None:
        if self.failure is not None:
            return self.failure
        if not self.started:
            return "archive starting"
        return self.health.problem() if self.health is not None else None


def labeller_of(settings: StorageSettings) -> Labeller:
    return Labeller(
        sensitivity=settings.storage_kind_sensitivity,
        residency=settings.storage_tenant_residency,
        default_residency=settings.storage_default_residency,
    )


class Archiver(ConsumerRebalanceListener):  # type: ignore[misc]
    """The archive of one process: partition states, flushing, committing."""

    def __init__(
        self,
        settings: StorageSettings,
        stores: dict[str, Store],
        policy: Policy,
        consumer: AIOKafkaConsumer,
        admin: AIOKafkaAdminClient,
        publisher: BatchPublisher,
        status: ArchiveStatus,
        group: str,
    ) -> None:
        self.settings, self.stores, self.policy = settings, stores, policy
        self.labeller = labeller_of(settings)
        self.consumer, self.admin, self.publisher = consumer, admin, publisher
        self.status, self.group = status, group
        self.states: dict[TopicPartition, PartitionSegments] = {}
        self.stop: asyncio.Event | None = None
        """Set once the loop is to stop: Kafka work in hand is given up then, not retried."""
        self.failure: BaseException | None = None
        """Why the commit points of assigned partitions could not be read (stops the loop)."""
        self._lock = asyncio.Lock()
        self._writes = asyncio.Semaphore(16)

    # ------------------------------------------------------------------ rebalance

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:  # the batch in hand is written first
            mine = [tp for tp in revoked if tp in self.states]
            await self._flush(mine, everything=True)
            await self._commit(mine)
            for tp in mine:
                self.states.pop(tp, None)
                self.status.assigned.discard(tp)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if not assigned:
            return
        try:
            committed = await committed_points(
                self.admin,
                self.group,
                assigned,
                what="reading the archive's commit points",
                health=self.status.health,
            )
        except asyncio.CancelledError:  # the consumer is stopping
            raise
        except BaseException as error:  # aiokafka only logs listener errors: stop the loop
            self.failure = error
            raise
        s = self.settings
        for tp, point in committed.items():
            self.states[tp] = PartitionSegments.restore(
                tp.topic,
                tp.partition,
                point[1] if point else None,
                max_bytes=s.storage_segment_max_bytes,
                max_seconds=s.storage_segment_max_seconds,
                late_max_seconds=s.storage_late_max_seconds,
            )
            self.status.assigned.add(tp)

    # ------------------------------------------------------------------ the loop

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self.stop = stop
        self.status.started = True
        health = self.status.health
        timeout_ms = int(min(s.storage_flush_check_seconds, s.kafka_fetch_timeout_ms / 1000) * 1000)
        try:
            while not stop.is_set():
                batch = await self.consumer.getmany(
                    timeout_ms=max(timeout_ms, 1), max_records=s.kafka_fetch_max_records
                )
                if self.failure is not None:
                    raise RuntimeError("the archive's commit points could not be read") from (
                        self.failure
                    )
                async with self._lock:
                    await self.handle(batch)
                if health is not None:
                    health.progress()
            async with self._lock:
                await self._flush(list(self.states), everything=True)
                await self._commit(list(self.states))
        except (KafkaError, TimeoutError, OSError) as error:
            if not stop.is_set():
                raise
            # stopped while the broker is away: what is not committed is read again on restart
            # and rewritten under the same names
            log.warning(
                "the archive stops without its last commit: %s",
                kafka_problem(error, s.kafka_bootstrap_servers),
            )

    async def handle(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Add a batch to its segments; write what is full or due; commit what is durable."""
        now = time.monotonic()
        full: list[Segment] = []
        dead: dict[str, Sequence[OutRecord]] = {}
        for tp, records in batch.items():
            state = self.states.get(tp)
            if state is None:
                continue  # revoked meanwhile
            for record in records:
                try:
                    described = describe(
                        record.offset,
                        record.timestamp,
                        record.key,
                        record.value or b"",
                        record.headers or (),
                    )
                except ValueError as error:
                    state.skip_to(record.offset)
                    letter = record_dead_letter(record, f"not archivable: {error}", service=SERVICE)
                    dead.setdefault(dlq(tp.topic), []).append(dead_letter_record(letter))  # type: ignore[attr-defined]
                    continue
                segment = state.add(described, now)
                if segment is not None:
                    full.append(segment)
        due = [segment for state in self.states.values() for segment in state.due(now)]
        if dead:
            await self._dead_letters(dead)
            self.status.dead_letters += sum(len(v) for v in dead.values())
            DEAD.inc(sum(len(v) for v in dead.values()))
        if full or due:
            await self._write(full + due)
        if batch or full or due:
            await self._commit(list(batch) + [TopicPartition(s.topic, s.partition) for s in due])

    async def _flush(self, tps: Iterable[TopicPartition], *, everything: bool) -> None:
        now = time.monotonic()
        segments = [
            segment
            for tp in tps
            if (state := self.states.get(tp)) is not None
            for segment in state.due(now, everything=everything)
        ]
        if segments:
            await self._write(segments)

    async def _write(self, segments: list[Segment]) -> None:
        started = time.perf_counter()
        written_at = datetime.now(UTC)
        plans = await asyncio.gather(
            *(
                asyncio.to_thread(plan_segment, s, self.policy, self.labeller, written_at)
                for s in segments
            )
        )

        async def put(store: Store, key: str, data: bytes, manifest: bytes) -> None:
            async with self._writes:
                await store.put(key, data, "application/vnd.apache.parquet")
                # The manifest after its object: an object without one is not yet archived.
                await store.put(manifest_key(key), manifest, "application/json")

        dead: dict[str, Sequence[OutRecord]] = {}
        jobs = []
        for segment, plan in zip(segments, plans, strict=True):
            for store_name, data, manifest in plan.objects:
                jobs.append(put(self.stores[store_name], manifest.key, data, encode(manifest)))
                OBJECTS.labels(store_name).inc()
                BYTES.inc(len(data))
                self.status.objects += 1
            for records, reason in plan.refused:
                for r in records:
                    letter = record_dead_letter(
                        _Consumed(
                            segment.topic,
                            segment.partition,
                            r.offset,
                            r.key,
                            r.value,
                            r.timestamp_ms,
                        ),
                        f"not stored: {reason}",
                        service=SERVICE,
                        tenant=r.tenant,
                    )
                    dead.setdefault(dlq(segment.topic), []).append(dead_letter_record(letter))  # type: ignore[attr-defined]
        await asyncio.gather(*jobs)
        if dead:
            await self._dead_letters(dead)
            count = sum(len(v) for v in dead.values())
            self.status.dead_letters += count
            DEAD.inc(count)
        for segment in segments:
            state = self.states.get(TopicPartition(segment.topic, segment.partition))
            if state is not None:
                state.written(segment)
            stored = len(segment.records)
            RECORDS.inc(stored)
            self.status.records += stored
        FLUSH_SECONDS.observe(time.perf_counter() - started)

    async def _commit(self, tps: Iterable[TopicPartition]) -> None:
        points = {}
        for tp in set(tps):
            state = self.states.get(tp)
            if state is None:
                continue
            point = state.commit_point()
            if point is not None:
                points[tp] = point
        # A commit refused after a rebalance is safe: the partition's next owner restores from
        # the last commit (what was written is skipped or rewritten under the same names).
        await commit_offsets(
            self.consumer, points, what="archive commit", health=self.status.health, stop=self.stop
        )

    async def _dead_letters(self, dead: dict[str, Sequence[OutRecord]]) -> None:
        await deliver(
            self.publisher,
            dead,
            what="archive dead letters",
            health=self.status.health,
            stop=self.stop,
        )


@dataclass(frozen=True)
class _Consumed:
    """A record as :func:`shared.deadletter.record_dead_letter` reads it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


async def run_archive(
    settings: StorageSettings,
    stores: dict[str, Store],
    policy: Policy,
    stop: asyncio.Event,
    *,
    topics: list[str] | None = None,
    group_id: str | None = None,
    status: ArchiveStatus | None = None,
    publisher: BatchPublisher,
) -> ArchiveStatus:
    """Archive ``topics`` until ``stop`` is set; everything open is flushed and committed then.

    ``status.health`` (optional) hears how the loop fares with the broker."""
    status = status if status is not None else ArchiveStatus()
    group = group_id or settings.storage_group_id
    consumer = create_consumer(settings, group)
    admin = AIOKafkaAdminClient(**connection_config(settings))
    await admin.start()
    try:
        archiver = Archiver(settings, stores, policy, consumer, admin, publisher, status, group)
        consumer.subscribe(list(topics or settings.storage_topics), listener=archiver)
        await consumer.start()
        try:
            await archiver.run(stop)
        finally:
            await stop_consumer(consumer)
    finally:
        await admin.close()
    return status
