"""``make demo``: the whole network on this machine, with simulated partner firms.

Starts every service that exists in ``services/`` (``python -m services.<name>``, logs in
``.run/logs/``; ``--run-dir`` or ``XIETONG_RUN_DIR`` names another run folder), registers the
simulated firms as tenants with API keys, lets them publish through the ingest gateway (or
straight into Kafka through the same intake when there is no gateway), and shows what flows
through the real broker — per topic counts and rates, refusals, the latest insights — until
Ctrl-C (or ``--duration`` seconds).

With ``--up`` (``make demo``) it also starts Kafka and SeaweedFS if they are not running, and
stops on exit what it started (their data stays in the run folder). The firms' event time
continues where the last run stopped (``demo-clock.json``), so a second run's events never fall
behind windows the first one closed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, deque
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from deploy.local import infra
from deploy.local.infra import ROOT, run_dir
from deploy.local.simulate import (
    Firm,
    event_moment,
    firm_events,
    load_clock,
    make_firms,
    resume_start,
    save_clock,
    supply_history,
    with_supply,
)
from schemas.control import Tenant
from schemas.topics import COMPACTED_TOPICS, EVENTS_RAW, TOPICS
from shared.codec import decode, encode
from shared.control import ControlRegistry, ControlWriter, issue_api_key
from shared.kafka import BatchPublisher, create_consumer, create_producer, ensure_topics, started
from shared.rates import demo_rates, publish_rates
from shared.settings import XietongSettings, load_settings

# With --health-port-base: the health/metrics port of each worker service as an offset from it.
# Without, each service's own setting (XIETONG_<NAME>_HTTP_PORT) applies.
HEALTH_PORT_OFFSETS = {"clean": 0, "analytics": 1, "ml": 2, "nlp": 3, "storage": 4}
INGEST_METRICS_OFFSET = 9


DEMO_MAX_AHEAD_SECONDS = 10 * 366 * 86400
"""The simulated firms run event time hundreds of times faster than the clock (so windows close
while one watches), soon ahead of it: the demo's services accept events that far ahead."""


def existing_services() -> list[str]:
    return sorted(p.parent.name for p in (ROOT / "services").glob("*/__main__.py"))


READY_FIRST = ("clean", "analytics")
READY_TIMEOUT = 180.0
"""The demo's clock (``--duration``) starts once these services are ready (or this many seconds
have passed)."""


def configured_port(name: str, setting: str | None = None) -> int:
    """A port as the service's own settings class reads it from the environment
    (``XIETONG_<NAME>_HTTP_PORT`` unless ``setting`` names another field)."""
    module = importlib.import_module(f"services.{name}.settings")
    (settings_class,) = (
        value
        for key, value in vars(module).items()
        if key.endswith("Settings")
        and isinstance(value, type)
        and value.__module__ == module.__name__
    )
    return int(getattr(settings_class(), setting or f"{name}_http_port"))


def service_port(name: str, gateway_port: int, health_port_base: int | None) -> int:
    if name == "ingest":
        return gateway_port
    if health_port_base is None:
        return configured_port(name)
    return health_port_base + HEALTH_PORT_OFFSETS.get(name, len(HEALTH_PORT_OFFSETS))


def metrics_port(health_port_base: int | None) -> int:
    """The gateway's operator port (Prometheus)."""
    if health_port_base is None:
        return configured_port("ingest", "ingest_metrics_port")
    return health_port_base + INGEST_METRICS_OFFSET


def service_ports(
    names: list[str], *, gateway_port: int, health_port_base: int | None
) -> dict[int, str]:
    """Every HTTP port the demo's services open (port -> what it is), checked before starting."""
    ports = {service_port(n, gateway_port, health_port_base): f"{n} HTTP" for n in names}
    if "ingest" in names:
        ports[metrics_port(health_port_base)] = "ingest metrics"
    return ports


