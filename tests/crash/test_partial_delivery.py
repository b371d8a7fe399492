"""A publish an outage cuts in the middle: :func:`shared.kafka.deliver` sends again only what the
broker did not acknowledge (ml, nlp and storage deliver their outputs with it)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from shared.codec import decode, encode
from shared.kafka import OutRecord, deliver, ensure_topics, publishing
from shared.settings import XietongSettings
from tests.crash.harness import read_all

pytestmark = pytest.mark.integration


class FailingOnce:
    """The publisher's producer, but the first batch for ``partition`` fails as if the broker
    had gone away before acknowledging it."""

    def __init__(self, producer: Any, partition: int) -> None:
        self.producer, self.partition, self.failed = producer, partition, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.producer, name)

    async def send_batch(self, builder: Any, topic: str, *, partition: int) -> Any:
        if partition == self.partition and not self.failed:
            self.failed += 1
            lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            lost.set_exception(KafkaConnectionError("connection closed"))
            return lost
        return await self.producer.send_batch(builder, topic, partition=partition)


async def test_only_what_was_not_acknowledged_is_sent_again(
    settings: XietongSettings, unique_name: Callable[[str], str]
) -> None:
    first, second = unique_name("out"), unique_name("dlq")
    await ensure_topics(settings, [first, second], partitions=3)
    batches = {
        first: [OutRecord(f"firm-{i % 7}".encode(), encode({"n": i})) for i in range(300)],
        second: [OutRecord(None, encode({"n": 1000 + i})) for i in range(20)],  # keyless
    }
    async with publishing(settings) as publisher:
        real = publisher.producer
        failing = FailingOnce(real, partition=1)
        publisher.producer = failing  # type: ignore[assignment]
        try:
            sent = await deliver(publisher, batches, what="test batch")
        finally:
            publisher.producer = real
    assert sent == 320 and failing.failed == 1
    for topic, count in ((first, 300), (second, 20)):
        got = Counter(decode(r.value)["n"] for r in await read_all(settings, [topic]) if r.value)
        assert len(got) == count and set(got.values()) == {1}, (topic, got.most_common(3))
