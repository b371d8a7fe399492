"""R2, R4, R5 and peak memory: our services as processes against raw stand-ins.

Everything here runs as child processes (``python -m services.<name>`` and ``python -m
bench.raw``), configured through the environment as in production, so each has its own peak
RSS and the load generator in this process is the same for both sides.

- R4: ingest gateway records/s / a bare aiohttp handler answering 202 — same NDJSON requests
  (one tenant's events per request, its API key), same connections.
- R2: HTTP ingest -> ``events.raw.v1`` -> clean -> clean topic -> analytics, events/s
  from the first request until clean's consumer group has committed all of ``events.raw.v1``
  and analytics has read every clean event (its ``xietong_analytics_events_total`` counter:
  analytics deliberately commits only up to its oldest open window) / the same chain of raw
  stand-ins (bare gateway producing with aiokafka, then two :func:`bench.hops.baseline_hop`
  processes), done when both raw hops' groups have committed all of their input.
- R5: at half the pipeline's measured capacity (the same requests as R2, paced), latency from
  the HTTP request to the clean event's append time on the clean topic (two hops: ingest
  and clean; analytics emits window aggregates, not one record per event, so no per-event time
  exists past clean) / two times the latency of one raw hop, fed the same groups of events
  on the same schedule by a plain producer.
- Peak RSS of ingest, clean and analytics after the R2 and R5 load / their raw stand-ins.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import ours
from bench.loadgen import Request, post_all, post_paced
from bench.processes import Child, spawn, wait_for_port
from bench.results import Row, Side, paired
from bench.workload import TENANTS, create_topics, make_events, unique_topic
from deploy.local.infra import free_port
from shared.kafka import connection_config, started
from shared.settings import XietongSettings

if TYPE_CHECKING:
    from bench.harness import Options, Progress

SERVICES = ("ingest", "clean", "analytics")


@dataclass(frozen=True)
class Lanes:
    """Consumer groups and the clean topic of this run's services, so they share nothing with
    another copy of the services on the same broker (the test suite's, a demo's). The gateway
    always writes ``events.raw.v1``; clean reads it with its own group."""

    clean_group: str
    analytics_group: str
    clean_topic: str

    @classmethod
    def fresh(cls) -> Lanes:
        tag = uuid.uuid4().hex[:8]
        return cls(f"bench-clean-{tag}", f"bench-analytics-{tag}", unique_topic("clean-events"))


HOPS_TO_CLEAN = 2
LATENCY_CONNECTIONS = 64
"""Enough connections that a paced request never waits for a free one at half capacity."""


def _rows(options: Options) -> dict[str, Row]:
    n = options.events
    return {
        "R2": Row(
            "R2",
            "HTTP->ingest->clean->analytics / raw chain, same hops (events/s)",
            target=">= 0.5",
            events=n,
        ),
        "R4": Row(
            "R4",
            "ingest gateway / bare aiohttp 202, same load (records/s)",
            target=">= 0.5",
            events=n,
        ),
        "R4.naive": Row(
            "R4.naive",
            "ingest gateway / naive gateway that parses NDJSON and produces (records/s)",
            events=n,
        ),
        "R4.ceiling": Row(
            "R4.ceiling",
            "pass-through gateway (checks nothing, publishes acks=all) / bare aiohttp 202 "
            "(records/s)",
            events=n,
        ),
        "R5.p50": Row(
            "R5.p50",
            "HTTP->clean latency p50 at half capacity / 2 x raw hop (ms)",
            target="<= 3",
            events=n,
        ),
        "R5.p99": Row(
            "R5.p99",
            "HTTP->clean latency p99 at half capacity / 2 x raw hop (ms)",
            target="<= 3",
            events=n,
        ),
        "rss.ingest": Row("rss.ingest", "peak RSS under R2 load / bare gateway (MiB)", events=n),
        "rss.clean": Row("rss.clean", "peak RSS under R2 load / raw hop process (MiB)", events=n),
        "rss.analytics": Row(
            "rss.analytics", "peak RSS under R2 load / raw hop process (MiB)", events=n
        ),
    }


def _unavailable(rows: dict[str, Row], keys: Sequence[str], reason: str, status: str) -> None:
    for key in keys:
        if rows[key].status == "ok" and rows[key].numerator is None:
            rows[key].status, rows[key].reason = status, reason  # type: ignore[assignment]


async def pipeline_rows(settings: XietongSettings, options: Options, say: Progress) -> list[Row]:
    rows = _rows(options)
    missing = [name for name in SERVICES if not ours.service_exists(name)]
    workdir = Path(tempfile.mkdtemp(prefix="xietong-bench-services-"))
    try:
        if "ingest" in missing:
            _unavailable(rows, list(rows), "services.ingest does not exist yet", "not available")
            return list(rows.values())
        await create_platform_topics(settings)
        keys = await register_tenants(settings)
        try:
            await gateway_row(rows, settings, options, say, keys, workdir)
        except Exception as error:
            _unavailable(
                rows, ["R4", "R4.naive", "R4.ceiling"], f"{type(error).__name__}: {error}", "error"
            )
        if missing:
            reason = f"services.{', services.'.join(missing)} not there yet"
            _unavailable(rows, list(rows), reason, "not available")
            return list(rows.values())
        try:
            await chain_rows(rows, settings, options, say, keys, workdir)
        except Exception as error:
            _unavailable(rows, list(rows), f"{type(error).__name__}: {error}", "error")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return list(rows.values())


# --------------------------------------------------------------------------- set-up


async def create_platform_topics(settings: XietongSettings) -> None:
    """The platform's topics, created before any service does, with broker append times on the
    event topics (that is where R5 reads when a record was appended)."""
    from schemas.topics import COMPACTED_TOPICS, EVENTS_CLEAN, EVENTS_RAW, TOPICS

    admin = AIOKafkaAdminClient(**connection_config(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        new = []
        for spec in TOPICS:
            if spec.name in existing:
                continue
            configs = {}
            if spec.name in COMPACTED_TOPICS:
                configs["cleanup.policy"] = "compact"
            if spec.name in (EVENTS_RAW, EVENTS_CLEAN):
                configs["message.timestamp.type"] = "LogAppendTime"
            new.append(
                NewTopic(
                    spec.name,
                    settings.kafka_partitions,
                    settings.kafka_replication_factor,
                    topic_configs=configs,
                )
            )
        if new:
            await admin.create_topics(new)
    finally:
        await admin.close()


async def register_tenants(settings: XietongSettings) -> dict[str, str]:
    """Every bench tenant with an API key, on the control topics the gateway reads."""
    from schemas.control import Tenant
    from shared.control import ControlWriter, issue_api_key

    keys = {}
    async with ControlWriter(settings) as writer:
        for tenant in TENANTS:
            await writer.put_tenant(
                Tenant(
                    tenant=tenant,
                    name=tenant,
                    industry="fasteners",
                    region="east",
                    created_at=datetime.now(UTC),
                )
            )
            plaintext, record = issue_api_key(tenant, label="bench")
            await writer.put_key(record)
            keys[tenant] = plaintext
    return keys


def build_requests(
    events: Sequence[dict[str, Any]], keys: dict[str, str], per_request: int
) -> list[Request]:
    """NDJSON bodies of one tenant's events each, with that tenant's key."""
    by_tenant: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_tenant.setdefault(event["tenant"], []).append(event)
    chunks = {
        tenant: [batch[i : i + per_request] for i in range(0, len(batch), per_request)]
        for tenant, batch in by_tenant.items()
    }
    requests = []
    for round_robin in range(max(len(c) for c in chunks.values())):
        for tenant, tenant_chunks in chunks.items():
            if round_robin < len(tenant_chunks):
                chunk = tenant_chunks[round_robin]
                requests.append(
                    Request(
                        headers={
                            "Content-Type": "application/x-ndjson",
                            "Authorization": f"Bearer {keys[tenant]}",
                        },
                        body=b"\n".join(orjson.dumps(e) for e in chunk),
                        events=len(chunk),
                        event_ids=tuple(e["event_id"] for e in chunk),
                    )
                )
    return requests


def _env(settings: XietongSettings, workdir: Path, **extra: str) -> dict[str, str]:
    return {
        "XIETONG_KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "XIETONG_KAFKA_PARTITIONS": str(settings.kafka_partitions),
        "XIETONG_LOG_LEVEL": "WARNING",
        "XIETONG_LOG_FORMAT": "text",
        "XIETONG_STATE_DIR": str(workdir / "state"),
        # analytics keys insight ids and benchmark noise with it; a fresh one per run
        "XIETONG_NETWORK_SECRET": os.environ.get("XIETONG_NETWORK_SECRET")
        or secrets.token_urlsafe(32),
        **extra,
    }


def start_service(
    name: str, settings: XietongSettings, workdir: Path, **fields: str
) -> tuple[Child, int]:
    """``python -m services.<name>`` on a free port; ``fields`` are settings of the service
    (``clean_group_id=...``), passed as ``XIETONG_*`` variables where the service has them."""
    port = free_port()
    known = _settings_fields(name)
    overrides = {
        f"XIETONG_{field.upper()}": value for field, value in fields.items() if field in known
    }
    ports = {f"XIETONG_{name.upper()}_HTTP_PORT": str(port)}
    if name == "ingest":  # the gateway's operator port (metrics), free as well
        ports["XIETONG_INGEST_METRICS_PORT"] = str(free_port())
    env = _env(settings, workdir / name, **ports)
    return spawn(name, f"services.{name}", [], {**env, **overrides}, workdir / "logs"), port


def _settings_fields(service: str) -> set[str]:
    import importlib

    module = importlib.import_module(f"services.{service}.settings")
    settings_type = getattr(module, f"{service.capitalize()}Settings", None)
    return set(settings_type.model_fields) if settings_type is not None else set()


def start_raw(name: str, args: list[str], settings: XietongSettings, workdir: Path) -> Child:
    return spawn(name, "bench.raw", args, _env(settings, workdir / name), workdir / "logs")


@contextlib.contextmanager
def stopping(children: list[Child]) -> Iterator[list[Child]]:
    try:
        yield children
    finally:
        for child in children:
            child.stop()


def _check(result_refused: list[str], side: str) -> None:
    if result_refused:
        raise RuntimeError(
            f"{side}: {len(result_refused)} requests refused, e.g. {result_refused[0]}"
        )


# --------------------------------------------------------------------------- R4


async def gateway_row(
    rows: dict[str, Row],
    settings: XietongSettings,
    options: Options,
    say: Progress,
    keys: dict[str, str],
    workdir: Path,
) -> None:
    """R4, and for information the same gateway against a naive one that parses and produces,
    and what a gateway that checks nothing reaches against the bare handler (the ceiling)."""
    target, passed = unique_topic("naive-gateway"), unique_topic("passthrough-gateway")
    await create_topics(
        settings, [target, passed], partitions=options.partitions, append_time=False
    )
    ingest, ingest_port = start_service("ingest", settings, workdir)
    bare_port, naive_port, ceiling_port = free_port(), free_port(), free_port()
    bare = start_raw("bare-gateway", ["gateway", "--port", str(bare_port)], settings, workdir)
    naive = start_raw(
        "naive-gateway",
        ["gateway", "--port", str(naive_port), "--target", target],
        settings,
        workdir,
    )
    ceiling = start_raw(
        "passthrough-gateway",
        ["gateway", "--port", str(ceiling_port), "--target", passed, "--passthrough"],
        settings,
        workdir,
    )
    samples: dict[str, list[float]] = {"ingest": [], "bare": [], "naive": [], "ceiling": []}
    servers = {
        "ingest": (ingest, ingest_port),
        "bare": (bare, bare_port),
        "naive": (naive, naive_port),
        "ceiling": (ceiling, ceiling_port),
    }
    with stopping([child for child, _ in servers.values()]):
        for child, port in servers.values():
            await wait_for_port(child, port)
        urls = {side: f"http://127.0.0.1:{port}/v1/events" for side, (_, port) in servers.items()}
        # Rotating the sides is what bench.harness._rotate does; inlined to avoid a cycle.
        sides = list(urls)
        for round_no in range(options.warmup + options.repeats):
            requests = build_requests(make_events(options.events), keys, options.events_per_request)
            shift = round_no % len(sides)
            order = sides[shift:] + sides[:shift]
            rates = {}
            for side in order if round_no % 2 == 0 else order[::-1]:
                result = await post_all(urls[side], requests, connections=options.connections)
                _check(result.refused, side)
                rates[side] = result.rate
            say(
                f"gateway round {round_no}: ingest {rates['ingest']:,.0f} "
                f"bare {rates['bare']:,.0f} naive {rates['naive']:,.0f} "
                f"pass-through {rates['ceiling']:,.0f} records/s"
            )
            if round_no >= options.warmup:
                for side, rate in rates.items():
                    samples[side].append(rate)
    ours = Side("ingest gateway", "records/s", samples["ingest"])
    paired(rows["R4"], ours, Side("bare aiohttp 202", "records/s", samples["bare"]))
    paired(
        rows["R4.naive"],
        ours,
        Side("naive gateway: json + AIOKafkaProducer.send", "records/s", samples["naive"]),
    )
    rows["R4.naive"].status = "info"
    paired(
        rows["R4.ceiling"],
        Side("pass-through gateway: split lines + BatchPublisher", "records/s", samples["ceiling"]),
        Side("bare aiohttp 202", "records/s", samples["bare"]),
    )
    rows["R4.ceiling"].status = "info"


# --------------------------------------------------------------------------- R2, R5, RSS


async def _ends(consumer: AIOKafkaConsumer, topic: str) -> dict[TopicPartition, int]:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic) or set()
    return dict(await consumer.end_offsets([TopicPartition(topic, p) for p in partitions]))


async def wait_drained(
    settings: XietongSettings,
    stages: Sequence[tuple[str, str]],
    expected_in_first: int,
    children: Sequence[Child],
    timeout: float,
) -> float:
    """Wall time at which the first stage's input holds ``expected_in_first`` records and every
    ``(group, input topic)`` stage has committed all of its input."""
    admin = AIOKafkaAdminClient(**connection_config(settings))
    consumer = AIOKafkaConsumer(**connection_config(settings), enable_auto_commit=False)
    await admin.start()
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        waiting = ""
        while True:
            done = True
            for index, (group, topic) in enumerate(stages):
                ends = await _ends(consumer, topic)
                if index == 0 and sum(ends.values()) < expected_in_first:
                    done = False
                    waiting = f"{topic} holds {sum(ends.values())} of {expected_in_first}"
                    break
                committed = await admin.list_consumer_group_offsets(group)
                lag = sum(
                    end - (committed[tp].offset if tp in committed else 0)
                    for tp, end in ends.items()
                )
                if lag > 0:
                    done = False
                    waiting = f"group {group} is {lag} records behind on {topic}"
                    break
            if done:
                return time.time()
            for child in children:
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"not drained after {timeout:.0f}s: {waiting}")
            await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
        await admin.close()


ANALYTICS_EVENTS = "xietong_analytics_events_total"
"""Analytics' own counter of clean events read: its commits lag on purpose (it commits the start
of its oldest open window), so "consumed everything" is read from its metrics instead."""


async def metric_value(url: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def wait_pipeline(
    settings: XietongSettings,
    lanes: Lanes,
    raw_target: int,
    clean_base: int,
    analytics_metrics: str,
    analytics_base: float,
    children: Sequence[Child],
    timeout: float,
) -> float:
    """Wall time at which clean has committed all of ``events.raw.v1`` (``raw_target`` records)
    and analytics has read every clean event clean produced since ``clean_base``."""
    from schemas.topics import EVENTS_RAW

    deadline = time.monotonic() + timeout
    await wait_drained(settings, [(lanes.clean_group, EVENTS_RAW)], raw_target, children, timeout)
    produced = await _total(settings, lanes.clean_topic) - clean_base
    while True:
        read = await metric_value(analytics_metrics, ANALYTICS_EVENTS) - analytics_base
        if read >= produced:
            return time.time()
        for child in children:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"analytics read {read:.0f} of {produced} clean events")
        await asyncio.sleep(0.05)


async def _total(settings: XietongSettings, topic: str) -> int:
    consumer = AIOKafkaConsumer(**connection_config(settings), enable_auto_commit=False)
    async with started(consumer):
        return sum((await _ends(consumer, topic)).values())


async def append_times(
    settings: XietongSettings,
    topic: str,
    since: dict[TopicPartition, int],
    ids: set[str],
    timeout: float,
) -> dict[str, float]:
    """event id -> broker append time of its record in ``topic`` (from offsets ``since``)."""
    found: dict[str, float] = {}
    consumer = AIOKafkaConsumer(**connection_config(settings), enable_auto_commit=False)
    async with started(consumer):
        consumer.assign(list(since))
        for tp, offset in since.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout
        while len(found) < len(ids) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    event_id = orjson.loads(record.value).get("event_id")
                    if event_id in ids:
                        found[event_id] = record.timestamp / 1000.0
    if len(found) < len(ids):
        raise TimeoutError(f"{topic}: {len(found)} of {len(ids)} events arrived")
    return found


def _percentiles(latencies_ms: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies_ms)
    cuts = statistics.quantiles(ordered, n=100, method="inclusive")
    return cuts[49], cuts[98]


async def raw_hop_latency(
    settings: XietongSettings,
    source: str,
    target: str,
    requests: Sequence[Request],
    events: Sequence[dict[str, Any]],
    rate: float,
) -> tuple[float, float]:
    """p50, p99 (ms) from a plain producer's send to the raw hop's output append, offering
    ``rate`` in the same groups and on the same schedule as the pipeline's HTTP requests."""
    consumer = AIOKafkaConsumer(**connection_config(settings), enable_auto_commit=False)
    async with started(consumer):
        since = await _ends(consumer, target)
    by_id = {event["event_id"]: event for event in events}
    sent_at: dict[str, float] = {}
    async with started(AIOKafkaProducer(**connection_config(settings))) as producer:
        clock = time.monotonic()
        due = 0.0
        futures = []
        for request in requests:
            delay = clock + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.time()
            for event_id in request.event_ids:
                event = by_id[event_id]
                sent_at[event_id] = now
                futures.append(
                    await producer.send(source, orjson.dumps(event), key=event["tenant"].encode())
                )
            due += request.events / rate
        await asyncio.gather(*futures)
    arrived = await append_times(settings, target, since, set(sent_at), timeout=60)
    return _percentiles([(arrived[i] - sent_at[i]) * 1000 for i in sent_at])


