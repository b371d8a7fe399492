"""The benchmark run: broker, rows, table, ``results.json``.

:func:`run` is the entry point (``python -m bench`` and the test both call it). Every row is a
ratio of our path to a raw baseline measured in the same run on the same broker with the same
events; A and B alternate order from one repeat to the next, after ``warmup`` rounds that are
thrown away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson

from bench import hops, ml, nlp, ours, pipeline, storage
from bench.probe import FirstFetch, wait_for_output
from bench.results import ROW_KEYS, Row, Side, environment, paired, results_document, table
from bench.workload import create_topics, make_events, prefill, to_records, unique_topic
from shared.settings import XietongSettings, load_settings

log = logging.getLogger("bench")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"
README = HERE / "README.md"


@dataclass(frozen=True)
class Options:
    events: int = 30_000
    repeats: int = 5
    warmup: int = 1
    partitions: int = 3
    connections: int = 8
    """HTTP connections of the load generator (R2, R4)."""
    events_per_request: int = 50
    """Events in one HTTP request body (R2, R4)."""
    timeout: float = 180.0
    """Longest wait for one drain before the row is reported as an error."""
    file_mib: int = 32
    """Size of the file uploaded and downloaded through the storage API (S2)."""
    output: Path | None = RESULTS
    command: str = "python -m bench"

    @classmethod
    def quick(cls, **overrides: Any) -> Options:
        return replace(cls(events=3000, repeats=2, warmup=1, file_mib=8), **overrides)

    def overridden(self, **values: Any) -> Options:
        """These options with each of ``values`` that is not None (a command line's flags)."""
        return replace(self, **{name: v for name, v in values.items() if v is not None})


@dataclass
class Progress:
    """Prints what runs, so a long run is not silent."""

    quiet: bool = False
    started: float = field(default_factory=time.monotonic)

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.started:6.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------- drains


async def drain_in_process(
    settings: XietongSettings,
    hop: Callable[[asyncio.Event], Coroutine[Any, Any, Any]],
    source: str,
    target: str,
    expected: int,
    timeout: float,
) -> float:
    """Run an aiokafka-based hop until ``expected`` records are in ``target``; events/s from
    its first fetch to the append time of its last output."""
    stop = asyncio.Event()
    probe = FirstFetch(source)
    with probe.installed():
        task: asyncio.Task[Any] = asyncio.create_task(hop(stop))
        try:
            end = await wait_for_output(
                settings, target, expected, timeout=timeout, failed=lambda: _failure(task)
            )
        finally:
            stop.set()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), 30)
            if not task.done():
                task.cancel()
        if task.done() and not task.cancelled() and task.exception():
            raise RuntimeError("the hop failed") from task.exception()
    if probe.at is None:
        raise RuntimeError("the hop never fetched a record")
    return expected / max(end - probe.at, 1e-3)


def _failure(task: asyncio.Task[Any]) -> BaseException | None:
    if task.done() and not task.cancelled():
        return task.exception()
    return None


async def drain_confluent(
    settings: XietongSettings, source: str, target: str, group: str, expected: int, timeout: float
) -> float:
    thread = asyncio.ensure_future(
        asyncio.to_thread(
            hops.confluent_hop, settings, source, target, group, expected=expected, timeout=timeout
        )
    )
    end = await wait_for_output(
        settings, target, expected, timeout=timeout, failed=lambda: _failure(thread)
    )
    first = await thread
    return expected / max(end - first, 1e-3)


# --------------------------------------------------------------------------- rows


def _rotate(names: list[str], round_no: int) -> list[str]:
    """A different order every round so no candidate always runs first (or last)."""
    shift = round_no % len(names)
    order = names[shift:] + names[:shift]
    return order if round_no % 2 == 0 else order[::-1]


