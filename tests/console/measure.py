"""The console's speed, measured (reported, never asserted): ``python -m tests.console.measure``.

1. **First meaningful paint** of the partner view with a year of daily windows for 10 metrics
   (and the industry benchmark of each): from pressing "Sign in" to every chart drawn, in
   Debian's headless chromium against the real gateway process (``performance.now()`` stamps
   written by the page: ``data-signin-at`` and ``data-painted``).
2. **Memory under a live stream** of 50 insights/s: the page's JS heap after a forced garbage
   collection (``--js-flags=--expose-gc``) and its DOM node count, sampled every 10 s for
   ``CONSOLE_SOAK_SECONDS`` (600 by default; the test run uses a short one).

Kafka: ``XIETONG_TEST_KAFKA_BOOTSTRAP`` if set, else a fresh local broker for the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from selenium.webdriver.remote.webdriver import WebDriver

from schemas.insights import Insight, Prediction
from schemas.topics import INSIGHT_TOPICS
from shared.codec import encode
from shared.kafka import create_producer, started
from tests.conftest import kafka_for_tests
from tests.console.conftest import (
    ARTEFACTS,
    Platform,
    new_driver,
    register,
    sign_in,
    start_gateway,
    stop_gateway,
    wait,
)
from tests.insight_helpers import publish

METRICS = [f"kpi.metric_{n:02d}" for n in range(10)]
DAYS = 365


def year_of_data(tenant: str) -> list[Insight]:
    from tests.console.test_console import benchmarks, year_of_statistics

    found = year_of_statistics(tenant, METRICS, DAYS)
    for metric in METRICS:
        found += benchmarks(metric, DAYS)
    return found


def first_paint(platform: Platform, key: str) -> dict[str, Any]:
    browser = new_driver()
    try:
        sign_in(browser, platform, key)
        wait(browser, lambda b: b.execute_script("return document.body.dataset.painted"), 60)
        stamps = browser.execute_script(
            "const d = document.body.dataset; return [Number(d.signinAt), Number(d.painted),"
            " [...document.querySelectorAll('#stats figure')].map(f => Number(f.dataset.points))]"
        )
    finally:
        browser.quit()
    return {"first_paint_ms": round(stamps[1] - stamps[0], 1), "points_per_chart": stamps[2]}


def heap(browser: WebDriver) -> dict[str, float]:
    sample = browser.execute_script(
        "window.gc && window.gc(); return [performance.memory.usedJSHeapSize,"
        " document.getElementsByTagName('*').length, window.xietongConsole.received]"
    )
    return {"heap_mb": round(sample[0] / 2**20, 2), "dom_nodes": sample[1], "received": sample[2]}


async def stream_insights(platform: Platform, tenant: str, seconds: float, rate: int) -> int:
    """``rate`` insights a second for ``seconds``: new daily windows and predictions."""
    from tests.console.test_console import daily, one_statistic

    sent = 0
    async with started(create_producer(platform.settings)) as producer:
        start = time.monotonic()
        day = DAYS
        while time.monotonic() - start < seconds:
            batch: list[Insight] = []
            for n in range(rate):
                if n % 5 == 0:
                    batch.append(
                        Prediction(
                            tenant=tenant,
                            target="demand",
                            model_name="rf",
                            model_version=str(day),
                            value=float(n),
                            provenance=daily(day),
                        )
                    )
                else:
                    batch.append(one_statistic(tenant, METRICS[n % len(METRICS)], day))
                    if n % len(METRICS) == len(METRICS) - 1:
                        day += 1
            for insight in batch:
                topic = INSIGHT_TOPICS[insight.type]
                await producer.send(topic, encode(insight), key=tenant.encode())
            sent += len(batch)
            await asyncio.sleep(max(0.0, start + sent / rate - time.monotonic()))
    return sent


def soak(platform: Platform, key: str, tenant: str, seconds: float) -> dict[str, Any]:
    browser = new_driver()
    samples: list[dict[str, float]] = []
    try:
        sign_in(browser, platform, key)
        wait(browser, lambda b: b.find_element("id", "live").text == "live", 60)
        samples.append(heap(browser))

        async def run() -> int:
            streaming = asyncio.create_task(stream_insights(platform, tenant, seconds, 50))
            while not streaming.done():
                await asyncio.sleep(10)
                samples.append(await asyncio.to_thread(heap, browser))
            return await streaming

        sent = asyncio.run(run())
        time.sleep(2)
        samples.append(heap(browser))
    finally:
        browser.quit()
    return {"seconds": seconds, "rate_per_s": 50, "sent": sent, "samples": samples}


def measure(bootstrap: str, state_dir: Path, soak_seconds: float) -> dict[str, Any]:
    process, platform = start_gateway(
        bootstrap, state_dir, XIETONG_INGEST_INSIGHTS_PER_SERIES=str(DAYS + 1)
    )
    try:
        firms = register(platform)
        asyncio.run(publish(platform.settings, year_of_data(firms.a)))
        deadline = time.monotonic() + 120
        path = f"/v1/insights?type=statistics&owner={firms.a}&metric={METRICS[-1]}&limit=1000"
        while platform.get_json(path, firms.keys[firms.a])["count"] < DAYS:
            assert time.monotonic() < deadline, "the gateway never held the year of data"
            time.sleep(0.5)
        report = {"year_of_10_metrics": first_paint(platform, firms.keys[firms.a])}
        report["live_stream"] = soak(platform, firms.keys[firms.a], firms.a, soak_seconds)
    finally:
        stop_gateway(process)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    (ARTEFACTS / "measure.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    seconds = float(os.environ.get("CONSOLE_SOAK_SECONDS", "600"))
    with kafka_for_tests() as bootstrap, tempfile.TemporaryDirectory() as state:
        report = measure(bootstrap, Path(state), seconds)
    paint = report["year_of_10_metrics"]
    live = report["live_stream"]
    first, last = live["samples"][0], live["samples"][-1]
    print(f"first meaningful paint, 10 metrics x {DAYS} days: {paint['first_paint_ms']} ms")
    print(
        f"live stream, {live['rate_per_s']}/s for {live['seconds']:.0f} s ({live['sent']} sent, "
        f"{last['received']} received): heap {first['heap_mb']} -> {last['heap_mb']} MB, "
        f"DOM nodes {first['dom_nodes']} -> {last['dom_nodes']}"
    )
    print(f"samples in {ARTEFACTS / 'measure.json'}")


if __name__ == "__main__":
    main()