async def pipeline_latency(
    settings: XietongSettings,
    lanes: Lanes,
    url: str,
    requests: list[Request],
    rate: float,
    connections: int,
) -> dict[str, tuple[float, float]]:
    """p50, p99 (ms) from the HTTP request to the clean event's append on the clean topic
    (``"total"``), and of its two parts: request to the raw event's append on ``events.raw.v1``
    (``"ingest"``) and from there to the clean append (``"clean"``)."""
    from schemas.topics import EVENTS_RAW

    consumer = AIOKafkaConsumer(**connection_config(settings), enable_auto_commit=False)
    async with started(consumer):
        since_raw = await _ends(consumer, EVENTS_RAW)
        since_clean = await _ends(consumer, lanes.clean_topic)
    result = await post_paced(url, requests, rate=rate, connections=connections)
    _check(result.refused, "ingest")
    ids = set(result.sent_at)
    raw = await append_times(settings, EVENTS_RAW, since_raw, ids, timeout=60)
    clean = await append_times(settings, lanes.clean_topic, since_clean, ids, timeout=60)
    sent = result.sent_at
    return {
        "total": _percentiles([(clean[i] - sent[i]) * 1000 for i in ids]),
        "ingest": _percentiles([(raw[i] - sent[i]) * 1000 for i in ids]),
        "clean": _percentiles([(clean[i] - raw[i]) * 1000 for i in ids]),
    }


