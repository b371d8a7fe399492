"""Producer and consumer helpers on aiokafka, with the settings that measured fast.

Delivery: the producer is idempotent with ``acks=all``. :class:`BatchPublisher` sends a whole
batch of records at once — one aiokafka ``BatchBuilder`` per partition, each key's partition
looked up once — and waits for the broker to acknowledge all of them together, never one
delivery at a time. Consumers never auto-commit: :func:`run_batch_loop` commits a ``getmany``
batch only after its handler has made the results durable (at-least-once).

When the broker goes away: an idempotent producer never gives up a batch (aiokafka retries it
until the broker answers), so a send in flight waits out the outage; a send that does fail
(the broker lost the producer's sequence state — ``OutOfOrderSequenceNumber``,
``UnknownProducerId``, fenced) leaves the producer broken for good, and
:meth:`BatchPublisher.renew` replaces it with a fresh one (a new producer id). :func:`retrying`
runs a unit of work until the broker takes it — :func:`deliver` a batch's output, sending again
only what the broker has not acknowledged, :func:`commit_offsets` a commit — :class:`KafkaHealth`
tells readiness the truth within seconds, and :func:`kafka_problem` says in one line what is
wrong and what to run.
Topics are made by :func:`ensure_topics`, never by the broker: the local broker runs with
``auto.create.topics.enable=false`` (aiokafka 0.14 has no ``allow.auto.create.topics`` switch:
its metadata requests always allow creation, so the broker setting is the guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import (
    CommitFailedError,
    IllegalStateError,
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    TopicAlreadyExistsError,
    UnknownProducerId,
)
from aiokafka.partitioner import DefaultPartitioner, murmur2

from shared.settings import XietongSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


Text = bytes | memoryview
"""A record's value: its bytes, or a view into a larger buffer (a request body) that the
producer copies into its batch, so the gateway never copies a record itself."""

NO_HEADERS: list[tuple[str, bytes]] = []
"""Shared by every record without headers (the builder only reads them), as aiokafka's own
default is: one list less per record on the hot path."""


class OutRecord(NamedTuple):
    """One record to produce: key and value already encoded."""

    key: bytes | None
    value: Text
    headers: Sequence[tuple[str, bytes]] = ()
    timestamp_ms: int | None = None
    """Its Kafka timestamp (a replay keeps the original's); None: as the sender decides."""


async def send_to_partition(
    producer: AIOKafkaProducer,
    topic: str,
    partition: int,
    records: Sequence[OutRecord],
    timestamp_ms: int | None = None,
    *,
    sent: list[tuple[asyncio.Future[Any], int]] | None = None,
) -> list[tuple[asyncio.Future[Any], int]]:
    """Append ``records`` to producer batches for one explicit partition and hand each batch
    over; return each batch's future (its result's ``offset`` is the batch's first offset) and
    record count, in order. A record's own ``timestamp_ms`` wins over ``timestamp_ms``.

    :class:`BatchPublisher` partitions by key; this is for a partition the caller decides (the
    clean topic mirrors its source, a replay keeps the original's, :func:`deliver` re-sends one
    partition's rest). ``sent`` (given) receives each batch as it is handed over, so a caller
    whose send fails midway knows what is already in flight.
    """
    sent = [] if sent is None else sent

    async def ship(builder: Any) -> None:
        count = builder.record_count()
        sent.append((await producer.send_batch(builder, topic, partition=partition), count))

    builder = producer.create_batch()
    for record in records:
        headers = list(record.headers) if record.headers else NO_HEADERS
        key, value = record.key, record.value
        at = timestamp_ms if record.timestamp_ms is None else record.timestamp_ms
        if builder.append(key=key, value=value, timestamp=at, headers=headers) is None:
            if not builder.record_count():
                raise ValueError(f"record of {len(value)} bytes exceeds the batch size")
            await ship(builder)
            builder = producer.create_batch()
            if builder.append(key=key, value=value, timestamp=at, headers=headers) is None:
                raise ValueError(f"record of {len(value)} bytes exceeds the batch size")
    if builder.record_count():
        await ship(builder)
    return sent


Batch = dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]]