async def hop_rows(settings: XietongSettings, options: Options, say: Progress) -> list[Row]:
    """hop.baseline, hop.orjson, hop.confluent and R1 (clean / baseline), drained in turn."""
    candidates: dict[str, Callable[[str, str, str, int], Awaitable[float]]] = {}

    def aiokafka_hop(codec: hops.Codec) -> Callable[[str, str, str, int], Awaitable[float]]:
        async def drain(source: str, target: str, group: str, expected: int) -> float:
            return await drain_in_process(
                settings,
                lambda stop: hops.baseline_hop(
                    settings, source, target, group, expected=expected, stop=stop, codec=codec
                ),
                source,
                target,
                expected,
                options.timeout,
            )

        return drain

    candidates["baseline"] = aiokafka_hop("json")
    candidates["orjson"] = aiokafka_hop("orjson")

    async def confluent(source: str, target: str, group: str, expected: int) -> float:
        return await drain_confluent(settings, source, target, group, expected, options.timeout)

    candidates["confluent"] = confluent

    r1 = Row("R1", "clean hop / baseline hop (events/s)", target=">= 1.0", events=options.events)
    try:
        run_clean = ours.clean_hop()
    except ours.NotAvailable as missing:
        r1.status, r1.reason = "not available", str(missing)
    else:

        async def clean(source: str, target: str, group: str, expected: int) -> float:
            state = Path(tempfile.mkdtemp(prefix="xietong-bench-clean-"))
            try:
                service_settings = settings.model_copy(update={"state_dir": str(state)})
                return await drain_in_process(
                    service_settings,
                    lambda stop: run_clean(service_settings, stop, source, target, group),
                    source,
                    target,
                    expected,
                    options.timeout,
                )
            finally:
                shutil.rmtree(state, ignore_errors=True)

        candidates["clean"] = clean

    samples: dict[str, list[float]] = {name: [] for name in candidates}
    failed: dict[str, str] = {}
    names = list(candidates)
    for round_no in range(options.warmup + options.repeats):
        measured = round_no >= options.warmup
        records = to_records(make_events(options.events))
        live = [n for n in names if n not in failed]
        topics = {n: (unique_topic(f"{n}-in"), unique_topic(f"{n}-out")) for n in live}
        await create_topics(
            settings,
            [t[0] for t in topics.values()],
            partitions=options.partitions,
            append_time=False,
        )
        await create_topics(
            settings, [t[1] for t in topics.values()], partitions=options.partitions
        )
        await prefill(settings, [t[0] for t in topics.values()], records)
        for name in _rotate(live, round_no):
            source, target = topics[name]
            group = f"bench-{name}-{uuid.uuid4().hex[:8]}"
            try:
                rate = await candidates[name](source, target, group, len(records))
            except Exception as error:  # one broken candidate must not sink the others
                log.exception("%s failed", name)
                failed[name] = f"{type(error).__name__}: {error}"
                continue
            say(f"hops round {round_no}{'' if measured else ' (warm-up)'}: {name} {rate:,.0f} ev/s")
            if measured:
                samples[name].append(rate)

    def side(name: str, label: str) -> Side:
        return Side(label, "events/s", samples[name])

    rows = []
    base = Row(
        "hop.baseline", "aiokafka getmany + json + send + commit (events/s)", events=options.events
    )
    if "baseline" in failed:
        base.status, base.reason = "error", failed["baseline"]
    else:
        base.status, base.numerator = "info", side("baseline", "baseline hop")
        base.ratio_samples = [1.0] * len(samples["baseline"])
    rows.append(base)
    others: list[tuple[str, str, str, str | None]] = [
        ("orjson", "hop.orjson", "same loop with orjson / baseline", None),
        ("confluent", "hop.confluent", "confluent-kafka loop (orjson) / baseline", None),
        ("clean", "R1", r1.title, r1.target),
    ]
    for name, key, title, goal in others:
        row = r1 if key == "R1" else Row(key, title, target=goal, events=options.events)
        if name not in candidates:
            rows.append(row)
            continue
        if name in failed or "baseline" in failed:
            row.status, row.reason = "error", failed.get(name) or "baseline failed"
        else:
            paired(row, side(name, name), side("baseline", "baseline hop"))
            row.status = row.status if key == "R1" else "info"
        rows.append(row)
    return rows


