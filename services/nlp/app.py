"""The nlp service: text documents in, redacted text insights out.

Consumes ``events.clean.v1`` (clean events, key = tenant) in the consumer group ``nlp`` and
keeps its ``text_document`` events (customer feedback, supplier notes, news, policy; ``en`` and
``zh``). Produces ``insights.text.v1`` (:class:`schemas.insights.TextInsight`, one per text:
language, class and probability, sentiment, key terms, the pseudonyms of what was redacted;
key = owner), ``insights.text-summary.v1`` (:class:`schemas.insights.TextSummary`, per firm and
event-time window: texts, languages, top terms, class mix; key = owner) and dead letters to
``events.clean.v1.dlq`` (undecodable bytes, empty or oversized text, unknown language, with the
original bytes and the reason; the stream goes on). The original text is never written anywhere.

The work is an aiokafka batch loop, not Faust: a Faust agent running the same handler on the
same broker and documents (``stream.take_events`` batches) measured 0.30-0.42 of the plain
pipeline and about 0.55 of this loop (the README's nlp section). One ``getmany`` batch ->
:func:`services.nlp.handlers.analyse_batch` (redact, tokenise, one ``transform`` +
``predict_proba`` per task and language) -> every output enqueued and all acknowledgements
awaited together -> commit.

Classifiers come from the shared model registry (:mod:`shared.models`): the ``champion`` of
``nlp-<task>-<language>`` for each task and language, its artifact's sha256 verified. When a
champion is missing and ``nlp_bootstrap_models`` is on, the service trains one from the shipped
and generated examples and registers it (a network's first start). A champion moved while the
service runs is loaded between batches.

Delivery semantics: **at-least-once consumption; per-document insights effectively once in the
normal case; summaries once per window.** The committed offset of a partition is its
:meth:`~services.nlp.windows.PartitionTexts.commit_point` — the first offset of its oldest open
window — and the commit metadata carries each firm's closed-through mark and the offset up to
which per-document insights are acknowledged. Offsets are committed only after every insight,
summary and dead letter of the batch is acknowledged (``acks=all``, idempotent producer). A
restart re-reads from the commit point: texts below the acknowledged mark rebuild the windows
without being published again, so each text's insight appears once unless the worker dies
between the acknowledgement and the commit (then it appears again with the same insight id). A
window's summary has a deterministic id, so one re-emitted after such a crash is the same
insight. Dead letters are at-least-once. An unexpected error stops the worker without committing.

When the broker goes away the service waits for it and carries on by itself: a batch's outputs
are sent again until the broker acknowledged all of them (only what it had not acknowledged:
:func:`shared.kafka.deliver`; a producer whose idempotence state broke is replaced), a commit
and the read of the commit points on assignment are tried again, and ``/readyz`` says so within
``kafka_unready_after_seconds`` (:class:`shared.kafka.KafkaHealth`). Failures are logged in one
line, repeats collapsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata
from prometheus_client import Counter, Histogram

from schemas.topics import dlq
from services.nlp.classify import TASKS, TextClassifier, model_name
from services.nlp.handlers import SERVICE, Keys, Limits, Models, analyse_batch
from services.nlp.settings import NlpSettings, load_nlp_settings
from services.nlp.tokens import load_jieba
from services.nlp.training import bootstrap
from services.nlp.windows import PartitionTexts
from shared.kafka import (
    BatchPublisher,
    KafkaHealth,
    batch_coordinates,
    commit_offsets,
    committed_points,
    connection_config,
    create_consumer,
    deliver,
    ensure_topics,
    kafka_problem,
    publishing,
    retrying,
    started,
)
from shared.models import ModelRegistry
from shared.settings import XietongSettings

log = logging.getLogger(__name__)

DOCUMENTS = Counter("xietong_nlp_documents_total", "Text documents analysed.")
SUMMARIES = Counter("xietong_nlp_summaries_total", "Window summaries emitted.")
LATE = Counter("xietong_nlp_late_total", "Texts whose window had closed (no summary counts them).")
DEAD_LETTERS = Counter("xietong_nlp_dead_letters_total", "Texts dead-lettered.", ["reason"])
BATCH_SECONDS = Histogram(
    "xietong_nlp_batch_seconds",
    "Analyse, publish and commit one getmany batch.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
LANGUAGES = ("en", "zh")


@dataclass
class NlpStatus:
    """What the service tells the outside (readiness, tests, the benchmark)."""

    started: bool = False
    documents: int = 0
    insights: int = 0
    summaries: int = 0
    dead_letters: int = 0
    late: int = 0
    batches: int = 0
    models: dict[str, int] = field(default_factory=dict)
    registry_problem: str | None = None
    health: KafkaHealth | None = None

    def problem(self) -> str | None:
        if not self.started:
            return "starting"
        return self.health.problem() if self.health is not None else None


async def load_models(
    registry: ModelRegistry,
    settings: NlpSettings,
    network_key: bytes,
    have: dict[tuple[str, str], TextClassifier] | None = None,
) -> dict[tuple[str, str], TextClassifier]:
    """The alias' version of every task and language (bootstrapped when missing and allowed);
    classifiers already loaded at the same version are kept."""
    have = have or {}
    out: dict[tuple[str, str], TextClassifier] = {}
    for task in TASKS:
        for language in LANGUAGES:
            name = model_name(task, language)
            card = registry.resolve(name, settings.nlp_model_alias)
            current = have.get((task, language))
            if card is None:
                if not settings.nlp_bootstrap_models:
                    if current is not None:
                        out[(task, language)] = current
                    continue
                card, classifier = await bootstrap(
                    registry, task, language, network_key, by=SERVICE
                )
                log.info("model bootstrapped", extra={"model": name, "version": card.version})
            elif current is not None and current.version == card.version:
                classifier = current
            else:
                classifier = TextClassifier.loads(await registry.fetch(card), card.version)
            out[(task, language)] = classifier
    return out


class _Restore(ConsumerRebalanceListener):  # type: ignore[misc]
    """Partitions handed over: drop their windows, or rebuild them from the commit metadata."""

    def __init__(self, service: NlpService) -> None:
        self.service = service

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.service.idle.wait()
        for tp in revoked:
            self.service.windows.pop(tp.partition, None)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if not assigned:
            return
        service = self.service
        try:
            committed = await committed_points(
                service.admin,
                service.group,
                assigned,
                what="reading the nlp commit points",
                health=service.status.health,
            )
        except asyncio.CancelledError:  # the consumer is stopping
            raise
        except BaseException as error:  # aiokafka only logs listener errors: stop the loop
            service.failure = error
            raise
        for tp, point in committed.items():
            service.windows[tp.partition] = PartitionTexts.restore(
                service.settings.nlp_window_seconds,
                service.settings.nlp_grace_seconds * 1000,
                point[1] if point else None,
            )


class NlpService:
    """One running nlp worker: its consumer loop, windows and models."""

    def __init__(
        self,
        settings: NlpSettings,
        *,
        consumer: AIOKafkaConsumer,
        publisher: BatchPublisher,
        admin: AIOKafkaAdminClient,
        registry: ModelRegistry,
        models: Models,
        network_key: bytes,
        status: NlpStatus,
    ) -> None:
        self.settings = settings
        self.source = settings.nlp_source_topic
        self.group = settings.nlp_group_id
        self.consumer, self.publisher, self.admin = consumer, publisher, admin
        self.registry, self.models, self.network_key = registry, models, network_key
        self.keys = Keys(network_key)
        self.limits = Limits(
            settings.nlp_max_text_bytes, settings.nlp_key_terms, settings.nlp_top_terms
        )
        self.windows: dict[int, PartitionTexts] = {}
        self.status = status
        self.failure: BaseException | None = None
        """Why the commit points of assigned partitions could not be read (stops the loop)."""
        self.idle = asyncio.Event()
        self.idle.set()
        self._registry_seen = registry.version

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.settings
        health = self.status.health
        while not stop.is_set():
            batch = await self.consumer.getmany(
                timeout_ms=settings.kafka_fetch_timeout_ms,
                max_records=settings.kafka_fetch_max_records,
            )
            if self.failure is not None:
                raise RuntimeError("the nlp commit points could not be read") from self.failure
            if batch:
                try:
                    await self.handle(batch, stop)
                except (KafkaError, TimeoutError, OSError) as error:
                    if not stop.is_set():
                        raise
                    # stopped while the broker is away: the batch is read again on restart
                    log.warning(
                        "nlp stops without committing its last batch: %s",
                        kafka_problem(error, settings.kafka_bootstrap_servers),
                        extra=batch_coordinates(batch),
                    )
                    return
            elif health is not None:
                health.progress()
            await self._follow_registry()

    async def _follow_registry(self) -> None:
        """Load a champion moved since the last batch (never one the view cannot vouch for)."""
        self.status.registry_problem = self.registry.problem()
        if self.registry.version == self._registry_seen or self.status.registry_problem:
            return
        self._registry_seen = self.registry.version
        settings = self.settings.model_copy(update={"nlp_bootstrap_models": False})
        loaded = await load_models(
            self.registry, settings, self.network_key, self.models.classifiers
        )
        self.models.classifiers = loaded
        self.status.models = {model_name(*k): c.version or 0 for k, c in loaded.items()}

    async def handle(
        self, batch: dict[TopicPartition, list[Any]], stop: asyncio.Event | None = None
    ) -> None:
        """Analyse one batch, publish everything, await all acks, then commit (each tried
        again while the broker is away; given up only once ``stop`` is set)."""
        started_at = time.perf_counter()
        ready = {tp: records for tp, records in batch.items() if tp.partition in self.windows}
        if not ready:
            return
        s = self.settings
        try:
            result = analyse_batch(
                [r for records in ready.values() for r in records],
                self.models,
                self.windows,
                self.keys,
                self.limits,
                self.source,
                datetime.now(UTC),
            )
            self.idle.clear()
            try:
                await deliver(
                    self.publisher,
                    {
                        s.nlp_insights_topic: result.insights,
                        s.nlp_summary_topic: result.summaries,
                        dlq(self.source): result.dead,
                    },
                    what="nlp batch",
                    health=self.status.health,
                    stop=stop,
                )
                offsets: dict[TopicPartition, OffsetAndMetadata] = {}
                for tp, records in ready.items():
                    state = self.windows[tp.partition]
                    state.seen(records[-1].offset)
                    state.published = records[-1].offset + 1
                    point = state.commit_point()
                    if point is not None:
                        offsets[tp] = OffsetAndMetadata(point[0], point[1])
            finally:
                self.idle.set()
        except Exception as error:
            if not (
                stop is not None
                and stop.is_set()
                and isinstance(error, KafkaError | TimeoutError | OSError)
            ):
                log.exception(
                    "nlp batch failed; stopping without commit", extra=batch_coordinates(ready)
                )
            raise
        await commit_offsets(
            self.consumer, offsets, what="nlp commit", health=self.status.health, stop=stop
        )
        status = self.status
        status.documents += result.documents
        status.insights += len(result.insights)
        status.summaries += len(result.summaries)
        status.dead_letters += len(result.dead)
        status.late += result.late
        status.batches += 1
        DOCUMENTS.inc(result.documents)
        SUMMARIES.inc(len(result.summaries))
        LATE.inc(result.late)
        for reason, count in result.dead_reasons.items():
            DEAD_LETTERS.labels(reason).inc(count)
        BATCH_SECONDS.observe(time.perf_counter() - started_at)


async def run_nlp(
    settings: XietongSettings,
    stop: asyncio.Event,
    *,
    status: NlpStatus | None = None,
    registry: ModelRegistry | None = None,
) -> NlpStatus:
    """Run the nlp service until ``stop`` is set; returns after the last batch is committed.

    ``registry`` (not started) replaces the one on the platform's model topics (tests)."""
    if not isinstance(settings, NlpSettings):
        settings = load_nlp_settings(**settings.model_dump())
    status = status if status is not None else NlpStatus()
    health = status.health = status.health or KafkaHealth.of(settings)
    async with health.watching(settings):
        return await _run(settings, stop, status, registry)