def partition_of(key: bytes, partitions: int) -> int:
    """The partition of ``key`` among ``partitions``, as :class:`BatchPublisher` and Java's
    default partitioner choose it: murmur2 of the key, made positive, modulo the count."""
    return int((murmur2(key) & 0x7FFFFFFF) % partitions)


def connection_config(settings: XietongSettings) -> dict[str, Any]:
    """Bootstrap servers and security for every client (SASL/TLS from the environment)."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        config["ssl_context"] = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_sasl_mechanism:
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        if settings.kafka_sasl_password is not None:
            config["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return config


def create_producer(settings: XietongSettings, **overrides: Any) -> AIOKafkaProducer:
    """An idempotent, ``acks=all`` producer with large batches (not started)."""
    config = {
        **connection_config(settings),
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": settings.kafka_linger_ms,
        "max_batch_size": settings.kafka_max_batch_bytes,
        "max_request_size": 16 * 1024 * 1024,
        "request_timeout_ms": 30000,
        **overrides,
    }
    return AIOKafkaProducer(**config)


def create_consumer(
    settings: XietongSettings, group_id: str | None, *topics: str, **overrides: Any
) -> AIOKafkaConsumer:
    """A manual-commit consumer that reads from the earliest offset (not started)."""
    config = {
        **connection_config(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": 8 * 1024 * 1024,
        "fetch_max_bytes": 64 * 1024 * 1024,
        "isolation_level": "read_uncommitted",
        **overrides,
    }
    return AIOKafkaConsumer(*topics, **config)


@dataclass
class BatchPublisher:
    """Publishes batches of records: all appended first, then all deliveries awaited together."""

    producer: AIOKafkaProducer
    renew_with: Callable[[], AIOKafkaProducer] | None = None
    """Makes the (unstarted) producer that :meth:`renew` swaps in; None: no renewal."""
    _partitioner: DefaultPartitioner = field(default_factory=DefaultPartitioner)
    _partitions: dict[str, list[int]] = field(default_factory=dict)

    def broken(self) -> BaseException | None:
        """The error that killed the producer's sender, or None while it can still deliver."""
        return producer_failure(self.producer)

    def problem(self) -> str | None:
        """Why this publisher cannot deliver (for readiness), or None."""
        error = self.broken()
        return None if error is None else f"Kafka producer broken, being replaced: {error!r}"

    async def renew(self, failed: AIOKafkaProducer | None = None) -> bool:
        """Replace the producer by a fresh, started one (a new producer id, sequences from 0).

        For a producer whose idempotence state is broken (:func:`is_broken_producer_error`):
        it fails every send from then on. ``failed`` is the producer the caller saw fail: if
        another caller renewed it meanwhile, nothing is done. Raises what ``start()`` raises
        (the broker is still away: call again later). Returns whether it renewed.
        """
        if self.renew_with is None:
            return False
        broken = self.producer if failed is None else failed
        if self.producer is not broken:
            return True
        fresh = self.renew_with()
        await fresh.start()
        if self.producer is not broken:  # renewed by someone else while this one started
            await fresh.stop()
            return True
        self.producer = fresh
        self._partitions.clear()
        log.warning(
            "Kafka producer replaced",
            extra={"reason": repr(producer_failure(broken) or "send failed")},
        )
        await stop_quietly(broken)
        return True

    async def _partitions_of(self, topic: str) -> list[int]:
        known = self._partitions.get(topic)
        if known is None:
            known = sorted(await self.producer.partitions_for(topic))
            self._partitions[topic] = known
        return known

    async def enqueue(self, topic: str, records: Iterable[OutRecord]) -> list[asyncio.Future[Any]]:
        """Append ``records`` to per-partition batches and hand them to the producer.

        Returns the delivery futures (one per partition batch); await them with :meth:`publish`
        or ``asyncio.gather`` once everything of a unit of work is enqueued.
        """
        partitions = await self._partitions_of(topic)
        partition_of_key: dict[bytes | None, int] = {}
        builders: dict[int, Any] = {}
        futures: list[asyncio.Future[Any]] = []
        for record in records:
            partition = partition_of_key.get(record.key)
            if partition is None:
                partition = self._partitioner(record.key, partitions, partitions)
                if record.key is not None:
                    partition_of_key[record.key] = partition
            builder = builders.get(partition)
            if builder is None:
                builder = builders[partition] = self.producer.create_batch()
            headers = list(record.headers) if record.headers else NO_HEADERS
            appended = builder.append(
                key=record.key, value=record.value, timestamp=None, headers=headers
            )
            if appended is None:  # the batch is full: ship it and start another
                futures.append(await self.producer.send_batch(builder, topic, partition=partition))
                builder = builders[partition] = self.producer.create_batch()
                appended = builder.append(
                    key=record.key, value=record.value, timestamp=None, headers=headers
                )
                if appended is None:
                    raise ValueError(f"record of {len(record.value)} bytes exceeds the batch size")
        for partition, builder in builders.items():
            if builder.record_count():
                futures.append(await self.producer.send_batch(builder, topic, partition=partition))
        return futures

    async def publish(self, topic: str, records: Iterable[OutRecord]) -> int:
        """Send ``records`` to ``topic`` and return once the broker acknowledged all of them."""
        records = list(records)
        if not records:
            return 0
        await asyncio.gather(*await self.enqueue(topic, records))
        return len(records)

    async def publish_many(self, batches: dict[str, Sequence[OutRecord]]) -> int:
        """Send to several topics, awaiting every acknowledgement at the end."""
        futures: list[asyncio.Future[Any]] = []
        count = 0
        for topic, records in batches.items():
            if records:
                futures += await self.enqueue(topic, records)
                count += len(records)
        await asyncio.gather(*futures)
        return count