async def producer_row(settings: XietongSettings, options: Options, say: Progress) -> Row:
    """R3: the shared producer against a plain ``send`` loop with the same producer settings."""
    row = Row(
        "R3",
        "shared producer / raw send loop, same linger and batch (records/s)",
        target=">= 1.0",
        events=options.events,
    )
    chunk = settings.kafka_fetch_max_records
    shared: list[float] = []
    raw: list[float] = []
    try:
        for round_no in range(options.warmup + options.repeats):
            records = to_records(make_events(options.events))
            a, b = unique_topic("shared-producer"), unique_topic("raw-producer")
            await create_topics(settings, [a, b], partitions=options.partitions, append_time=False)
            order = ("shared", "raw") if round_no % 2 == 0 else ("raw", "shared")
            rates = {}
            for name in order:
                if name == "shared":
                    seconds = await hops.shared_publish(settings, a, records, chunk=chunk)
                else:
                    seconds = await hops.raw_send_loop(settings, b, records, chunk=chunk)
                rates[name] = len(records) / seconds
            say(
                f"producer round {round_no}: shared {rates['shared']:,.0f} "
                f"raw {rates['raw']:,.0f} records/s"
            )
            if round_no >= options.warmup:
                shared.append(rates["shared"])
                raw.append(rates["raw"])
    except Exception as error:
        log.exception("R3 failed")
        row.status, row.reason = "error", f"{type(error).__name__}: {error}"
        return row
    return paired(
        row,
        Side("BatchPublisher", "records/s", shared),
        Side("AIOKafkaProducer.send loop", "records/s", raw),
    )


# --------------------------------------------------------------------------- the run


async def run_rows(settings: XietongSettings, options: Options, say: Progress) -> list[Row]:
    rows = await hop_rows(settings, options, say)
    rows.append(await producer_row(settings, options, say))
    rows += await pipeline.pipeline_rows(settings, options, say)
    rows += await ml.ml_rows(settings, options, say)
    rows += await nlp.nlp_rows(settings, options, say)
    rows += await storage.storage_rows(settings, options, say)
    by_key = {row.key: row for row in rows}
    missing = [key for key in ROW_KEYS if key not in by_key]
    if missing:
        raise AssertionError(f"rows not produced: {missing}")
    return [by_key[key] for key in ROW_KEYS]


@contextlib.contextmanager
def broker(bootstrap: str | None, say: Progress) -> Iterator[tuple[str, str]]:
    """The broker to measure on: the one named, or a fresh local one stopped afterwards."""
    if bootstrap:
        yield bootstrap, f"external broker at {bootstrap}"
        return
    from deploy.local import infra

    data_dir = Path(tempfile.mkdtemp(prefix="xietong-bench-kafka-"))
    say("starting a fresh local Kafka broker")
    instance = infra.start_kafka(data_dir=data_dir)
    try:
        yield instance.bootstrap_servers, _local_broker_version(infra.KAFKA_LIBS)
    finally:
        infra.stop(instance)
        shutil.rmtree(data_dir, ignore_errors=True)


def _local_broker_version(libs: Path) -> str:
    jars = sorted(libs.glob("kafka_2.13-*.jar"))
    return f"Apache Kafka {jars[0].stem.removeprefix('kafka_2.13-')}" if jars else "unknown"


def measure(
    options: Options,
    rows_of: Callable[[XietongSettings, Options, Progress], Coroutine[Any, Any, list[Row]]],
    say: Progress,
    bootstrap: str | None = None,
) -> tuple[list[Row], str]:
    """``rows_of`` measured on the broker named (else ``XIETONG_BENCH_KAFKA_BOOTSTRAP``, else a
    fresh local one); the rows and the broker's version."""
    bootstrap = bootstrap or os.environ.get("XIETONG_BENCH_KAFKA_BOOTSTRAP")
    with broker(bootstrap, say) as (servers, version):
        settings = load_settings(
            kafka_bootstrap_servers=servers,
            kafka_partitions=options.partitions,
            log_format="text",
            log_level="WARNING",
        )
        return asyncio.run(rows_of(settings, options, say)), version


def run(options: Options, *, bootstrap: str | None = None, quiet: bool = False) -> dict[str, Any]:
    """Measure every row; print the table; write ``options.output``. Returns the results."""
    say = Progress(quiet=quiet)
    rows, version = measure(options, run_rows, say, bootstrap)
    document = results_document(
        environment(version, options.events, options.repeats, options.warmup), rows
    )
    document["environment"]["command"] = options.command
    rendered = table(rows)
    if not quiet:
        print()
        print(rendered)
    if options.output is not None:
        options.output.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    document["table"] = rendered
    return document
