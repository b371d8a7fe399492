"""The ml service: models the network learns from its own data, scoring events as they arrive.

Consumes ``events.clean.v1`` (:class:`schemas.events.CleanEvent`, key = tenant) in the consumer
group ``ml``, the model registry (:mod:`shared.models`: ``control.models.v1``,
``control.model-aliases.v1``, artifacts in S3) and the control topics (tenants, keys, grants).
Produces :class:`~schemas.insights.Prediction` insights to ``insights.predictions.v1`` (owner =
the firm the prediction is about, private: its grantees of type ``prediction`` read it too),
the challenger's predictions to the internal ``ml.shadow-predictions.v1`` (no insight topic,
so no grant reaches it), :class:`~schemas.insights.ModelDrift` to ``insights.model-drift.v1``
(owner: the model's owner, ``network``) and dead letters to ``events.clean.v1.dlq``.

Work: an aiokafka micro-batch loop (``getmany`` up to ``ml_batch_max_records`` records or
``ml_batch_wait_ms``) -> :meth:`.handlers.Scorer.score_batch` (feature state, one vectorised
input check and one model call per model and batch, ``n_jobs=1``) -> every output appended
and all acknowledgements awaited together -> commit. Before each batch the scorer looks at the
registry: when ``champion`` or ``challenger`` of a use case points at another version, that
version is fetched (sha256 verified) and loaded, and serves from that batch on — no restart.
A missing or corrupt artifact leaves the previous version serving, logged, and ``/readyz``
names it. Refits (``ml_refit``) run in a worker thread on their spec's schedule: rows only from
firms that granted ``network`` the type ``model_training``; published (as ``challenger``, or
``champion`` when there is none) only when at least ``ml_min_firms`` firms contributed.

When the broker goes away the service waits for it and carries on by itself: a batch's
outputs are sent again until the broker acknowledged all of them (only what it had not
acknowledged: :func:`shared.kafka.deliver`; a producer whose idempotence state broke is
replaced), a commit is tried again (:func:`shared.kafka.commit_offsets`; one refused after a
rebalance leaves the batch to be read again), and ``/readyz`` says so within
``kafka_unready_after_seconds`` (:class:`shared.kafka.KafkaHealth`). Failures are logged in one
line, repeats collapsed. Any other error stops the worker without committing.

Delivery semantics: **at-least-once, idempotent predictions.** Offsets are committed only
after the batch's predictions, shadow predictions, drift reports and dead letters were
acknowledged (``acks=all``). A prediction's ``insight_id`` is a uuid5 of model, version and
subject, so a batch read again after a crash re-publishes the same ids: consumers de-duplicate
by id. The feature state needs no store of its own: on start the clean topic is replayed from
``ml_replay_days`` back up to the group's committed offsets without publishing (the clean topic
is the changelog), which rebuilds what the state held at the last commit; features read only
events at or before the prediction's event time, so the replay order does not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Histogram

from schemas.models import ModelCard
from services.ml.features import DAY, MlEvent, parse_event
from services.ml.handlers import SERVICE, BatchOutput, Scorer, Served, load_served
from services.ml.settings import MlSettings
from services.ml.specs import SPECS
from services.ml.training import NotEnoughFirms, build_rows, train
from shared.codec import encode, json_response
from shared.control import ControlRegistry, training_firms
from shared.deadletter import dead_letter_record, record_dead_letter
from shared.httpauth import REGISTRY_KEY, authenticated_tenant, require_api_key
from shared.kafka import (
    Batch,
    KafkaHealth,
    OutRecord,
    batch_coordinates,
    commit_offsets,
    create_consumer,
    deliver,
    ensure_topics,
    kafka_problem,
    publishing,
    retrying,
    started,
    topic_partitions,
)
from shared.models import ArtifactError, ModelRegistry
from shared.observability import add_health_routes

log = logging.getLogger(__name__)

ALIASES = ("champion", "challenger")
PREDICTIONS = Counter("xietong_ml_predictions_total", "Predictions published.", ["model"])
SHADOW = Counter("xietong_ml_shadow_predictions_total", "Challenger predictions.", ["model"])
DEAD_LETTERS = Counter("xietong_ml_dead_letters_total", "Records ml refused.")
UNSCORED = Counter("xietong_ml_unscored_total", "Subjects of a use case without a champion.")
LOAD_FAILURES = Counter("xietong_ml_model_load_failures_total", "Artifacts that failed to load.")
BATCH_SECONDS = Histogram("xietong_ml_batch_seconds", "Time to score one micro-batch.")


# --------------------------------------------------------------------------- serving models


class ModelServer:
    """Keeps the scorer's models in step with the registry's aliases."""

    def __init__(self, registry: ModelRegistry, scorer: Scorer) -> None:
        self.registry = registry
        self.scorer = scorer
        self.problems: dict[str, str] = {}
        self._seen = -1

    async def refresh(self) -> None:
        """Load what an alias points at now, if it is not what is served (cheap when nothing
        moved: one integer compared). While the registry view is stale nothing new is loaded."""
        if self.registry.version == self._seen or self.registry.problem() is not None:
            return  # nothing moved, or the view cannot be vouched for: keep what serves
        self._seen = self.registry.version
        for name in self.scorer.models:
            for alias in ALIASES:
                await self._follow(name, alias)

    async def _follow(self, name: str, alias: str) -> None:
        served_by = self.scorer.champions if alias == "champion" else self.scorer.challengers
        card = self.registry.resolve(name, alias)
        current = served_by.get(name)
        where = f"{name}/{alias}"
        if card is None:
            if alias == "challenger":
                served_by.pop(name, None)
            return
        if current is not None and current.card.sha256 == card.sha256:
            self.problems.pop(where, None)
            return
        try:
            served = await self._load(card)
        except (ArtifactError, ValueError, KeyError, OSError) as error:
            LOAD_FAILURES.inc()
            kept = f"v{current.card.version} keeps serving" if current else "nothing serves"
            self.problems[where] = f"{where} -> v{card.version} not loaded ({error}); {kept}"
            log.error(self.problems[where])
            return
        served_by[name] = served
        self.problems.pop(where, None)
        log.info(
            "model serving",
            extra={"model": name, "alias": alias, "version": card.version, "sha256": card.sha256},
        )

    async def _load(self, card: ModelCard) -> Served:
        data = await self.registry.fetch(card)
        return await asyncio.to_thread(load_served, card, data)

    def problem(self) -> str | None:
        registry = self.registry.problem()
        reasons = [*([registry] if registry else []), *sorted(self.problems.values())]
        return "; ".join(reasons) or None


# --------------------------------------------------------------------------- the batch loop


def parse_batch(
    batch: Batch,
) -> tuple[list[tuple[Any, MlEvent]], list[OutRecord]]:
    parsed: list[tuple[Any, MlEvent]] = []
    dead: list[OutRecord] = []
    for records in batch.values():
        for record in records:
            try:
                parsed.append((record, parse_event(record.value)))
            except (ValueError, TypeError) as error:
                dead.append(
                    dead_letter_record(record_dead_letter(record, str(error), service=SERVICE))
                )
    return parsed, dead


def output_records(settings: MlSettings, out: BatchOutput) -> dict[str, list[OutRecord]]:
    return {
        settings.ml_predictions_topic: [
            OutRecord(tenant.encode(), encode(record)) for tenant, record in out.predictions
        ],
        settings.ml_shadow_topic: [
            OutRecord(tenant.encode(), encode(record)) for tenant, record in out.shadow
        ],
        settings.ml_drift_topic: [
            OutRecord(str(record["tenant"]).encode(), encode(record)) for record in out.drift
        ],
        settings.ml_dead_letter_topic: [dead_letter_record(d) for d in out.dead_letters],
    }


def new_scorer(settings: MlSettings) -> Scorer:
    return Scorer(
        source=settings.ml_source_topic,
        models=tuple(settings.ml_models),
        demand_window_seconds=settings.ml_demand_window_seconds,
        drift_window_seconds=settings.ml_drift_window_seconds,
        drift_threshold=settings.ml_drift_threshold,
        drift_min_rows=settings.ml_drift_min_rows,
    )


async def replay_state(settings: MlSettings, scorer: Scorer) -> int:
    """Rebuild the feature state from the clean topic up to the group's committed offsets
    (or the end when the group has none: it will start from the earliest record then anyway)."""
    consumer = create_consumer(settings, settings.ml_group_id)
    async with started(consumer):
        partitions = await topic_partitions(consumer, settings.ml_source_topic)
        committed = {tp: await consumer.committed(tp) for tp in partitions}
    targets = {tp: offset for tp, offset in committed.items() if offset}
    if not targets:
        return 0
    reader = create_consumer(settings, None)
    count = 0
    async with started(reader):
        reader.assign(list(targets))
        since_ms = int((time.time() - settings.ml_replay_days * DAY) * 1000)
        found = await reader.offsets_for_times(dict.fromkeys(targets, since_ms))
        for tp in targets:
            start = found.get(tp)
            if start is None:
                await reader.seek_to_end(tp)
            else:
                reader.seek(tp, start.offset)
        remaining = dict(targets)
        while remaining:
            batch = await reader.getmany(timeout_ms=500, max_records=5000)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= targets[tp]:
                        break
                    with contextlib.suppress(ValueError, TypeError):
                        scorer.observe(parse_event(record.value))
                        count += 1
            for tp in list(remaining):
                if await reader.position(tp) >= remaining[tp]:
                    del remaining[tp]
    return count


async def run_scoring(
    settings: MlSettings,
    stop: asyncio.Event,
    server: ModelServer,
    *,
    ready: asyncio.Event | None = None,
    health: KafkaHealth | None = None,
) -> None:
    """The scoring loop until ``stop`` is set (see the module docstring). A broker not there
    yet is waited for; ``health`` (optional) hears how the loop fares with the broker."""
    topics = [
        settings.ml_source_topic,
        settings.ml_predictions_topic,
        settings.ml_shadow_topic,
        settings.ml_drift_topic,
        settings.ml_dead_letter_topic,
    ]
    await retrying(
        lambda: ensure_topics(settings, topics),
        what="creating the ml topics",
        health=health,
        stop=stop,
    )

    async def replay() -> int:
        server.scorer.forget()  # an attempt the broker cut short must not count events twice
        return await replay_state(settings, server.scorer)

    replayed = await retrying(replay, what="replaying the feature state", health=health, stop=stop)
    if replayed:
        log.info("feature state replayed", extra={"events": replayed})
    consumer = create_consumer(settings, settings.ml_group_id, settings.ml_source_topic)
    async with publishing(settings) as publisher, started(consumer):
        await server.refresh()
        if ready is not None:
            ready.set()
        while not stop.is_set():
            batch: Batch = await consumer.getmany(
                timeout_ms=settings.ml_batch_wait_ms, max_records=settings.ml_batch_max_records
            )
            await server.refresh()
            if not batch:
                if health is not None:
                    health.progress()
                continue
            began = time.perf_counter()
            try:
                parsed, dead = parse_batch(batch)
                out = server.scorer.score_batch(parsed)
                outputs = output_records(settings, out)
                outputs[settings.ml_dead_letter_topic] += dead
                await deliver(publisher, outputs, what="ml batch", health=health, stop=stop)
                offsets = {tp: records[-1].offset + 1 for tp, records in batch.items()}
                await commit_offsets(consumer, offsets, what="ml commit", health=health, stop=stop)
            except Exception as error:
                if stop.is_set() and isinstance(error, KafkaError | TimeoutError | OSError):
                    # stopped while the broker is away: the batch is read again on restart
                    log.warning(
                        "ml stops without committing its last batch: %s",
                        kafka_problem(error, settings.kafka_bootstrap_servers),
                        extra=batch_coordinates(batch),
                    )
                    return
                log.exception(
                    "ml batch failed; stopping without commit", extra=batch_coordinates(batch)
                )
                raise
            BATCH_SECONDS.observe(time.perf_counter() - began)
            UNSCORED.inc(out.unscored)
            DEAD_LETTERS.inc(len(outputs[settings.ml_dead_letter_topic]))
            for _, record in out.predictions:
                PREDICTIONS.labels(record["model_name"]).inc()
            for _, record in out.shadow:
                SHADOW.labels(record["model_name"]).inc()


# --------------------------------------------------------------------------- training


async def read_events(
    settings: MlSettings, topic: str, *, since: float, types: Iterable[str]
) -> list[MlEvent]:
    """Every clean event of ``types`` appended since ``since`` (epoch s), up to the end now."""
    wanted = set(types)
    events: list[MlEvent] = []
    reader = create_consumer(settings, None)
    async with started(reader):
        partitions = await topic_partitions(reader, topic)
        reader.assign(partitions)
        end = await reader.end_offsets(partitions)
        found = await reader.offsets_for_times(dict.fromkeys(partitions, int(since * 1000)))
        for tp in partitions:
            start = found.get(tp)
            if start is None:
                await reader.seek_to_end(tp)
            else:
                reader.seek(tp, start.offset)
        while any([await reader.position(tp) < end[tp] for tp in partitions]):
            batch = await reader.getmany(timeout_ms=500, max_records=10_000)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= end[tp]:
                        continue
                    try:
                        event = parse_event(record.value)
                    except (ValueError, TypeError):
                        continue
                    if event.type in wanted:
                        events.append(event)
    return events


async def train_and_register(
    settings: MlSettings,
    registry: ModelRegistry,
    control: ControlRegistry,
    name: str,
    family: str,
    *,
    alias: str | None = None,
    params: dict[str, Any] | None = None,
) -> ModelCard:
    """Train ``name`` with ``family`` on the consenting firms' events and register it.

    ``alias`` None: champion when the use case has none, else challenger."""
    spec = SPECS[name]
    problem = control.problem()
    if problem is not None:  # consent cannot be proven: train on nobody's data
        raise NotEnoughFirms(f"{name}: {problem}")
    events = await read_events(
        settings,
        settings.ml_source_topic,
        since=time.time() - spec.training_window_days * DAY * 20,
        types=spec.source_event_types,
    )
    if events:
        latest = max(e.time for e in events)
        events = [e for e in events if e.time >= latest - spec.training_window_days * DAY]
    allowed = training_firms({e.tenant for e in events}, control.grants.values(), datetime.now(UTC))
    events = [e for e in events if e.tenant in allowed]
    began = time.perf_counter()
    rows = build_rows(spec, events, window_seconds=settings.ml_demand_window_seconds)
    trained = await asyncio.to_thread(
        train, spec, family, rows, min_firms=settings.ml_min_firms, params=params
    )
    log.info(
        "model trained",
        extra={
            "model": name,
            "family": family,
            "rows": len(rows.labels),
            "firms": trained.card["contributing_firms"],
            "seconds": round(time.perf_counter() - began, 2),
        },
    )
    card = await registry.register(trained.artifact, trained.card, by=SERVICE)
    if alias is None:
        alias = "champion" if registry.resolve(name, "champion") is None else "challenger"
    await registry.set_alias(name, alias, card.version, by=SERVICE, reason="trained")
    return card


async def run_refits(
    settings: MlSettings, registry: ModelRegistry, control: ControlRegistry, stop: asyncio.Event
) -> None:
    """Refit each use case on its spec's schedule (first try after a minute)."""
    due = {name: time.monotonic() + 60 for name in settings.ml_models}
    while not stop.is_set():
        for name, at in due.items():
            if time.monotonic() < at:
                continue
            try:
                await train_and_register(
                    settings, registry, control, name, settings.ml_refit_family
                )
                due[name] = time.monotonic() + SPECS[name].refit_every_seconds
            except NotEnoughFirms as reason:
                log.info("refit skipped: %s", reason)
                due[name] = time.monotonic() + 300
            except (KafkaError, TimeoutError) as error:  # the broker is away: next time
                log.warning(
                    "refit of %s put off for 5 minutes: %s",
                    name,
                    kafka_problem(error, settings.kafka_bootstrap_servers),
                )
                due[name] = time.monotonic() + 300
            except Exception:
                log.exception("refit failed", extra={"model": name})
                due[name] = time.monotonic() + 300
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await stop.wait()