@contextlib.asynccontextmanager
async def publishing(settings: XietongSettings, **overrides: Any) -> AsyncIterator[BatchPublisher]:
    """``async with publishing(settings) as publisher:`` — a :class:`BatchPublisher` over a
    started :func:`create_producer`, renewable (:meth:`BatchPublisher.renew`); whichever
    producer it holds at the end is stopped."""
    publisher = BatchPublisher(
        create_producer(settings, **overrides),
        renew_with=lambda: create_producer(settings, **overrides),
    )
    await publisher.producer.start()
    try:
        yield publisher
    finally:
        await publisher.producer.stop()


# ------------------------------------------------------------------- when the broker is away

BROKEN_PRODUCER_ERRORS: tuple[type[KafkaError], ...] = (
    OutOfOrderSequenceNumber,
    UnknownProducerId,
    ProducerFenced,
    InvalidProducerEpoch,
)
"""Errors after which an idempotent producer never delivers again (aiokafka#1038 and kin): the
broker lost or rejects its producer id and sequence numbers. Only a new producer helps."""

UNREACHABLE_ERRORS: tuple[type[BaseException], ...] = (
    KafkaConnectionError,
    NodeNotReadyError,
    KafkaTimeoutError,
    TimeoutError,
    ConnectionError,
)


def is_broken_producer_error(error: BaseException) -> bool:
    """Is ``error`` one after which the producer that raised it must be replaced?"""
    return isinstance(error, BROKEN_PRODUCER_ERRORS)


def producer_failure(producer: Any) -> BaseException | None:
    """The error its sender task died of (then every send fails at once), else None."""
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if not isinstance(task, asyncio.Future) or not task.done() or task.cancelled():
        return None
    return task.exception()


