"""Producer and consumer helpers on aiokafka, with the settings that measured fast.

Delivery: the producer is idempotent with ``acks=all``. :class:`BatchPublisher` sends a whole
batch of records at once — one aiokafka ``BatchBuilder`` per partition, each key's partition
looked up once — and waits for the broker to acknowledge all of them together, never one
delivery at a time. Consumers never auto-commit: :func:`run_batch_loop` commits a ``getmany``
batch only after its handler has made the results durable (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.partitioner import DefaultPartitioner, murmur2

from shared.settings import XietongSettings

log = logging.getLogger(__name__)


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
    _partitioner: DefaultPartitioner = field(default_factory=DefaultPartitioner)
    _partitions: dict[str, list[int]] = field(default_factory=dict)

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


@contextlib.asynccontextmanager
async def started(client: Any) -> AsyncIterator[Any]:
    """``async with started(create_producer(s)) as producer:`` — start, then always stop."""
    await client.start()
    try:
        yield client
    finally:
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
) -> None:
    """At-least-once micro-batch loop: ``getmany`` -> ``handle`` (makes results durable) -> commit.

    An exception from ``handle`` is logged with the batch's coordinates and re-raised: the
    worker stops rather than skip data; the uncommitted batch is read again on restart.
    """
    while not stop.is_set():
        batch: Batch = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        if not batch:
            continue
        try:
            await handle(batch)
        except Exception:
            coordinates = {
                f"{tp.topic}[{tp.partition}]": [records[0].offset, records[-1].offset]
                for tp, records in batch.items()
            }
            log.exception("batch failed; stopping without commit", extra={"batch": coordinates})
            raise
        await consumer.commit()