# --------------------------------------------------------------------------- HTTP


def http_app(
    control: ControlRegistry,
    registry: ModelRegistry,
    server: ModelServer,
    *,
    health: KafkaHealth | None = None,
    scoring: asyncio.Event | None = None,
) -> web.Application:
    """``GET /v1/models``: the model cards (with aliases) the caller may see; health routes.

    Ready once ``scoring`` is set (when given), while ``health`` finds the broker answering
    and the loop progressing, and the registries are current."""

    async def list_models(request: web.Request) -> web.Response:
        reader = authenticated_tenant(request).tenant
        problem = registry.problem()  # the key was vouched for; the cards must be current too
        if problem is not None:
            return json_response(
                {"error": "cannot list models right now; retry shortly", "reason": problem},
                status=503,
                headers={"Retry-After": "5"},
            )
        name = request.query.get("name")
        cards = [
            {**card.model_dump(mode="json"), "aliases": _aliases(registry, card)}
            for card in registry.versions(name)
            if control.may_read(
                reader, owner=card.owner, visibility=card.visibility, insight_type="model_card"
            )
        ]
        return json_response({"models": cards})

    async def ready() -> str | None:
        if scoring is not None and not scoring.is_set():
            return "starting"
        kafka = health.problem() if health is not None else None
        return kafka or control.problem() or server.problem()

    app = web.Application(middlewares=[require_api_key()])
    app[REGISTRY_KEY] = control
    add_health_routes(app, SERVICE, ready)
    app.router.add_get("/v1/models", list_models)
    return app