async def stop_quietly(client: Any, timeout: float = 5.0) -> None:
    """Stop a client that may be broken or cut off from the broker: a producer's ``stop()``
    flushes, which would wait for the broker; give it ``timeout`` seconds, then let it go."""
    try:
        async with asyncio.timeout(timeout):
            await client.stop()
    except (KafkaError, TimeoutError, OSError) as error:
        log.warning("Kafka client abandoned while stopping", extra={"error": repr(error)})


def kafka_problem(error: BaseException, bootstrap: str) -> str:
    """One line saying what is wrong with Kafka and what to do, for operators and logs."""
    text = str(error) or type(error).__name__
    if isinstance(error, UNREACHABLE_ERRORS) or "Unable to bootstrap" in text:
        return (
            f"Kafka at {bootstrap} is not reachable — is it running? `make up` starts it "
            "(`make status` shows what runs; XIETONG_KAFKA_BOOTSTRAP_SERVERS says where to look)"
        )
    if is_broken_producer_error(error):
        return f"Kafka at {bootstrap} refused the producer's sequence ({type(error).__name__})"
    return f"Kafka at {bootstrap}: {type(error).__name__}: {text}"


@dataclass
class KafkaHealth:
    """What a service's readiness says about its work with the broker.

    Loops call :meth:`progress` whenever they complete a unit of work with the broker (a batch
    handled and committed, an empty fetch) and :meth:`failing` when one fails; a background
    probe (:meth:`watching`) asks the broker for its metadata every ``interval`` seconds, so an
    idle loop whose broker went away is found out too. Not ready (:meth:`problem`) once the last
    progress or the last answer of the broker is older than ``unready_after`` seconds.
    """

    bootstrap: str
    unready_after: float = 10.0
    interval: float = 1.0
    loops: bool = True
    """False for a service without loops (the gateway): only the broker's answers count."""
    last_progress: float = field(default_factory=time.monotonic)
    last_answer: float = field(default_factory=time.monotonic)
    trouble: str | None = None
    unanswered: str | None = None
    """Why the last probe failed; None once the broker answered it."""

    @classmethod
    def of(cls, settings: XietongSettings, *, loops: bool = True) -> KafkaHealth:
        return cls(
            settings.kafka_bootstrap_servers, settings.kafka_unready_after_seconds, loops=loops
        )

    def unreachable(self) -> str | None:
        """Why the broker is away, once its probes failed for two intervals; else None."""
        if self.unanswered is None or time.monotonic() - self.last_answer <= 2 * self.interval:
            return None
        return self.unanswered

    def progress(self) -> None:
        self.last_progress = time.monotonic()
        self.trouble = None

    def failing(self, error: BaseException) -> None:
        self.trouble = kafka_problem(error, self.bootstrap)

    def problem(self) -> str | None:
        """None when the loops progress and the broker answers, else why not (``/readyz``)."""
        now = time.monotonic()
        since = min(self.last_progress, self.last_answer) if self.loops else self.last_answer
        quiet = now - since
        if quiet <= self.unready_after:
            return None
        if now - self.last_answer > self.unready_after:
            silent = f"Kafka at {self.bootstrap} has not answered for {quiet:.0f} s"
            return self.unanswered or silent
        return f"no progress with Kafka for {quiet:.0f} s" + (
            f": {self.trouble}" if self.trouble else ""
        )

    @contextlib.asynccontextmanager
    async def watching(self, settings: XietongSettings) -> AsyncIterator[KafkaHealth]:
        """Probe the broker in the background for the life of the block."""
        task = asyncio.create_task(self._probe(settings), name="kafka-health")
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe(self, settings: XietongSettings) -> None:
        client: AIOKafkaClient | None = None
        try:
            while True:
                try:
                    async with asyncio.timeout(max(self.interval, 2.0)):
                        if client is None:
                            client = AIOKafkaClient(**connection_config(settings))
                            await client.bootstrap()
                        await client.fetch_all_metadata()
                    self.last_answer = time.monotonic()
                    self.unanswered = None
                except (KafkaError, OSError, TimeoutError) as error:
                    self.unanswered = self.trouble = kafka_problem(error, self.bootstrap)
                    if client is not None and not client.cluster.brokers():
                        await client.close()
                        client = None  # never bootstrapped: try from scratch next time
                await asyncio.sleep(self.interval)
        finally:
            if client is not None:
                await client.close()


