"""A compacted view (rates, control, models) while its broker is away: stale, and quiet about it."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

from deploy.local import infra
from shared.rates import RatesReader, demo_rates, publish_rates
from shared.settings import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_a_view_whose_broker_went_away_goes_stale_in_one_line_each_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: every failed attempt to follow logged a full traceback (one every few seconds per
    # view, for the whole outage), and stopping the view then raised CancelledError (aiokafka's
    # own pending fetch, cancelled by its stop()); now one line each time, and a quiet stop.
    broker = infra.start_kafka(data_dir=tmp_path / "kafka")
    try:
        settings = load_settings(
            kafka_bootstrap_servers=broker.bootstrap_servers,
            kafka_partitions=1,
            control_sync_interval_seconds=0.2,
            control_max_staleness_seconds=1.0,
            kafka_request_timeout_ms=2000,
        )
        await publish_rates(settings, demo_rates(), "rates")
        async with RatesReader(settings, "rates") as reader:
            assert reader.problem() is None
            infra.stop(broker)
            caplog.set_level(logging.WARNING, logger="shared.compacted")
            deadline = time.monotonic() + 60
            while reader.problem() is None or not caplog.records:
                assert time.monotonic() < deadline, "the view never said it is stale"
                await asyncio.sleep(0.2)
            await asyncio.sleep(3)  # a few more attempts
    finally:
        infra.stop(broker)
    said = [r for r in caplog.records if r.name == "shared.compacted"]
    assert said
    assert [r for r in said if r.exc_info] == []
    assert all("cannot follow its topics" in r.getMessage() for r in said)