def start_services(
    names: list[str], gateway_port: int, health_port_base: int | None
) -> dict[str, subprocess.Popen[bytes]]:
    logs = run_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    processes = {}
    scrape = {
        n: f"http://127.0.0.1:{service_port(n, gateway_port, health_port_base)}"
        for n in names
        if n != "ingest"
    }
    scrape["ingest"] = f"http://127.0.0.1:{metrics_port(health_port_base)}"
    for name in names:
        port = service_port(name, gateway_port, health_port_base)
        env = {
            **os.environ,
            f"XIETONG_{name.upper()}_HTTP_PORT": str(port),
            "XIETONG_STATE_DIR": str(run_dir() / "state"),
            "XIETONG_EVENT_TIME_MAX_AHEAD_SECONDS": str(DEMO_MAX_AHEAD_SECONDS),
            # the gateway's Prometheus metrics: its operator port, 8090 by default
            "XIETONG_INGEST_METRICS_PORT": str(metrics_port(health_port_base)),
            # storage: the simulated firms' data may go to the public cloud (personal data never
            # does); segments flush every 10 s so the catalog fills while one watches
            "XIETONG_STORAGE_DEFAULT_RESIDENCY": "any",
            "XIETONG_STORAGE_SEGMENT_MAX_SECONDS": "10",
            "XIETONG_STORAGE_LATE_MAX_SECONDS": "60",
            # the console's operator view reads every service's readiness and Prometheus page
            "XIETONG_OPERATOR_SCRAPE": json.dumps(scrape),
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
    keys_file = run_dir() / "demo-keys.json"
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
    await publish_rates(settings, demo_rates())  # the initial rates clean converts with
    keys_file.write_text(json.dumps(known, indent=2))
    keys_file.chmod(0o600)
    return known


async def prepare_models(settings: XietongSettings, firms: list[Firm]) -> None:
    """For the ml service: every firm lets the network train models on its data (a grant of
    ``model_training`` to ``network``), and, once per run folder, 120 days of purchase orders
    and deliveries are back-filled so there are labelled orders to learn lateness from."""
    from schemas.control import Grant
    from schemas.insights import NETWORK_TENANT
    from shared.control import new_id

    marker = run_dir() / "demo-supply-history"
    async with ControlWriter(settings) as writer, ControlRegistry(settings) as registry:
        consenting = {
            g.owner
            for g in registry.grants.values()
            if g.grantee == NETWORK_TENANT and "model_training" in g.insight_types
        }
        for firm in firms:
            if firm.tenant not in consenting:
                await writer.put_grant(
                    Grant(
                        grant_id=new_id(),
                        owner=firm.tenant,
                        grantee=NETWORK_TENANT,
                        insight_types=["model_training"],
                        purpose="demo: the network's supplier-delay and demand models",
                        created_at=datetime.now(UTC),
                    )
                )
    if marker.exists():
        return
    end = datetime.now(UTC) - timedelta(hours=6)  # where the live streams start the first time
    history = [e for f in firms for e in supply_history(f, end=end)]
    async with started(create_producer(settings)) as producer:
        from services.ingest.intake import Incoming, publish_intake, validate_records

        publisher = BatchPublisher(producer)
        by_tenant: dict[str, list[dict[str, Any]]] = {}
        for event in history:
            by_tenant.setdefault(event["tenant"], []).append(event)
        for tenant, events in by_tenant.items():
            intake = validate_records(
                [Incoming(i, encode(e), e) for i, e in enumerate(events)],
                tenant,
                source_system="demo",
                bounds=settings.event_time_bounds(),
            )
            await publish_intake(publisher, intake, tenant, source_ref="demo-history")
    marker.write_text(f"{len(history)} supply events back-filled\n")


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
    """Every second, each firm sends its share of ``rate`` events (a few deliberately bad).

    Each firm's event time starts where its last run stopped (or 6 h ago the first time, some
    history so windows close during the demo) and where it stands is kept after every second.
    """
    clock_file = run_dir() / "demo-clock.json"
    clock = load_clock(clock_file)
    fresh = datetime.now(UTC) - timedelta(hours=6)
    streams = {
        f.tenant: with_supply(
            firm_events(
                f,
                start=resume_start(clock, f.tenant, fresh),
                step=timedelta(seconds=20),
                bad_rate=0.02,
            ),
            f,
            start=resume_start(clock, f.tenant, fresh),
        )
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
                clock[firm.tenant] = event_moment(batch[-1])
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
            save_clock(clock_file, clock)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, 1.0 - (time.monotonic() - tick)))


