"""``python -m services.analytics`` as an operator runs it: health, metrics, SIGTERM drains."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest

from deploy.local.infra import free_port
from shared.kafka import ensure_topics
from shared.settings import XietongSettings
from tests.analytics.test_app import HOUR, W0, firm_events, publish, ticks
from tests.processes import wait_until_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def sample(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_the_service_runs_reports_health_and_metrics_and_stops_on_sigterm(
    settings: XietongSettings, unique_name: Callable[[str], str], tmp_path: Path
) -> None:
    source = unique_name("clean")
    await ensure_topics(settings, [source], partitions=3)
    port = free_port()
    env = {
        **os.environ,
        "XIETONG_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "XIETONG_ANALYTICS_HTTP_PORT": str(port),
        "XIETONG_ANALYTICS_SOURCE_TOPIC": source,
        "XIETONG_ANALYTICS_GROUP_ID": unique_name("analytics"),
        "XIETONG_ANALYTICS_NETWORK_GROUP_ID": unique_name("analytics-network"),
        "XIETONG_ANALYTICS_FIRM_WINDOWS_TOPIC": unique_name("analytics.firm-windows"),
        "XIETONG_LOG_FORMAT": "text",
        "XIETONG_NETWORK_SECRET": settings.network_key().decode(),
    }
    log = (tmp_path / "analytics.log").open("wb")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.analytics", cwd=ROOT, env=env, stderr=log
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_ready(session, url, process)

            tenant = f"main-{uuid.uuid4().hex[:8]}"
            sent = firm_events(tenant, random.Random(1), 10.0, 5.0, 100.0)
            sent += ticks([tenant], W0 + 2 * HOUR + timedelta(minutes=10))
            await publish(settings, source, sent)
            async with asyncio.timeout(60):  # counted once the batch went through
                while True:
                    async with session.get(f"{url}/metrics") as response:
                        text = await response.text()
                    if sample(text, "xietong_analytics_events_total") >= len(sent):
                        break
                    await asyncio.sleep(0.2)
            assert sample(text, "xietong_analytics_events_total") == len(sent)
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
