"""The shared producer and consumer helpers against the real local Kafka broker."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka.errors import KafkaConnectionError, OutOfOrderSequenceNumber, UnknownProducerId

from deploy.local import infra
from schemas.topics import dlq
from shared.codec import decode, encode
from shared.deadletter import dead_letter_record, split_valid_events
from shared.kafka import (
    Batch,
    BatchPublisher,
    KafkaHealth,
    OutRecord,
    create_consumer,
    create_producer,
    ensure_topics,
    is_broken_producer_error,
    kafka_problem,
    publishing,
    retrying,
    run_batch_loop,
    started,
)
from shared.logs import RepeatFilter
from shared.settings import XietongSettings, load_settings
from tests.factories import sales_event
from tests.kafka_helpers import read_records


@pytest.mark.integration
async def test_envelopes_come_back_through_a_consumer_group_in_order_per_tenant(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("events")
    await ensure_topics(settings, [topic])
    tenants = ["acme", "bolt-works", "zhongshan_steel"]
    sent = [sales_event(tenant, seq=i) for i in range(200) for tenant in tenants]
    async with started(create_producer(settings)) as producer:
        published = await BatchPublisher(producer).publish(
            topic, [OutRecord(e["tenant"].encode(), encode(e)) for e in sent]
        )
    assert published == len(sent)

    records = await read_records(settings, topic, len(sent), group=unique_name("group"))
    by_tenant: dict[str, list[str]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for record in records:
        event = decode(record.value)
        assert record.key == event["tenant"].encode()
        by_tenant[event["tenant"]].append(event["event_id"])
        partitions[event["tenant"]].add(record.partition)
    for tenant in tenants:
        assert by_tenant[tenant] == [e["event_id"] for e in sent if e["tenant"] == tenant]
        assert len(partitions[tenant]) == 1  # the key is the tenant: one partition per firm


@pytest.mark.integration
async def test_a_malformed_message_goes_to_its_dead_letter_topic_and_the_consumer_goes_on(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    source, output = unique_name("events"), unique_name("checked")
    await ensure_topics(settings, [source, output, dlq(source)])
    good_before, good_after = sales_event(seq=1), sales_event(seq=2)
    missing_quantity = sales_event(seq=3)
    del missing_quantity["payload"]["quantity"]
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(
            source,
            [
                OutRecord(b"acme", encode(good_before)),
                OutRecord(b"acme", b"{not json"),
                OutRecord(b"acme", encode(missing_quantity)),
                OutRecord(b"acme", encode(good_after)),
            ],
        )

        publisher = BatchPublisher(producer)
        stop = asyncio.Event()
        handled = 0

        async def handle(batch: Batch) -> None:
            nonlocal handled
            records = [r for rs in batch.values() for r in rs]
            good, bad = split_valid_events(records, service="test")
            await publisher.publish_many(
                {
                    output: [OutRecord(r.key, r.value) for r, _ in good],
                    dlq(source): [dead_letter_record(letter) for letter in bad],
                }
            )
            handled += len(records)
            if handled >= 4:
                stop.set()

        async with started(create_consumer(settings, unique_name("group"), source)) as consumer:
            await asyncio.wait_for(
                run_batch_loop(consumer, handle, stop, max_records=100, timeout_ms=100), 30
            )

    passed = [decode(r.value)["event_id"] for r in await read_records(settings, output, 2)]
    assert passed == [good_before["event_id"], good_after["event_id"]]
    letters = [decode(r.value) for r in await read_records(settings, dlq(source), 2)]
    assert letters[0]["original"] == "{not json"
    assert letters[0]["source_topic"] == source and letters[0]["source_offset"] == 1
    assert "quantity" in {e["field"] for e in letters[1]["errors"]} or any(
        e["field"] == "payload.quantity" for e in letters[1]["errors"]
    )
    assert letters[1]["source_offset"] == 2 and letters[1]["tenant"] == "acme"


@pytest.mark.integration
async def test_committed_offsets_resume_where_the_group_stopped(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    topic, group = unique_name("events"), unique_name("group")
    await ensure_topics(settings, [topic], partitions=1)
    events = [sales_event(seq=i) for i in range(10)]
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(
            topic, [OutRecord(b"acme", encode(e)) for e in events[:6]]
        )

    async def handle_one_batch(batch: Batch) -> None:
        stop.set()

    stop = asyncio.Event()
    async with started(create_consumer(settings, group, topic)) as consumer:
        await asyncio.wait_for(
            run_batch_loop(consumer, handle_one_batch, stop, max_records=6, timeout_ms=200), 30
        )

    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(
            topic, [OutRecord(b"acme", encode(e)) for e in events[6:]]
        )
    rest = await read_records(settings, topic, 4, group=group)
    assert [decode(r.value)["event_id"] for r in rest] == [e["event_id"] for e in events[6:]]


# --------------------------------------------------------------------------- broker outages


@pytest.mark.integration
async def test_a_batch_whose_publish_fails_is_handled_again_not_dropped_or_fatal(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    topic, output = unique_name("events"), unique_name("out")
    await ensure_topics(settings, [topic, output], partitions=1)
    events = [sales_event(seq=i) for i in range(5)]
    async with publishing(settings) as publisher:
        await publisher.publish(topic, [OutRecord(b"acme", encode(e)) for e in events])
        first = publisher.producer
        stop = asyncio.Event()
        attempts = 0

        async def handle(batch: Batch) -> None:
            nonlocal attempts
            attempts += 1
            if attempts == 1:  # as aiokafka reports a producer the broker no longer knows
                raise OutOfOrderSequenceNumber()
            records = [r for rs in batch.values() for r in rs]
            await publisher.publish(output, [OutRecord(r.key, r.value) for r in records])
            stop.set()

        health = KafkaHealth.of(settings)
        async with started(create_consumer(settings, unique_name("group"), topic)) as consumer:
            await asyncio.wait_for(
                run_batch_loop(
                    consumer,
                    handle,
                    stop,
                    max_records=100,
                    timeout_ms=100,
                    health=health,
                    publisher=publisher,
                ),
                30,
            )
        assert attempts == 2
        assert publisher.producer is not first  # replaced: a new producer id
        assert health.problem() is None
    passed = [decode(r.value)["event_id"] for r in await read_records(settings, output, 5)]
    assert passed == [e["event_id"] for e in events]


@pytest.mark.integration
async def test_a_producer_whose_sender_died_is_reported_broken_and_replaced(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    topic = unique_name("events")
    await ensure_topics(settings, [topic], partitions=1)
    async with publishing(settings, linger_ms=0) as publisher:
        broken = publisher.producer
        # what aiokafka does when the broker answers OutOfOrderSequenceNumber: the sender task
        # dies of it, and its done-callback fails every batch, then and later, with it
        sender = broken._sender
        sender._sender_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender._sender_task
        died: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        died.set_exception(OutOfOrderSequenceNumber())
        sender._sender_task = died
        sender._message_accumulator.fail_all(OutOfOrderSequenceNumber())
        assert publisher.broken() is not None and publisher.problem() is not None

        sent = await retrying(
            lambda: publisher.publish(topic, [OutRecord(b"acme", b"{}")]),
            what="test publish",
            publisher=publisher,
        )
        assert sent == 1 and publisher.producer is not broken and publisher.problem() is None
    assert len(await read_records(settings, topic, 1)) == 1


async def test_health_says_the_broker_is_away_within_seconds() -> None:
    closed = infra.free_port()  # nothing listens there
    away = load_settings(kafka_bootstrap_servers=f"127.0.0.1:{closed}")
    health = KafkaHealth.of(away)
    health.interval = 0.2
    async with health.watching(away), asyncio.timeout(30):
        while True:
            if health.unreachable() is not None:
                break
            await asyncio.sleep(0.1)
    assert "not reachable" in health.unreachable() and "make up" in health.unreachable()


XIETONG = str(Path(sys.executable).parent / "xietong")
"""The operator's command, as installed in the venv."""


