"""``make demo``: the whole network on this machine, with simulated partner firms.

Starts every service that exists in ``services/`` (``python -m services.<name>``, logs in
``.run/logs/``), registers the simulated firms as tenants with API keys, lets them publish through
the ingest gateway (or straight into Kafka through the same intake when there is no gateway), and
shows what flows through the real broker — per topic counts and rates, refusals, the latest
insights — until Ctrl-C (or ``--duration`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from deploy.local.infra import ROOT, RUN_DIR
from deploy.local.simulate import Firm, firm_events, make_firms
from schemas.control import Tenant
from schemas.topics import COMPACTED_TOPICS, EVENTS_RAW, TOPICS
from shared.codec import decode, encode
from shared.control import ControlRegistry, ControlWriter, issue_api_key
from shared.kafka import BatchPublisher, create_consumer, create_producer, ensure_topics, started
from shared.settings import XietongSettings, load_settings

# Health/metrics port of each worker service, as an offset from --health-port-base (8081).
HEALTH_PORT_OFFSETS = {"clean": 0, "analytics": 1, "ml": 2, "nlp": 3, "storage": 4}
INGEST_METRICS_OFFSET = 9


DEMO_MAX_AHEAD_SECONDS = 10 * 366 * 86400
"""The simulated firms run event time hundreds of times faster than the clock (so windows close
while one watches), soon ahead of it: the demo's services accept events that far ahead."""


def existing_services() -> list[str]:
    return sorted(p.parent.name for p in (ROOT / "services").glob("*/__main__.py"))