def dead_letter_reasons(value: dict[str, Any]) -> list[str]:
    """What the dead-letter panel counts for one dead letter: each field with its reason
    (``payload.quantity: Input should be a valid number``), or the summary if it names none."""
    errors = value.get("errors") or []
    found = [f"{e.get('field') or '(record)'}: {e.get('reason', '?')}" for e in errors]
    return found or [str(value.get("reason", "?"))]


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
    if kind == "prediction":
        shown = (
            f"p(late)={value['probability']:.2f}"
            if value.get("probability") is not None
            else f"value={value.get('value') or 0:,.1f}"
        )
        return f"{value['tenant']:<14} {value['model_name']} v{value['model_version']} {shown}"
    if kind == "text_insight":
        shown = f"{value.get('task')}={value.get('label')}" if value.get("label") else "terms"
        redacted = f" redacted {len(value['entities'])}" if value.get("entities") else ""
        terms = " ".join(value.get("key_terms", [])[:3])
        return f"{value['tenant']:<14} {value['language']} {shown} [{terms}]{redacted}"
    if kind == "text_summary":
        mix = " ".join(f"{c}:{n}" for m in value["class_mix"].values() for c, n in m.items())
        terms = " ".join(t["term"] for t in value["top_terms"][:3])
        return f"{value['tenant']:<14} {value['documents']} texts [{terms}] {mix}"
    return f"{value.get('tenant', '?'):<14} {kind}"


