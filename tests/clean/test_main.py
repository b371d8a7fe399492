"""``python -m services.clean`` as an operator runs it: health, metrics, SIGTERM drains."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from deploy.local.infra import free_port
from shared.codec import encode
from shared.kafka import BatchPublisher, OutRecord, create_producer, ensure_topics, started
from shared.settings import XietongSettings
from tests.factories import sales_event
from tests.kafka_helpers import read_records
from tests.processes import wait_until_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


async def test_the_service_runs_reports_health_and_metrics_and_stops_on_sigterm(
    settings: XietongSettings, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    raw, clean = unique_name("raw"), unique_name("clean")
    await ensure_topics(settings, [raw])
    port = free_port()
    env = {
        **os.environ,
        "XIETONG_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "XIETONG_CLEAN_HTTP_PORT": str(port),
        "XIETONG_CLEAN_SOURCE_TOPIC": raw,
        "XIETONG_CLEAN_TARGET_TOPIC": clean,
        "XIETONG_CLEAN_GROUP_ID": unique_name("clean-group"),
        "XIETONG_LOG_FORMAT": "text",
    }
    log = (tmp_path / "clean.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.clean", cwd=ROOT, env=env, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_ready(session, url, process)

            async def metrics() -> str:
                async with session.get(f"{url}/metrics") as response:
                    return await response.text()

            events = [sales_event(f"firm-{i % 5}", seq=i) for i in range(50)]
            async with started(create_producer(settings)) as producer:
                await BatchPublisher(producer).publish(
                    raw, [OutRecord(e["tenant"].encode(), encode(e)) for e in events]
                )
            assert len(await read_records(settings, clean, len(events))) == len(events)
            async with asyncio.timeout(30):  # counted once the batch is committed
                while True:
                    text = await metrics()
                    if "xietong_clean_records_out_total 50.0" in text:
                        break
                    await asyncio.sleep(0.1)
            assert "xietong_clean_records_in_total 50.0" in text
            assert "xietong_clean_batch_seconds_count" in text
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log.close()
        print((tmp_path / "clean.log").read_text()[-3000:])  # shown when the test fails