def start_services(
    names: list[str], gateway_port: int, health_port_base: int
) -> dict[str, subprocess.Popen[bytes]]:
    logs = RUN_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    processes = {}
    for name in names:
        offset = HEALTH_PORT_OFFSETS.get(name, len(HEALTH_PORT_OFFSETS))
        port = gateway_port if name == "ingest" else health_port_base + offset
        env = {
            **os.environ,
            f"XIETONG_{name.upper()}_HTTP_PORT": str(port),
            "XIETONG_STATE_DIR": str(RUN_DIR / "state"),
            "XIETONG_EVENT_TIME_MAX_AHEAD_SECONDS": str(DEMO_MAX_AHEAD_SECONDS),
            # the gateway's Prometheus metrics: its operator port, 8090 by default
            "XIETONG_INGEST_METRICS_PORT": str(health_port_base + INGEST_METRICS_OFFSET),
            # storage: the simulated firms' data may go to the public cloud (personal data never
            # does); segments flush every 10 s so the catalog fills while one watches
            "XIETONG_STORAGE_DEFAULT_RESIDENCY": "any",
            "XIETONG_STORAGE_SEGMENT_MAX_SECONDS": "10",
            "XIETONG_STORAGE_LATE_MAX_SECONDS": "60",
        }
        log = (logs / f"{name}.log").open("ab")
        processes[name] = subprocess.Popen(
            [sys.executable, "-m", f"services.{name}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    return processes


def stop_services(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    for process in processes.values():
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    for name, process in processes.items():
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            print(f"{name} did not stop in 20 s; killing it")
            process.kill()


async def register_firms(settings: XietongSettings, firms: list[Firm]) -> dict[str, str]:
    """Tenants and one API key per firm (plaintext keys kept in .run/demo-keys.json, mode 600)."""
    keys_file = RUN_DIR / "demo-keys.json"
    known: dict[str, str] = json.loads(keys_file.read_text()) if keys_file.exists() else {}
    async with ControlWriter(settings) as writer, ControlRegistry(settings) as registry:
        for firm in firms:
            await writer.put_tenant(
                Tenant(
                    tenant=firm.tenant,
                    name=firm.name,
                    industry=firm.industry,
                    region=firm.region,
                    created_at=datetime.now(UTC),
                )
            )
            if firm.tenant not in known or registry.authenticate(known[firm.tenant]) is None:
                plaintext, record = issue_api_key(firm.tenant, label="demo")
                await writer.put_key(record)
                known[firm.tenant] = plaintext
    keys_file.write_text(json.dumps(known, indent=2))
    keys_file.chmod(0o600)
    return known


async def wait_http(url: str, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return True
            await asyncio.sleep(0.5)
    return False


async def publish_loop(
    settings: XietongSettings,
    firms: list[Firm],
    keys: dict[str, str],
    gateway: str | None,
    rate: float,
    stop: asyncio.Event,
    stats: Counter[str],
) -> None:
    """Every second, each firm sends its share of ``rate`` events (a few deliberately bad)."""
    start = datetime.now(UTC) - timedelta(hours=6)  # some history, so windows close during the demo
    streams = {
        f.tenant: firm_events(f, start=start, step=timedelta(seconds=20), bad_rate=0.02)
        for f in firms
    }
    per_firm = max(1, int(rate / len(firms)))
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession()) if gateway else None
        publisher = None
        if session is None:
            from services.ingest.intake import Incoming, publish_intake, validate_records

            producer = await stack.enter_async_context(started(create_producer(settings)))
            publisher = BatchPublisher(producer)
        while not stop.is_set():
            tick = time.monotonic()
            for firm in firms:
                batch = list(itertools.islice(streams[firm.tenant], per_firm))
                if session is not None:
                    body = b"\n".join(encode(e) for e in batch)
                    async with session.post(
                        f"{gateway}/v1/events",
                        data=body,
                        headers={
                            "Content-Type": "application/x-ndjson",
                            "Authorization": f"Bearer {keys[firm.tenant]}",
                        },
                    ) as response:
                        answer = await response.json()
                        stats["http " + str(response.status)] += 1
                        stats["accepted"] += int(answer.get("accepted", 0))
                        stats["refused"] += int(answer.get("refused", 0))
                else:
                    assert publisher is not None
                    intake = validate_records(
                        [Incoming(i, encode(e), e) for i, e in enumerate(batch)],
                        firm.tenant,
                        source_system="demo",
                        bounds=settings.event_time_bounds(),
                    )
                    await publish_intake(publisher, intake, firm.tenant, source_ref="demo")
                    stats["accepted"] += len(intake.accepted)
                    stats["refused"] += len(intake.refused)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, 1.0 - (time.monotonic() - tick)))


def describe_insight(value: dict[str, Any]) -> str:
    kind = value.get("type", "?")
    if kind == "statistics":
        mean = value.get("mean") or 0
        return f"{value['tenant']:<14} {value['metric']:<24} n={value['count']:<5} mean={mean:,.2f}"
    if kind == "benchmark":
        return (
            f"{value['industry']}/{value['region']} {value['metric']:<22} firms={value['firms']} "
            f"p50={value['quantiles'].get('p50', 0):,.2f}"
        )
    if kind == "cluster_assignment":
        return f"{value['tenant']:<14} cluster {value['cluster']} of k={value['k']}"
    if kind == "correlation":
        return f"{value['tenant']:<14} corr over {len(value['metrics'])} metrics"
    return f"{value.get('tenant', '?'):<14} {kind}"


async def watch(
    settings: XietongSettings, stop: asyncio.Event, stats: Counter[str], services: list[str]
) -> None:
    """Tail every topic from now on and redraw a summary every two seconds."""
    topics = [spec.name for spec in TOPICS if spec.name not in COMPACTED_TOPICS]
    counts: Counter[str] = Counter()
    latest: deque[str] = deque(maxlen=8)
    reasons: Counter[str] = Counter()
    began = time.monotonic()
    catalog: list[str] = []
    last_catalog = 0.0
    async with started(
        create_consumer(settings, None, *topics, auto_offset_reset="latest")
    ) as consumer:
        last_draw = 0.0
        while not stop.is_set():
            for tp, records in (await consumer.getmany(timeout_ms=500, max_records=5000)).items():
                counts[tp.topic] += len(records)
                for record in records:
                    if tp.topic.startswith("insights."):
                        latest.append(
                            f"{tp.topic.split('.')[1]:<12} {describe_insight(decode(record.value))}"
                        )
                    elif tp.topic.endswith(".dlq"):
                        reasons[decode(record.value).get("reason", "?")] += 1
            if time.monotonic() - last_draw >= 2:
                last_draw = time.monotonic()
                elapsed = max(1e-9, last_draw - began)
                lines = [
                    f"Xietong demo — services: {', '.join(services) or 'none'} — "
                    f"{elapsed:,.0f} s — Ctrl-C stops",
                    f"published: accepted {stats['accepted']:,}  refused {stats['refused']:,}",
                    "",
                    f"{'topic':<28}{'records':>10}{'per s':>10}",
                ]
                lines += [f"{t:<28}{counts[t]:>10,}{counts[t] / elapsed:>10,.0f}" for t in topics]
                if reasons:
                    lines += [
                        "",
                        "dead-letter reasons: "
                        + ", ".join(f"{r} ({n})" for r, n in reasons.most_common(3)),
                    ]
                lines += ["", "latest insights:"] + [f"  {line}" for line in latest]
                if "storage" in services and last_draw - last_catalog >= 10:
                    last_catalog = last_draw
                    from xietong.storage import catalog_summary

                    with contextlib.suppress(Exception):  # the stores may still be starting
                        catalog = await catalog_summary()
                if catalog:
                    lines += ["", "archive catalog (store, placement rule):", *catalog]
                print("\033[2J\033[H" + "\n".join(lines), flush=True)


async def run(args: argparse.Namespace) -> None:
    settings = load_settings(event_time_max_ahead_seconds=DEMO_MAX_AHEAD_SECONDS)
    RUN_DIR.mkdir(parents=True, exist_ok=True)  # a fresh clone has no .run/ yet
    await ensure_topics(settings, [spec.name for spec in TOPICS], compacted=COMPACTED_TOPICS)
    firms = make_firms(args.firms)
    keys = await register_firms(settings, firms)
    services = existing_services()
    processes = start_services(services, args.gateway_port, args.health_port_base)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if args.duration:
        loop.call_later(args.duration, stop.set)
    stats: Counter[str] = Counter()
    try:
        gateway = None
        if "ingest" in services:
            gateway = f"http://127.0.0.1:{args.gateway_port}"
            if not await wait_http(f"{gateway}/healthz"):
                raise SystemExit(
                    f"the gateway did not start; see {RUN_DIR / 'logs' / 'ingest.log'}"
                )
        await asyncio.gather(
            publish_loop(settings, firms, keys, gateway, args.rate, stop, stats),
            watch(settings, stop, stats, services),
        )
    finally:
        stop_services(processes)
    print(
        f"\ndemo stopped: {stats['accepted']:,} events accepted, {stats['refused']:,} refused; "
        f"raw topic {EVENTS_RAW}; logs in {RUN_DIR / 'logs'}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.demo", description=__doc__)
    parser.add_argument(
        "--firms",
        type=int,
        default=15,
        help="simulated partner firms (5+ per industry for benchmarks)",
    )
    parser.add_argument(
        "--rate", type=float, default=400, help="events per second, all firms together"
    )
    parser.add_argument("--gateway-port", type=int, default=8080)
    parser.add_argument(
        "--health-port-base",
        type=int,
        default=8081,
        help="health/metrics port of the first worker service (clean); the others follow",
    )
    parser.add_argument(
        "--duration", type=float, default=0, help="stop after this many seconds (0: Ctrl-C)"
    )
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