async def watch(
    settings: XietongSettings,
    stop: asyncio.Event,
    stats: Counter[str],
    services: list[str],
    console: str = "",
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
                        reasons.update(dead_letter_reasons(decode(record.value)))
            if time.monotonic() - last_draw >= 2:
                last_draw = time.monotonic()
                elapsed = max(1e-9, last_draw - began)
                lines = [
                    f"Xietong demo — services: {', '.join(services) or 'none'} — "
                    f"{elapsed:,.0f} s — Ctrl-C stops",
                    *([console] if console else []),
                    f"published: accepted {stats['accepted']:,}  refused {stats['refused']:,}",
                    "",
                    f"{'topic':<28}{'records':>10}{'per s':>10}",
                ]
                lines += [f"{t:<28}{counts[t]:>10,}{counts[t] / elapsed:>10,.0f}" for t in topics]
                if reasons:
                    lines += ["", "dead-letter reasons (field: reason):"]
                    lines += [f"  {n:>6,}  {r[:90]}" for r, n in reasons.most_common(5)]
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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settings = load_settings(event_time_max_ahead_seconds=DEMO_MAX_AHEAD_SECONDS)
    run_dir().mkdir(parents=True, exist_ok=True)  # a fresh clone has no .run/ yet
    await ensure_topics(settings, [spec.name for spec in TOPICS], compacted=COMPACTED_TOPICS)
    firms = make_firms(args.firms)
    keys = await register_firms(settings, firms)
    await prepare_models(settings, firms)
    if stop.is_set():
        return
    services = existing_services()
    processes = start_services(services, args.gateway_port, args.health_port_base)
    stats: Counter[str] = Counter()
    console = ""
    try:
        gateway = None
        if "ingest" in services:
            gateway = f"http://127.0.0.1:{args.gateway_port}"
            if not await wait_http(f"{gateway}/healthz"):
                raise SystemExit(
                    f"the gateway did not start; see {run_dir() / 'logs' / 'ingest.log'}"
                )
            console = (
                f"web console: {gateway}/console/ (partner keys in {run_dir() / 'demo-keys.json'},"
                f" operator token in {run_dir() / 'operator-token'})"
            )
            print(console, flush=True)
        # clean and analytics first restore their state (from the clean topic when the run
        # folder's stores are new or stale): what is published before that only waits
        for name in READY_FIRST:
            if name in services and not stop.is_set():
                print(f"waiting for {name} to restore its state ...", flush=True)
                port = service_port(name, args.gateway_port, args.health_port_base)
                await wait_http(f"http://127.0.0.1:{port}/readyz", timeout=READY_TIMEOUT)
        if args.duration:
            loop.call_later(args.duration, stop.set)
        await asyncio.gather(
            publish_loop(settings, firms, keys, gateway, args.rate, stop, stats),
            watch(settings, stop, stats, services, console),
        )
    finally:
        stop_services(processes)
    print(
        f"\ndemo stopped: {stats['accepted']:,} events accepted, {stats['refused']:,} refused; "
        f"raw topic {EVENTS_RAW}; logs in {run_dir() / 'logs'}"
    )


def start_infrastructure(args: argparse.Namespace) -> list[str]:
    """``--up``: Kafka and SeaweedFS as ``make up`` starts them, every port (the services' too)
    checked first; the environment of ``local.env`` for this process and its services. Returns
    what was started now."""
    ports = service_ports(
        existing_services(), gateway_port=args.gateway_port, health_port_base=args.health_port_base
    )
    started = infra.up(infra.LocalPorts.from_env(), also_free=ports)
    os.environ.update(infra.read_env_file())
    return started


def stop_infrastructure(started: list[str]) -> None:
    """Stop what the demo started; say what keeps running and how to stop it."""
    left = sorted(set(infra.running()) - set(started))
    if started:
        # a second Ctrl-C must not leave a broker half stopped
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"stopping {', '.join(started)} (the demo started them; data kept in {run_dir()})")
        infra.down(started)
    if left:
        print(
            f"still running: {', '.join(left)} (started before the demo) - `make down` stops them"
        )
    print("`make demo` continues where this run stopped; `make clean` wipes all data")


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
    parser.add_argument(
        "--gateway-port",
        type=int,
        default=None,
        help="the gateway's port (default: XIETONG_INGEST_HTTP_PORT, 8080)",
    )
    parser.add_argument(
        "--health-port-base",
        type=int,
        default=None,
        help="health/metrics port of the first worker service (clean), the others following "
        "(default: each service's XIETONG_<NAME>_HTTP_PORT, XIETONG_INGEST_METRICS_PORT)",
    )
    parser.add_argument(
        "--duration", type=float, default=0, help="stop after this many seconds (0: Ctrl-C)"
    )
    parser.add_argument(
        "--up",
        action="store_true",
        help="start Kafka and SeaweedFS if they do not run (and stop them on exit)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="logs, state, keys and the firms' clock (default: XIETONG_RUN_DIR or .run/)",
    )
    args = parser.parse_args(argv)
    if args.run_dir:
        os.environ["XIETONG_RUN_DIR"] = str(args.run_dir.resolve())
    if args.gateway_port is None:
        args.gateway_port = configured_port("ingest")
    before = set(infra.running()) if args.up else set()
    try:
        if args.up:
            start_infrastructure(args)
        else:
            infra.require_free(
                service_ports(
                    existing_services(),
                    gateway_port=args.gateway_port,
                    health_port_base=args.health_port_base,
                )
            )
        asyncio.run(run(args))
    except (infra.PortsBusy, infra.AlreadyRunning) as error:
        raise SystemExit(f"demo: {error}") from None
    except KeyboardInterrupt:
        pass  # Ctrl-C while Kafka or SeaweedFS started: stop what did
    finally:
        if args.up:  # what runs now and did not before: the demo started it
            stop_infrastructure(sorted(set(infra.running()) - before))


if __name__ == "__main__":
    main()
