"""Reading what a test's services wrote, from the real broker."""

from __future__ import annotations

import asyncio

from aiokafka import ConsumerRecord

from shared.kafka import create_consumer, started
from shared.settings import XietongSettings


async def read_records(
    settings: XietongSettings, topic: str, count: int, group: str | None = None
) -> list[ConsumerRecord[bytes, bytes]]:
    """Read ``count`` records of ``topic`` from the beginning (fails after 60 s)."""
    got: list[ConsumerRecord[bytes, bytes]] = []
    async with started(create_consumer(settings, group, topic)) as consumer:
        async with asyncio.timeout(60):
            while len(got) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    got.extend(records)
    return got
