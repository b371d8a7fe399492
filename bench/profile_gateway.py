"""Where the ingest gateway's time goes: ``python -m bench.profile_gateway [--events N]``.

Runs the gateway in this process (``services.ingest.app.create_app``) on a fresh local broker,
posts the R4 load (NDJSON, 50 events of one tenant per request — ``--per-request`` to change it —
8 connections) after a warm-up,
and prints a pyinstrument profile of that load. The load generator runs in the same process and
shows up as its own branch (``bench/loadgen.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

from aiohttp import web
from pyinstrument import Profiler

from bench.loadgen import post_all
from bench.pipeline import build_requests, create_platform_topics, register_tenants
from bench.workload import make_events
from deploy.local import infra


async def profile(
    bootstrap: str, events: int, per_request: int = 50, show_all: bool = False
) -> str:
    from services.ingest.app import create_app
    from services.ingest.settings import load_ingest_settings

    settings = load_ingest_settings(
        kafka_bootstrap_servers=bootstrap, kafka_partitions=3, log_level="WARNING"
    )
    await create_platform_topics(settings)
    keys = await register_tenants(settings)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    port = infra.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}/v1/events"
    try:
        await post_all(url, build_requests(make_events(3000), keys, per_request), connections=8)
        requests = build_requests(make_events(events), keys, per_request)
        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
        result = await post_all(url, requests, connections=8)
        profiler.stop()
    finally:
        await runner.cleanup()
    header = f"{result.rate:,.0f} records/s in process, {len(result.refused)} requests refused\n"
    return header + profiler.output_text(unicode=False, color=False, show_all=show_all)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_gateway", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--per-request", type=int, default=50, help="events per request")
    parser.add_argument("--all", action="store_true", help="show library frames too")
    args = parser.parse_args(argv)
    data_dir = Path(tempfile.mkdtemp(prefix="xietong-bench-kafka-"))
    kafka = infra.start_kafka(data_dir=data_dir)
    try:
        print(
            asyncio.run(profile(kafka.bootstrap_servers, args.events, args.per_request, args.all))
        )
    finally:
        infra.stop(kafka)
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