def _aliases(registry: ModelRegistry, card: ModelCard) -> list[str]:
    return sorted(a for a, v in registry.aliases_of(card.name).items() if v == card.version)


async def run_ml(settings: MlSettings, stop: asyncio.Event) -> None:
    """The whole service: registries, HTTP, scoring loop and refits, until ``stop``. A broker
    not there yet is waited for; readiness follows the broker (:class:`KafkaHealth`)."""
    health = KafkaHealth.of(settings)
    async with health.watching(settings):
        await retrying(
            lambda: ensure_topics(settings, [settings.ml_source_topic]),
            what="waiting for Kafka",
            health=health,
            stop=stop,
        )
        await _serve(settings, stop, health)


async def _serve(settings: MlSettings, stop: asyncio.Event, health: KafkaHealth) -> None:
    async with ControlRegistry(settings) as control, ModelRegistry(settings) as registry:
        server = ModelServer(registry, new_scorer(settings))
        scoring = asyncio.Event()
        app = http_app(control, registry, server, health=health, scoring=scoring)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.http_host, settings.ml_http_port).start()
        refits = (
            asyncio.create_task(run_refits(settings, registry, control, stop))
            if settings.ml_refit
            else None
        )
        try:
            await run_scoring(settings, stop, server, ready=scoring, health=health)
        finally:
            if refits is not None:
                refits.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refits
            await runner.cleanup()
