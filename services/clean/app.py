"""The clean hop: raw partner events in, canonical clean events out.

Consumes ``events.raw.v1`` (event envelopes as ingest published them, key = tenant) in the
consumer group ``clean``. Produces ``events.clean.v1`` (:class:`schemas.events.CleanEvent`,
key = tenant) and dead letters to ``events.raw.v1.dlq`` (:mod:`shared.deadletter`: the original
bytes, the reason, the source topic, partition and offset).

The work is an aiokafka batch loop, not Faust: one ``getmany`` batch -> one pure
:func:`services.clean.handlers.clean_batch` over the whole batch -> every output appended to
per-partition producer batches and all acknowledgements awaited together -> commit.

Delivery semantics: **at-least-once consumption, effectively-once output.** Offsets are
committed only after every clean record, re-routed record and dead letter of the batch is
acknowledged (``acks=all``, idempotent producer) and the batch's ids are on disk, so a crash
re-reads the uncommitted batch. Re-reading produces no duplicate clean events because the
de-duplication state either saw them or is rebuilt from the output:

- *One partition per tenant.* Our contract puts a tenant's records on the partition murmur2 of
  its id picks (Java's default partitioner; :func:`shared.kafka.partition_of`). A partner
  writing to the raw topic itself may use another partitioner (librdkafka's default is
  crc32-based) or key: a valid record that is not on its tenant's partition, or not keyed by
  its tenant, is produced again to that partition of the raw topic (its original value and
  headers, the tenant as key, plus a ``xietong-rerouted-from: topic/partition/offset`` header)
  and acknowledged before its own offset is committed; it is not cleaned where it arrived. So
  one owner sees every copy of an ``event_id`` of a tenant. A crash between the re-produce and
  the commit re-produces it again: a duplicate that owner drops.
- *The clean topic is the changelog.* A clean record goes to the same partition number of the
  clean topic as its raw record came from (raw and clean must have the same partition count;
  the hop creates the clean topic that way and refuses to start otherwise). Partition ``p`` of
  the clean topic therefore holds exactly what was emitted for raw partition ``p``; each clean
  record's timestamp is the moment it was cleaned.
- *A store on disk per partition* (:mod:`services.clean.store`, under
  ``state_dir/clean/<clean topic>/<p>``) holds the ids cleaned within
  ``clean_dedupe_horizon_days`` — measured from when each was cleaned by this hop's clock, never
  from an event's ``occurred_at``, so no tenant's clock shortens what another's ids are
  remembered for — and, as of a checkpoint (a clean-topic offset), the carry-forward values and
  outlier windows. Its memory is bounded (``clean_dedupe_memory_mb``) whatever the number of
  ids; a batch's ids are written after its records are acknowledged, in one write with the
  checkpoint, which moves only while every record since it is this hop's own.
- *Restore on assignment.* When the group assigns raw partition ``p`` (a rebalance listener),
  the hop pauses it and reads clean partition ``p`` from the store's checkpoint to the end
  offset, replaying every record into the store; a store without a checkpoint within the
  horizon (a new disk, a long absence) is deleted and rebuilt from the clean records produced
  within the horizon. Only then are raw records of ``p`` cleaned. Anything acknowledged before
  a crash is thus known to the next owner, on any machine, and its raw record, read again, is a
  duplicate. A store restored from the clean topic holds the windows and carry values its
  records imply; a store caught up from a checkpoint also keeps those of older records, as the
  live hop does.
- *Revocation* waits for the in-flight batch's acknowledgements before the partition moves on,
  so the next owner's restore sees them. A commit refused because of the rebalance is only
  logged: the batch is read again and dropped as duplicates.

Dead letters are at-least-once: a record refused just before a crash may be dead-lettered twice.
A worker that lost its partition and has not noticed yet (a long pause) can still publish a batch
its successor publishes too; without Kafka transactions nothing fences it, so analytics counts an
event id it already holds once (:mod:`services.analytics.windows`).
When the broker goes away the hop waits for it, then carries on by itself: a batch whose
publish fails (a Kafka error: the broker lost the producer's sequence state, a metadata request
timed out) is *rewound* — every output in flight settled, a broken producer replaced, the
batch's partitions restored from the clean topic as on assignment (so what was acknowledged of
it is known), the consumer put back at the batch's first offsets — and cleaned again, its
acknowledged part now dropped as duplicates. A restore or a commit that fails with a Kafka error
is tried again. Readiness (:class:`shared.kafka.KafkaHealth`) says so while the loop makes no
progress with the broker. Any other error (a failed write to the store, a bug) is logged with
the batch's coordinates and stops the worker without committing, rather than skip data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import Counter, Histogram

from schemas.topics import EVENTS_CLEAN, EVENTS_RAW, dlq
from services.clean.handlers import SERVICE, CleanRules, CleanState, clean_batch
from services.clean.settings import CleanSettings, load_clean_settings
from services.clean.store import digest
from shared.codec import decode
from shared.kafka import (
    BatchPublisher,
    KafkaHealth,
    batch_coordinates,
    create_consumer,
    create_producer,
    ensure_topics,
    is_broken_producer_error,
    retrying,
    send_to_partition,
    stop_consumer,
    stop_quietly,
)
from shared.rates import RatesReader
from shared.settings import XietongSettings

log = logging.getLogger(__name__)

RECORDS_IN = Counter("xietong_clean_records_in_total", "Raw records consumed by the clean hop.")
RECORDS_OUT = Counter("xietong_clean_records_out_total", "Clean events produced.")
DEAD_LETTERS = Counter(
    "xietong_clean_dead_letters_total", "Records sent to the dead-letter topic.", ["reason"]
)
DUPLICATES = Counter(
    "xietong_clean_duplicates_total", "Records dropped: their event_id was already cleaned."
)
RESTORED = Counter(
    "xietong_clean_restored_records_total", "Clean records read back to rebuild the state."
)
REROUTED = Counter(
    "xietong_clean_rerouted_total",
    "Raw records produced again to their tenant's partition: they arrived on another one.",
)
BATCH_SECONDS = Histogram(
    "xietong_clean_batch_seconds",
    "Clean, publish and commit one getmany batch.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


@dataclass
class HopStatus:
    """What the hop tells the outside (readiness, tests, the benchmark)."""

    started: bool = False
    restoring: set[int] = field(default_factory=set)
    assigned: set[int] = field(default_factory=set)
    records_in: int = 0
    records_out: int = 0
    dead_letters: int = 0
    duplicates: int = 0
    restored: int = 0
    rerouted: int = 0
    batches: int = 0
    rewound: int = 0
    health: KafkaHealth | None = None

    def problem(self) -> str | None:
        """None when ready, else why not (for ``/readyz``)."""
        if not self.started:
            return "starting"
        if self.health is not None and (trouble := self.health.problem()) is not None:
            return trouble
        if self.restoring:
            return f"restoring partitions {sorted(self.restoring)}"
        return None


class CleanHop(ConsumerRebalanceListener):  # type: ignore[misc]
    """One running clean hop: the consumer loop and its rebalance listener."""

    def __init__(
        self,
        settings: CleanSettings,
        *,
        source: str,
        target: str,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        restorer: AIOKafkaConsumer,
        status: HopStatus,
        partitions: int,
        renew_with: Any = None,
    ) -> None:
        self.settings = settings
        self.source, self.target, self.dead_topic = source, target, dlq(source)
        self.consumer, self.restorer = consumer, restorer
        self.publisher = BatchPublisher(producer, renew_with=renew_with)
        self.state = CleanState(
            CleanRules.from_settings(settings),
            Path(settings.state_dir) / SERVICE / target,
            partitions=partitions,
        )
        self.horizon_ms = int(settings.clean_dedupe_horizon_days * 86400 * 1000)
        self.status = status
        self.ready: set[int] = set()  # source partitions whose state is restored
        self.failure: BaseException | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ rebalance listener

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._idle.wait()  # the in-flight batch is acknowledged before others take over
        for tp in revoked:
            if tp.topic == self.source:
                self.ready.discard(tp.partition)
                self.state.drop(tp.partition)
                self.status.assigned.discard(tp.partition)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        mine = sorted(tp for tp in assigned if tp.topic == self.source)
        if not mine:
            return
        self.consumer.pause(*mine)
        numbers = [tp.partition for tp in mine]
        self.status.restoring.update(numbers)
        try:
            await retrying(
                lambda: self.restore(numbers),
                what="restoring the clean state",
                health=self.status.health,
            )
        except asyncio.CancelledError:  # the consumer is stopping
            raise
        except BaseException as error:  # aiokafka only logs listener errors: stop the loop
            self.failure = error
            log.exception("restoring the clean state failed", extra={"partitions": numbers})
            raise
        finally:
            self.status.restoring.difference_update(numbers)
        self.ready.update(numbers)
        self.status.assigned.update(numbers)
        current = self.consumer.assignment()
        self.consumer.resume(*(tp for tp in mine if tp in current))

    async def restore(self, partitions: Sequence[int]) -> int:
        """Bring the state of ``partitions`` up to the end of the clean topic; return records read.

        A partition's store that has a checkpoint within the horizon, whose record just below
        it is still the one the store saw there, is caught up from it; any other (none, lost,
        older than the horizon, or of a clean topic since deleted and created again) is deleted
        and rebuilt from the clean records produced within the horizon.
        """
        state = self.state
        for number in partitions:
            state.drop(number)  # memory as of the store's checkpoint, not of an earlier run
        now_ms = int(time.time() * 1000)
        tps = [TopicPartition(self.target, number) for number in partitions]
        restorer = self.restorer
        ends = await restorer.end_offsets(tps)
        begins = await restorer.beginning_offsets(tps)
        since = await restorer.offsets_for_times(
            {tp: max(0, now_ms - self.horizon_ms) for tp in tps}
        )
        starts: dict[TopicPartition, int] = {}
        for tp in tps:
            found = since.get(tp)
            floor = max(begins[tp], found.offset if found is not None else ends[tp])
            store = state.partition(tp.partition).store
            checkpoint = store.checkpoint
            if (
                checkpoint is None
                or not floor <= checkpoint <= ends[tp]
                or (checkpoint > 0 and not await self._recognises(tp, checkpoint - 1, store.tail))
            ):
                state.wipe(tp.partition)
                checkpoint = floor
            if checkpoint < ends[tp]:
                starts[tp] = checkpoint
        remaining = set(starts)
        restorer.assign(list(remaining))
        for tp, start in starts.items():
            restorer.seek(tp, start)
        count = 0
        remember = state.remember
        while remaining:
            batch = await restorer.getmany(*remaining, timeout_ms=500, max_records=10_000)
            for tp, records in batch.items():
                end = ends[tp]
                read = [record for record in records if record.offset < end]
                for record in read:
                    if record.value is not None:
                        remember(tp.partition, decode(record.value), record.timestamp)
                if read:  # the ids read so far to disk: memory stays bounded however many
                    last = read[-1]
                    tail = digest(last.value) if last.value is not None else None
                    state.flush(tp.partition, last.offset + 1, now_ms, tail)
                    count += len(read)
            for tp in list(remaining):
                if await restorer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        restorer.assign([])
        for tp in tps:
            if state.partition(tp.partition).store.checkpoint != ends[tp]:  # nothing to read
                state.flush(tp.partition, ends[tp], now_ms)
            state.partition(tp.partition).next_offset = ends[tp]
        RESTORED.inc(count)
        self.status.restored += count
        log.info(
            "clean state restored",
            extra={"partitions": list(partitions), "records": count, "topic": self.target},
        )
        return count

    async def _recognises(self, tp: TopicPartition, offset: int, tail: bytes | None) -> bool:
        """Is the clean record at ``offset`` still the one whose digest is ``tail``?"""
        if tail is None:
            return False
        restorer = self.restorer
        restorer.assign([tp])
        restorer.seek(tp, offset)
        try:
            async with asyncio.timeout(30):
                while True:
                    for record in (await restorer.getmany(tp, timeout_ms=500)).get(tp, ()):
                        value = record.value
                        return (
                            record.offset == offset and value is not None and digest(value) == tail
                        )
        except TimeoutError:
            return False  # not recognised: the store is rebuilt, which is always safe
        finally:
            restorer.assign([])

    # ------------------------------------------------------------------ the loop

    @property
    def producer(self) -> AIOKafkaProducer:
        """The producer of the moment (a broken one is replaced: :meth:`rewind`)."""
        return self.publisher.producer

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        self.status.started = True
        health = self.status.health
        while not stop.is_set():
            batch = await self.consumer.getmany(
                timeout_ms=settings.kafka_fetch_timeout_ms,
                max_records=settings.kafka_fetch_max_records,
            )
            if self.failure is not None:
                raise RuntimeError("the clean state could not be restored") from self.failure
            if batch:
                await self.handle(batch, stop)
            elif health is not None:
                health.progress()

    async def rewind(
        self,
        ready: dict[TopicPartition, list[Any]],
        error: BaseException,
        in_flight: Sequence[asyncio.Future[Any]],
        stop: asyncio.Event | None,
    ) -> None:
        """After a failed publish: put everything back as it was before the batch, so that
        reading it again cleans exactly what was not acknowledged (see the module docstring)."""
        if self.status.health is not None:
            self.status.health.failing(error)
        log.warning(
            "clean batch not acknowledged; rewinding it to clean again",
            extra={"error": repr(error), **batch_coordinates(ready)},
        )
        if in_flight:  # let what is in flight land (or fail) before the restore reads it back
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.kafka_unready_after_seconds):
                    await asyncio.gather(*in_flight, return_exceptions=True)
        if is_broken_producer_error(error) or self.publisher.broken() is not None:
            await retrying(
                self.publisher.renew,
                what="replacing the clean producer",
                health=self.status.health,
                stop=stop,
            )
        mine = [tp for tp in ready if tp in self.consumer.assignment()]
        numbers = [tp.partition for tp in mine]
        await retrying(
            lambda: self.restore(numbers),
            what="restoring the clean state",
            health=self.status.health,
            stop=stop,
        )
        for tp in mine:
            self.consumer.seek(tp, ready[tp][0].offset)
        self.status.rewound += 1

    async def handle(
        self, batch: dict[TopicPartition, list[Any]], stop: asyncio.Event | None = None
    ) -> None:
        """Clean one batch, publish everything, await all acks, then commit (or, when Kafka
        fails it, :meth:`rewind` it to be cleaned again)."""
        started = time.perf_counter()
        ready: dict[TopicPartition, list[Any]] = {}
        for tp, records in batch.items():
            if tp.partition in self.ready:
                ready[tp] = records
            elif tp in self.consumer.assignment():  # fetched before its restore: read it later
                self.consumer.seek(tp, records[0].offset)
        if not ready:
            return
        try:
            # rates as of the records' timestamps (waited for through an outage)
            await self.state.rates_caught_up(ready, health=self.status.health, stop=stop)
            now_ms = int(time.time() * 1000)
            result = clean_batch(chain.from_iterable(ready.values()), self.state, now_ms)
            self._idle.clear()
            try:
                sent: dict[int, list[tuple[asyncio.Future[Any], int]]] = {}
                futures: list[asyncio.Future[Any]] = []
                try:
                    for partition, records in result.clean.items():
                        sent[partition] = await send_to_partition(
                            self.producer, self.target, partition, records, now_ms
                        )
                        futures += [future for future, _ in sent[partition]]
                    for partition, records in result.rerouted.items():
                        rerouted = await send_to_partition(
                            self.producer, self.source, partition, records
                        )
                        futures += [future for future, _ in rerouted]
                    if result.dead:
                        futures += await self.publisher.enqueue(self.dead_topic, result.dead)
                    await asyncio.gather(*futures)
                except (KafkaError, TimeoutError) as error:
                    await self.rewind(ready, error, futures, stop)
                    return
                # the ids just acknowledged to disk, and the checkpoint if nobody else wrote
                for tp in ready:
                    acked = [
                        (future.result().offset, n) for future, n in sent.get(tp.partition, ())
                    ]
                    checkpoint = self.state.partition(tp.partition).advance(acked)
                    tail = None
                    if checkpoint is not None:
                        tail = digest(result.clean[tp.partition][-1].value)
                    self.state.flush(tp.partition, checkpoint, now_ms, tail)
            finally:
                self._idle.set()
        except Exception:
            coordinates = {
                f"{tp.topic}[{tp.partition}]": [records[0].offset, records[-1].offset]
                for tp, records in ready.items()
            }
            log.exception(
                "clean batch failed; stopping without commit", extra={"batch": coordinates}
            )
            raise
        offsets = {tp: records[-1].offset + 1 for tp, records in ready.items()}
        try:
            await retrying(
                lambda: self.consumer.commit(offsets),
                what="committing the clean batch",
                health=self.status.health,
                stop=stop,
            )
        except (CommitFailedError, IllegalStateError) as error:
            log.warning(
                "commit refused after a rebalance; the batch will be read again as duplicates",
                extra={"error": str(error)},
            )
        count_in = sum(len(records) for records in ready.values())
        count_out = result.clean_count
        RECORDS_IN.inc(count_in)
        RECORDS_OUT.inc(count_out)
        DUPLICATES.inc(result.duplicates)
        REROUTED.inc(result.rerouted_count)
        for reason, count in result.dead_reasons.items():
            DEAD_LETTERS.labels(reason).inc(count)
        status = self.status
        status.records_in += count_in
        status.records_out += count_out
        status.duplicates += result.duplicates
        status.rerouted += result.rerouted_count
        status.dead_letters += len(result.dead)
        status.batches += 1
        BATCH_SECONDS.observe(time.perf_counter() - started)


async def prepare_topics(settings: XietongSettings, source: str, target: str) -> int:
    """Create missing topics (clean and dead letters with the raw partition count) and check
    that raw and clean partitions match; return that count."""
    await ensure_topics(settings, [source])
    probe = create_producer(settings)
    await probe.start()
    try:
        partitions = len(await probe.partitions_for(source))
        await ensure_topics(settings, [target, dlq(source)], partitions=partitions)
        clean_partitions = len(await probe.partitions_for(target))
    finally:
        await probe.stop()
    if clean_partitions != partitions:
        raise RuntimeError(
            f"{target} has {clean_partitions} partitions and {source} {partitions}: the clean "
            "topic mirrors the raw one partition by partition, so the counts must be equal"
        )
    return partitions


async def run_clean(
    settings: XietongSettings,
    stop: asyncio.Event,
    *,
    source: str = EVENTS_RAW,
    target: str = EVENTS_CLEAN,
    group_id: str | None = None,
    status: HopStatus | None = None,
) -> HopStatus:
    """Run the clean hop from ``source`` to ``target`` until ``stop`` is set.

    Returns when the current batch is published and committed after ``stop``; raises (without
    committing) on an unexpected error. ``status`` (optional) is updated as the hop runs.
    """
    if not isinstance(settings, CleanSettings):
        settings = load_clean_settings(**settings.model_dump())
    status = status if status is not None else HopStatus()
    health = status.health = status.health or KafkaHealth.of(settings)
    async with health.watching(settings):
        return await _run_hop(settings, stop, source, target, group_id, status)


async def _run_hop(
    settings: CleanSettings,
    stop: asyncio.Event,
    source: str,
    target: str,
    group_id: str | None,
    status: HopStatus,
) -> HopStatus:
    partitions = await retrying(  # a broker not there yet is waited for
        lambda: prepare_topics(settings, source, target),
        what="creating the clean topics",
        health=status.health,
        stop=stop,
    )
    producer = create_producer(settings)
    consumer = create_consumer(settings, group_id or settings.clean_group_id)
    restorer = create_consumer(settings, None, enable_auto_commit=False)
    hop: CleanHop | None = None
    await producer.start()
    try:
        await restorer.start()
        try:
            hop = CleanHop(
                settings,
                source=source,
                target=target,
                consumer=consumer,
                producer=producer,
                restorer=restorer,
                status=status,
                partitions=partitions,
                renew_with=lambda: create_producer(settings),
            )
            consumer.subscribe([source], listener=hop)
            await consumer.start()
            try:
                async with RatesReader(settings, settings.clean_rates_topic) as rates:
                    hop.state.follow_rates(rates)  # prices converted with the dated rates
                    await hop.run(stop)
            finally:
                try:
                    await stop_consumer(consumer)
                finally:
                    hop.state.close()
        finally:
            await stop_consumer(restorer)
    finally:
        current = hop.producer if hop is not None else producer
        if current is not producer:
            await stop_quietly(producer)  # replaced: already stopped
        try:
            await current.stop()
        except KafkaError:
            log.exception("producer did not stop cleanly")
    return status
