"""A 100,000-record NDJSON body through the gateway into the real local Kafka, every record
accounted for: accepted + refused = sent, and the raw and dead-letter topics hold exactly those."""

from __future__ import annotations

from datetime import timedelta

import orjson
import pytest

from schemas.topics import EVENTS_RAW, dlq
from shared.settings import XietongSettings
from tests.ingest.test_gateway import (
    T0,
    event,
    ingest_settings,
    read_topic,
    running_gateway,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECORDS = 100_000
BAD_EVERY = 997  # a prime: refusals spread over the body


async def test_a_100k_record_body_is_accounted_for_record_by_record(
    settings: XietongSettings,
) -> None:
    gateway_settings = ingest_settings(settings, ingest_max_body_bytes=64 << 20)
    async for gateway in running_gateway(gateway_settings):
        lines: list[bytes] = []
        bad: set[int] = set()
        for index in range(RECORDS):
            # a second apart (event() would space them a minute apart: 69 days, past the clock)
            moment = T0 + timedelta(seconds=index)
            record = event(gateway.tenant, seq=index, occurred_at=moment.isoformat())
            if index % BAD_EVERY == 0:
                record["payload"]["quantity"] = -1 - index  # breaks the contract (ge=0)
                bad.add(index)
            lines.append(orjson.dumps(record))
        body = b"\n".join(lines)
        del lines

        status, answer = await gateway.post(body, "application/x-ndjson")

        assert status == 202, answer
        assert answer["accepted"] + answer["refused"] == RECORDS
        assert answer["refused"] == len(bad)
        assert {r["index"] for r in answer["refusals"]} == bad
        raw = await read_topic(gateway.settings, EVENTS_RAW, gateway.tenant)
        letters = await read_topic(gateway.settings, dlq(EVENTS_RAW), gateway.tenant)
        assert len(raw) == answer["accepted"]
        assert len({orjson.loads(r.value)["event_id"] for r in raw}) == answer["accepted"]
        assert len(letters) == answer["refused"]
        refused_ids = {orjson.loads(orjson.loads(r.value)["original"])["event_id"] for r in letters}
        assert len(refused_ids) == len(bad)