async def _run(
    settings: NlpSettings,
    stop: asyncio.Event,
    status: NlpStatus,
    registry: ModelRegistry | None,
) -> NlpStatus:
    network_key = settings.network_key()
    load_jieba()  # the dictionary once per process, before the first batch
    source = settings.nlp_source_topic

    async def create_topics() -> None:
        await ensure_topics(settings, [source])
        await ensure_topics(
            settings, [settings.nlp_insights_topic, settings.nlp_summary_topic, dlq(source)]
        )

    # a broker not there yet is waited for
    await retrying(create_topics, what="creating the nlp topics", health=status.health, stop=stop)
    async with registry if registry is not None else ModelRegistry(settings) as registry:
        classifiers = await load_models(registry, settings, network_key)
        status.models = {model_name(*k): c.version or 0 for k, c in classifiers.items()}
        admin = AIOKafkaAdminClient(**connection_config(settings))
        await admin.start()
        try:
            async with (
                publishing(settings) as publisher,
                started(create_consumer(settings, settings.nlp_group_id)) as consumer,
            ):
                service = NlpService(
                    settings,
                    consumer=consumer,
                    publisher=publisher,
                    admin=admin,
                    registry=registry,
                    models=Models(classifiers),
                    network_key=network_key,
                    status=status,
                )
                consumer.subscribe([source], listener=_Restore(service))
                status.started = True
                await service.run(stop)
        finally:
            await admin.close()
    return status