async def chain_rows(
    rows: dict[str, Row],
    settings: XietongSettings,
    options: Options,
    say: Progress,
    keys: dict[str, str],
    workdir: Path,
) -> None:
    from schemas.topics import EVENTS_RAW

    raw_a, raw_b, raw_c = (unique_topic(f"chain-{i}") for i in "abc")
    lanes = Lanes.fresh()
    await create_topics(
        settings, [raw_a, raw_b, raw_c, lanes.clean_topic], partitions=options.partitions
    )
    group_b, group_c = (f"bench-chain-{uuid.uuid4().hex[:8]}" for _ in "bc")
    services = {
        "ingest": start_service("ingest", settings, workdir),
        "clean": start_service(
            "clean",
            settings,
            workdir,
            clean_group_id=lanes.clean_group,
            clean_target_topic=lanes.clean_topic,
        ),
        "analytics": start_service(
            "analytics",
            settings,
            workdir,
            analytics_source_topic=lanes.clean_topic,
            analytics_group_id=lanes.analytics_group,
            analytics_network_group_id=lanes.analytics_group + "-network",
            analytics_firm_windows_topic=unique_topic("firm-windows"),
        ),
    }
    bare_port = free_port()
    raw = {
        "gateway": start_raw(
            "chain-gateway",
            ["gateway", "--port", str(bare_port), "--target", raw_a],
            settings,
            workdir,
        ),
        "hop1": start_raw(
            "chain-hop1",
            ["hop", "--source", raw_a, "--target", raw_b, "--group", group_b],
            settings,
            workdir,
        ),
        "hop2": start_raw(
            "chain-hop2",
            ["hop", "--source", raw_b, "--target", raw_c, "--group", group_c],
            settings,
            workdir,
        ),
    }
    children = [child for child, _ in services.values()] + list(raw.values())
    analytics_metrics = f"http://127.0.0.1:{services['analytics'][1]}/metrics"
    with stopping(children):
        ingest, ingest_port = services["ingest"]
        await wait_for_port(ingest, ingest_port)
        for name in ("clean", "analytics"):
            await wait_for_port(*services[name])
        await wait_for_port(raw["gateway"], bare_port)
        urls = {
            "pipeline": f"http://127.0.0.1:{ingest_port}/v1/events",
            "chain": f"http://127.0.0.1:{bare_port}/v1/events",
        }
        rates: dict[str, list[float]] = {"pipeline": [], "chain": []}
        for round_no in range(options.warmup + options.repeats):
            requests = build_requests(make_events(options.events), keys, options.events_per_request)
            order = ("pipeline", "chain") if round_no % 2 == 0 else ("chain", "pipeline")
            measured = {}
            for side in order:
                if side == "pipeline":
                    raw_base = await _total(settings, EVENTS_RAW)
                    clean_base = await _total(settings, lanes.clean_topic)
                    analytics_base = await metric_value(analytics_metrics, ANALYTICS_EVENTS)
                else:
                    raw_base = await _total(settings, raw_a)
                result = await post_all(urls[side], requests, connections=options.connections)
                _check(result.refused, side)
                if side == "pipeline":
                    end = await wait_pipeline(
                        settings,
                        lanes,
                        raw_base + options.events,
                        clean_base,
                        analytics_metrics,
                        analytics_base,
                        children,
                        options.timeout,
                    )
                else:
                    end = await wait_drained(
                        settings,
                        [(group_b, raw_a), (group_c, raw_b)],
                        raw_base + options.events,
                        children,
                        options.timeout,
                    )
                measured[side] = options.events / max(end - result.started, 1e-3)
            say(
                f"pipeline round {round_no}: ours {measured['pipeline']:,.0f} "
                f"raw chain {measured['chain']:,.0f} events/s"
            )
            if round_no >= options.warmup:
                for side in rates:
                    rates[side].append(measured[side])
        paired(
            rows["R2"],
            Side("pipeline", "events/s", rates["pipeline"]),
            Side("raw chain", "events/s", rates["chain"]),
        )

        # R5 at half the pipeline's capacity, the same offered rate for the raw hop.
        rate = max(50.0, statistics.median(rates["pipeline"]) / 2)
        count = max(200, min(options.events, int(rate * 4)))
        p50s: dict[str, list[float]] = {"pipeline": [], "raw": [], "ingest": [], "clean": []}
        p99s: dict[str, list[float]] = {"pipeline": [], "raw": [], "ingest": [], "clean": []}
        for round_no in range(options.warmup + options.repeats):
            events = make_events(count)
            order = ("pipeline", "raw") if round_no % 2 == 0 else ("raw", "pipeline")
            requests = build_requests(events, keys, options.events_per_request)
            for side in order:
                if side == "pipeline":
                    parts = await pipeline_latency(
                        settings, lanes, urls["pipeline"], requests, rate, LATENCY_CONNECTIONS
                    )
                    p50, p99 = parts["total"]
                    if round_no >= options.warmup:
                        for part in ("ingest", "clean"):
                            p50s[part].append(parts[part][0])
                            p99s[part].append(parts[part][1])
                else:
                    one50, one99 = await raw_hop_latency(
                        settings, raw_a, raw_b, requests, events, rate
                    )
                    p50, p99 = one50 * HOPS_TO_CLEAN, one99 * HOPS_TO_CLEAN
                if round_no >= options.warmup:
                    p50s[side].append(p50)
                    p99s[side].append(p99)
                say(
                    f"latency round {round_no} at {rate:,.0f} ev/s: {side} p50 {p50:.1f} ms "
                    f"p99 {p99:.1f} ms{' (x2 hops)' if side == 'raw' else ''}"
                )
        paired(
            rows["R5.p50"],
            Side("pipeline p50", "ms", p50s["pipeline"]),
            Side(f"{HOPS_TO_CLEAN} x raw hop p50", "ms", p50s["raw"]),
        )
        paired(
            rows["R5.p99"],
            Side("pipeline p99", "ms", p99s["pipeline"]),
            Side(f"{HOPS_TO_CLEAN} x raw hop p99", "ms", p99s["raw"]),
        )
        for key, by_part in (("R5.p50", p50s), ("R5.p99", p99s)):
            rows[key].note = (
                f"request -> events.raw.v1 (ingest) {statistics.median(by_part['ingest']):.1f} ms, "
                f"-> clean topic (clean) {statistics.median(by_part['clean']):.1f} ms; "
                f"one raw hop {statistics.median(by_part['raw']) / HOPS_TO_CLEAN:.1f} ms; "
                f"offered {rate:,.0f} events/s in requests of {options.events_per_request}"
            )

        for name, stand_in in (("ingest", "gateway"), ("clean", "hop1"), ("analytics", "hop2")):
            ours_rss = services[name][0].peak_rss_mib()
            raw_rss = raw[stand_in].peak_rss_mib()
            row = rows[f"rss.{name}"]
            if ours_rss is None or raw_rss is None:
                row.status, row.reason = "error", "peak RSS unreadable (/proc)"
                continue
            paired(
                row,
                Side(f"services.{name}", "MiB", [ours_rss]),
                Side(f"bench.raw {stand_in}", "MiB", [raw_rss]),
            )
            row.status = "info"