def test_a_closed_kafka_port_is_one_line_with_what_to_run() -> None:
    closed = infra.free_port()
    done = subprocess.run(
        [XIETONG, "--kafka", f"127.0.0.1:{closed}", "tenants", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"127.0.0.1:{closed} is not reachable" in lines[0] and "make up" in lines[0]


@pytest.mark.parametrize("error", [OutOfOrderSequenceNumber(), UnknownProducerId()])
def test_errors_that_break_an_idempotent_producer_are_told_apart(error: Exception) -> None:
    assert is_broken_producer_error(error)
    assert not is_broken_producer_error(KafkaConnectionError("gone"))
    assert "not reachable" in kafka_problem(KafkaConnectionError("x"), "127.0.0.1:9")


def test_repeated_warnings_are_collapsed_with_a_count() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RepeatFilter(window=30))
    logger = logging.getLogger(unique_logger())
    logger.addHandler(handler)
    logger.propagate = False
    now = 1_000.0
    said = "Unable connect to node %s: try %s"
    for i in range(500):  # the same complaint about node 1, a few numbers changing
        record = logger.makeRecord(
            logger.name,
            logging.ERROR,
            __file__,
            1,
            "Unable connect to node %s: try %s",
            (1, i),
            None,
        )
        record.created = now + i * 0.05  # 25 s
        logger.handle(record)
    late = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, said, (1, 9), None)
    late.created = now + 31
    logger.handle(late)
    logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 2, "fine", (), None))
    lines = stream.getvalue().splitlines()
    assert lines == [
        "Unable connect to node 1: try 0",
        "Unable connect to node 1: try 9 (and 499 more like it in 30 s)",
        "fine",
    ]


def unique_logger() -> str:
    return f"test.repeats.{uuid.uuid4().hex}"
