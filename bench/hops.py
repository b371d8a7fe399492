"""The raw baselines: what a competent engineer writes first, and the two loops that mark the limit.

- :func:`baseline_hop` — aiokafka ``getmany``, stdlib ``json`` decode, a trivial transform,
  encode, ``send`` without awaiting each delivery, ``flush``, ``commit``; default aiokafka
  producer settings. With ``codec="orjson"`` the same loop with orjson.
- :func:`confluent_hop` — the same loop on confluent-kafka (librdkafka), in a thread.
- :func:`raw_send_loop` — a plain ``AIOKafkaProducer.send`` loop with the shared producer's
  linger, batch size, acks and idempotence: the denominator of R3.
- :func:`shared_publish` — the shared producer (``create_producer`` + ``BatchPublisher``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from shared.kafka import BatchPublisher, OutRecord, connection_config, create_producer, started
from shared.settings import XietongSettings

Codec = Literal["json", "orjson"]


def _codec(codec: Codec) -> tuple[Callable[[bytes], Any], Callable[[Any], bytes]]:
    if codec == "orjson":
        return orjson.loads, orjson.dumps
    return json.loads, lambda value: json.dumps(value).encode()


def transform(event: dict[str, Any]) -> dict[str, Any]:
    """The trivial work of a baseline hop: one derived field."""
    payload = event["payload"]
    payload["amount"] = payload["quantity"] * (payload.get("unit_price") or 0.0)
    return event


async def baseline_hop(
    settings: XietongSettings,
    source: str,
    target: str,
    group: str,
    *,
    expected: int | None = None,
    stop: asyncio.Event | None = None,
    codec: Codec = "json",
) -> int:
    """Copy-and-transform ``source`` to ``target`` until ``expected`` records or ``stop``."""
    loads, dumps = _codec(codec)
    stop = stop or asyncio.Event()
    consumer = AIOKafkaConsumer(
        source,
        **connection_config(settings),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(**connection_config(settings))
    done = 0
    async with started(consumer), started(producer):
        while not stop.is_set() and (expected is None or done < expected):
            batch = await consumer.getmany(timeout_ms=200)
            if not batch:
                continue
            for records in batch.values():
                for record in records:
                    event = transform(loads(record.value))
                    await producer.send(target, dumps(event), key=record.key)
                    done += 1
            await producer.flush()
            await consumer.commit()
    return done


def confluent_hop(
    settings: XietongSettings,
    source: str,
    target: str,
    group: str,
    *,
    expected: int,
    codec: Codec = "orjson",
    timeout: float = 120.0,
) -> float:
    """The same hop on confluent-kafka (blocking; run it in a thread). Returns the wall time
    at which its partitions were assigned.

    librdkafka fetches in its own threads as soon as partitions are assigned, so the first
    ``consume`` can return long after the first records arrived (with many already queued);
    the assignment, one fetch earlier than the first record, is the fair start of its drain."""
    from confluent_kafka import Consumer, Producer

    loads, dumps = _codec(codec)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers})
    assigned: list[float] = []
    done = 0
    deadline = time.monotonic() + timeout
    try:
        consumer.subscribe([source], on_assign=lambda *_: assigned.append(time.time()))
        while done < expected and time.monotonic() < deadline:
            messages = consumer.consume(num_messages=5000, timeout=0.2)
            if not messages:
                continue
            for message in messages:
                if message.error():
                    raise RuntimeError(str(message.error()))
                event = transform(loads(message.value() or b"null"))
                producer.produce(target, dumps(event), key=message.key())
                producer.poll(0)
                done += 1
            producer.flush()
            consumer.commit(asynchronous=False)
    finally:
        consumer.close()
        producer.flush()
    if not assigned or done < expected:
        raise RuntimeError(f"confluent-kafka read {done} of {expected} records from {source}")
    return assigned[0]


def _chunks(records: Sequence[OutRecord], size: int) -> list[Sequence[OutRecord]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


async def raw_send_loop(
    settings: XietongSettings, topic: str, records: Sequence[OutRecord], *, chunk: int
) -> float:
    """``await producer.send(...)`` per record, a chunk's futures gathered at its end.
    Same linger, batch size, acks and idempotence as the shared producer. Returns seconds."""
    producer = AIOKafkaProducer(
        **connection_config(settings),
        linger_ms=settings.kafka_linger_ms,
        max_batch_size=settings.kafka_max_batch_bytes,
        max_request_size=16 * 1024 * 1024,
        acks="all",
        enable_idempotence=True,
    )
    async with started(producer):
        await producer.partitions_for(topic)
        started_at = time.perf_counter()
        for part in _chunks(records, chunk):
            futures = [await producer.send(topic, r.value, key=r.key) for r in part]
            await asyncio.gather(*futures)
        return time.perf_counter() - started_at


async def shared_publish(
    settings: XietongSettings, topic: str, records: Sequence[OutRecord], *, chunk: int
) -> float:
    """The shared producer publishing the same chunks. Returns seconds."""
    async with started(create_producer(settings)) as producer:
        publisher = BatchPublisher(producer)
        await producer.partitions_for(topic)
        started_at = time.perf_counter()
        for part in _chunks(records, chunk):
            await publisher.publish(topic, part)
        return time.perf_counter() - started_at