async def retrying(
    attempt: Callable[[], Awaitable[T]],
    *,
    what: str,
    health: KafkaHealth | None = None,
    stop: asyncio.Event | None = None,
    publisher: BatchPublisher | None = None,
    bootstrap: str = "Kafka",
    max_delay: float = 5.0,
) -> T:
    """Run ``attempt`` until the broker takes it: a :class:`KafkaError` or a timeout is logged
    in one line (repeats are collapsed by :class:`shared.logs.RepeatFilter`), a broken
    ``publisher`` is renewed, and the attempt runs again after a back-off (0.2 s doubling to
    ``max_delay``). ``attempt`` must be safe to repeat (idempotent output). Any other error
    propagates, and so do a refused commit (``CommitFailedError``, ``IllegalStateError``: a
    rebalance, not an outage) and the last Kafka error once ``stop`` is set (the caller stops
    without committing: the work is read again on restart).
    """
    delay = 0.2
    while True:
        try:
            result = await attempt()
        except (CommitFailedError, IllegalStateError):
            raise
        except (KafkaError, TimeoutError, OSError) as error:
            if health is not None:
                health.failing(error)
                bootstrap = health.bootstrap
            if stop is not None and stop.is_set():
                raise
            log.warning(
                "%s failed; retrying: %s",
                what,
                kafka_problem(error, bootstrap),
                extra={"what": what},
            )
            if publisher is not None and (
                is_broken_producer_error(error) or publisher.broken() is not None
            ):
                with contextlib.suppress(KafkaError, OSError, TimeoutError):
                    await publisher.renew()
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)
            continue
        if health is not None:
            health.progress()
        return result


