"""How a drain is timed, the same way for our code and for the baselines.

- Start: the moment the hop's consumer first gets records. For every aiokafka consumer in this
  process, :class:`FirstFetch` instruments ``AIOKafkaConsumer.getmany`` (the class attribute, for
  the duration of one run) and notes the first call that returned records. A loop we write
  ourselves that does not use aiokafka (confluent-kafka) notes its partition assignment.
- End: the broker's append time of the last output record. Output topics are created with
  ``message.timestamp.type=LogAppendTime``, so :func:`wait_for_output` only has to watch the end
  offsets until every expected record is there and then read the last record of each partition.
  With one broker and ``acks=all`` the acknowledgement follows the append within a millisecond.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from shared.kafka import connection_config
from shared.settings import XietongSettings

LOG_APPEND_TIME = 1  # Kafka's timestamp type of broker-stamped records


class FirstFetch:
    """Notes (wall clock, seconds) when an aiokafka consumer first receives records of ``topic``."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.at: float | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[FirstFetch]:
        original: Callable[..., Awaitable[Any]] = AIOKafkaConsumer.getmany
        probe = self

        async def getmany(consumer: AIOKafkaConsumer, *args: Any, **kwargs: Any) -> Any:
            batch = await original(consumer, *args, **kwargs)
            if probe.at is None and any(tp.topic == probe.topic for tp in batch):
                probe.at = time.time()
            return batch

        AIOKafkaConsumer.getmany = getmany
        try:
            yield self
        finally:
            AIOKafkaConsumer.getmany = original


class OutputIncomplete(RuntimeError):
    """The hop did not produce every expected record in time."""


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return set(consumer.partitions_for_topic(topic) or ())


async def wait_for_output(
    settings: XietongSettings,
    topic: str,
    expected: int,
    *,
    timeout: float,
    poll: float = 0.05,
    failed: Callable[[], BaseException | None] = lambda: None,
) -> float:
    """Wait until ``topic`` holds ``expected`` records; return the append time of the last one.

    ``failed`` is checked on every poll so a crashed hop ends the wait with its own error.
    """
    consumer = AIOKafkaConsumer(**connection_config(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = sorted(await _partitions(consumer, topic))
        tps = [TopicPartition(topic, p) for p in partitions]
        deadline = time.monotonic() + timeout
        while True:
            ends = await consumer.end_offsets(tps)
            if sum(ends.values()) >= expected:
                break
            error = failed()
            if error is not None:
                raise OutputIncomplete(f"the hop failed: {error!r}") from error
            if time.monotonic() > deadline:
                raise OutputIncomplete(
                    f"{topic}: {sum(ends.values())} of {expected} records after {timeout:.0f}s"
                )
            await asyncio.sleep(poll)
        return await last_append_time(consumer, ends)
    finally:
        await consumer.stop()


async def last_append_time(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> float:
    """The broker append time (seconds) of the newest record among ``ends``' partitions."""
    tails = {tp: end - 1 for tp, end in ends.items() if end > 0}
    consumer.assign(list(tails))
    for tp, offset in tails.items():
        consumer.seek(tp, offset)
    newest = 0.0
    pending = set(tails)
    async with asyncio.timeout(30):
        while pending:
            for tp, records in (await consumer.getmany(*pending, timeout_ms=500)).items():
                for record in records:
                    if record.offset == tails[tp]:
                        if record.timestamp_type != LOG_APPEND_TIME:
                            raise ValueError(f"{tp.topic} does not use LogAppendTime")
                        newest = max(newest, record.timestamp / 1000.0)
                        pending.discard(tp)
    return newest