async def deliver(
    publisher: BatchPublisher,
    batches: Mapping[str, Sequence[OutRecord]],
    *,
    what: str,
    health: KafkaHealth | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Send ``batches`` (topic -> records) until the broker acknowledged every record; return
    how many there were.

    As :func:`retrying` (one line per failure, a broken producer replaced, back-off, the last
    error raised once ``stop`` is set), but each attempt sends only the records no earlier
    attempt got acknowledged: a batch whose publish an outage cut in the middle is not written
    twice in the part that was acknowledged. Each record keeps the partition it was first given
    (a keyless one too). A record the broker wrote whose acknowledgement never came back is
    sent again: without transactions nothing can tell, so outputs keep deterministic ids.
    """
    pending: dict[tuple[str, int], list[OutRecord]] | None = None
    total = sum(len(records) for records in batches.values())

    async def attempt() -> int:
        nonlocal pending
        if pending is None:  # each record's partition, once (it needs the topic's metadata)
            pending = {}
            for topic, records in batches.items():
                if not records:
                    continue
                partitions = await publisher._partitions_of(topic)
                of_key: dict[bytes, int] = {}
                for record in records:
                    key = record.key
                    partition = of_key.get(key) if key is not None else None
                    if partition is None:
                        partition = publisher._partitioner(key, partitions, partitions)
                        if key is not None:
                            of_key[key] = partition
                    pending.setdefault((topic, partition), []).append(record)
        sent: list[tuple[asyncio.Future[Any], tuple[str, int], int, int]] = []
        failure: BaseException | None = None
        for where, records in pending.items():
            handed: list[tuple[asyncio.Future[Any], int]] = []
            try:
                await send_to_partition(publisher.producer, *where, records, sent=handed)
            except (KafkaError, TimeoutError, OSError) as error:
                failure = error  # what was handed over is still in flight: settle it first
            first = 0
            for future, count in handed:  # each batch's span of ``records``
                sent.append((future, where, first, first + count))
                first += count
            if failure is not None:
                break
        results = await asyncio.gather(*(future for future, *_ in sent), return_exceptions=True)
        acknowledged: dict[tuple[str, int], list[tuple[int, int]]] = {}
        for (_, where, first, end), result in zip(sent, results, strict=True):
            if not isinstance(result, BaseException):
                acknowledged.setdefault(where, []).append((first, end))
            elif failure is None:
                abandoned = isinstance(result, asyncio.CancelledError)  # its producer was let go
                failure = KafkaError("delivery abandoned") if abandoned else result
        for where, spans in acknowledged.items():
            records, taken = pending[where], set[int]()
            for first, end in spans:
                taken.update(range(first, end))
            pending[where] = [record for i, record in enumerate(records) if i not in taken]
        pending = {where: records for where, records in pending.items() if records}
        if failure is not None:
            raise failure
        return total

    if not total:
        return 0
    return await retrying(
        attempt,
        what=what,
        health=health,
        stop=stop,
        publisher=publisher,
        bootstrap=_bootstrap_of(publisher.producer),
    )


async def committed_points(
    admin: AIOKafkaAdminClient,
    group: str,
    partitions: Iterable[TopicPartition],
    *,
    what: str,
    health: KafkaHealth | None = None,
) -> dict[TopicPartition, tuple[int, str] | None]:
    """``group``'s committed ``(offset, metadata)`` of each partition (None: never committed),
    read as a rebalance listener restoring its state does: waiting out an outage
    (:func:`retrying`)."""
    wanted = list(partitions)
    committed = await retrying(
        lambda: admin.list_consumer_group_offsets(group, partitions=wanted),
        what=what,
        health=health,
    )
    points: dict[TopicPartition, tuple[int, str] | None] = {}
    for tp in wanted:
        found = committed.get(tp)
        if found is None or found.offset < 0:
            points[tp] = None
        else:
            points[tp] = (found.offset, found.metadata)
    return points


async def commit_offsets(
    consumer: AIOKafkaConsumer,
    offsets: Mapping[TopicPartition, Any],
    *,
    what: str,
    health: KafkaHealth | None = None,
    stop: asyncio.Event | None = None,
) -> bool:
    """Commit ``offsets`` (``consumer.commit``'s argument), waiting out an outage as
    :func:`retrying` does. Returns False when the group refused it after a rebalance (logged:
    the next owner of those partitions reads them again from the last commit); raises the last
    Kafka error once ``stop`` is set."""
    if not offsets:
        return True
    try:
        await retrying(
            lambda: consumer.commit(dict(offsets)),
            what=what,
            health=health,
            stop=stop,
            bootstrap=_bootstrap_of(consumer),
        )
    except (CommitFailedError, IllegalStateError) as error:
        log.warning(
            "%s refused after a rebalance; read again from the last commit",
            what,
            extra={"error": str(error)},
        )
        return False
    return True


async def ensure_topics(
    settings: XietongSettings,
    topics: Iterable[str],
    *,
    partitions: int | None = None,
    compacted: Iterable[str] = (),
) -> None:
    """Create the topics that do not exist yet (key-partitioned, compacted where asked)."""
    compacted = set(compacted)
    admin = AIOKafkaAdminClient(**connection_config(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = [
            NewTopic(
                name=name,
                num_partitions=partitions or settings.kafka_partitions,
                replication_factor=settings.kafka_replication_factor,
                topic_configs={"cleanup.policy": "compact"} if name in compacted else {},
            )
            for name in dict.fromkeys(topics)
            if name not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
            await _wait_until_led(admin, [topic.name for topic in new])
    finally:
        await admin.close()


async def _wait_until_led(
    admin: AIOKafkaAdminClient, names: list[str], timeout: float = 30
) -> None:
    """Return once every partition of ``names`` has a leader.

    The broker acknowledges a creation before its metadata shows the topic; a consumer that
    subscribes in that gap gets no partitions until its next metadata refresh (minutes).
    """
    async with asyncio.timeout(timeout):
        while True:
            described = await admin.describe_topics(names)
            if all(
                topic["error_code"] == 0
                and topic["partitions"]
                and all(p["leader"] >= 0 for p in topic["partitions"])
                for topic in described
            ):
                return
            await asyncio.sleep(0.05)


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """``topic``'s partitions, in order, as ``consumer`` sees them; a topic just created is
    waited for (its metadata lags a moment; about 5 s at most, then ``RuntimeError``)."""
    for _ in range(50):
        found = consumer.partitions_for_topic(topic)
        if found:
            return [TopicPartition(topic, p) for p in sorted(found)]
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"topic {topic} has no partitions")


async def stop_consumer(consumer: AIOKafkaConsumer) -> None:
    """Stop ``consumer``, also while the broker is away: aiokafka's ``stop()`` then re-raises
    the cancellation of its own fetch waiting out a back-off (a ``CancelledError`` that is not
    the caller's; the consumer is stopped all the same), which would end a clean shutdown with a
    traceback. A cancellation of the caller itself still propagates."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise


@contextlib.asynccontextmanager
async def started(client: Any) -> AsyncIterator[Any]:
    """``async with started(create_producer(s)) as producer:`` — start, then always stop."""
    await client.start()
    try:
        yield client
    finally:
        if isinstance(client, AIOKafkaConsumer):
            await stop_consumer(client)
        else:
            await client.stop()


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGTERM / SIGINT set ``stop``: the loop finishes its batch, commits and returns."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)


async def run_batch_loop(
    consumer: AIOKafkaConsumer,
    handle: Callable[[Batch], Awaitable[None]],
    stop: asyncio.Event,
    *,
    max_records: int,
    timeout_ms: int,
    health: KafkaHealth | None = None,
    publisher: BatchPublisher | None = None,
) -> None:
    """At-least-once micro-batch loop: ``getmany`` -> ``handle`` (makes results durable) -> commit.

    A Kafka error from ``handle`` or the commit (the broker is away, the producer broke) runs
    them again on the same batch until the broker takes it (:func:`retrying`; ``handle`` must
    be idempotent downstream, and ``publisher`` is renewed when its producer broke). Any other
    exception from ``handle`` is logged with the batch's coordinates and re-raised: the worker
    stops rather than skip data; the uncommitted batch is read again on restart.
    """
    while not stop.is_set():
        batch: Batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        if not batch:
            if health is not None:
                health.progress()
            continue

        async def handled(batch: Batch = batch) -> None:
            await handle(batch)
            try:
                await consumer.commit()
            except (CommitFailedError, IllegalStateError) as error:
                # a rebalance took the partitions: their next owner reads the batch again
                log.warning("commit refused after a rebalance", extra={"error": str(error)})

        try:
            await retrying(
                handled,
                what="batch",
                health=health,
                stop=stop,
                publisher=publisher,
                bootstrap=_bootstrap_of(consumer),
            )
        except Exception:
            log.exception("batch failed; stopping without commit", extra=batch_coordinates(batch))
            raise


def batch_coordinates(batch: Batch) -> dict[str, Any]:
    """``extra=`` for a log line about ``batch``: each partition's first and last offset."""
    return {
        "batch": {
            f"{tp.topic}[{tp.partition}]": [records[0].offset, records[-1].offset]
            for tp, records in batch.items()
        }
    }


def _bootstrap_of(client: Any) -> str:
    """Where a consumer (``_client``) or a producer (``client``) looks for the broker."""
    inner = getattr(client, "_client", None) or getattr(client, "client", None)
    servers = getattr(inner, "_bootstrap_servers", None)
    return servers if isinstance(servers, str) else "Kafka"
