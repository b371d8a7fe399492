"""Every topic of the platform: its name, key, messages, producers and consumers.

This registry is the single source of :mod:`schemas.asyncapi` (the AsyncAPI 3 document) and of
the topic list the services create. Names follow ``<domain>.<stage>.v<N>``; dead letters are
``<topic>.dlq``; the key of event and insight topics is the tenant, so each firm's records stay
in order on one partition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from schemas.control import ApiKey, Grant, Tenant
from schemas.events import EVENT_MODELS, CleanEvent
from schemas.insights import (
    Benchmark,
    ClusterAssignment,
    Correlation,
    DeadLetter,
    ModelDrift,
    Prediction,
    Statistics,
    TextInsight,
    TextSummary,
)
from schemas.internal import FirmWindowSummary, PartitionWatermark
from schemas.models import ModelAlias, ModelCard
from schemas.reference import FxRate


@dataclass(frozen=True)
class TopicSpec:
    name: str
    description: str
    key: str
    messages: tuple[type[BaseModel], ...]
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    compacted: bool = False
    tags: tuple[str, ...] = field(default=())


def dlq(topic: str) -> str:
    """The dead-letter topic of ``topic``."""
    return f"{topic}.dlq"


EVENTS_RAW = "events.raw.v1"
EVENTS_CLEAN = "events.clean.v1"
INSIGHTS_STATISTICS = "insights.statistics.v1"
INSIGHTS_CORRELATION = "insights.correlation.v1"
INSIGHTS_CLUSTERS = "insights.clusters.v1"
INSIGHTS_BENCHMARKS = "insights.benchmarks.v1"
INSIGHTS_PREDICTIONS = "insights.predictions.v1"
INSIGHTS_MODEL_DRIFT = "insights.model-drift.v1"
ML_SHADOW_PREDICTIONS = "ml.shadow-predictions.v1"
INSIGHTS_TEXT = "insights.text.v1"
INSIGHTS_TEXT_SUMMARY = "insights.text-summary.v1"
CONTROL_TENANTS = "control.tenants.v1"
CONTROL_KEYS = "control.keys.v1"
CONTROL_GRANTS = "control.grants.v1"
CONTROL_MODELS = "control.models.v1"
CONTROL_MODEL_ALIASES = "control.model-aliases.v1"
ANALYTICS_FIRM_WINDOWS = "analytics.firm-windows.v1"
REFERENCE_FX_RATES = "reference.fx-rates.v1"

INSIGHT_TOPICS: dict[str, str] = {
    "statistics": INSIGHTS_STATISTICS,
    "correlation": INSIGHTS_CORRELATION,
    "cluster_assignment": INSIGHTS_CLUSTERS,
    "benchmark": INSIGHTS_BENCHMARKS,
    "prediction": INSIGHTS_PREDICTIONS,
    "model_drift": INSIGHTS_MODEL_DRIFT,
    "text_insight": INSIGHTS_TEXT,
    "text_summary": INSIGHTS_TEXT_SUMMARY,
}
"""Insight type -> its topic."""

TENANT_KEY = "tenant id (UTF-8): every record of one firm on one partition, in order"

TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        EVENTS_RAW,
        "Partner events as published, before cleaning. A partner writing here directly (not "
        "through the gateway) must key every record by its tenant id as UTF-8 and pick the "
        "partition as Java's default partitioner does: murmur2 of the key, made positive, modulo "
        "the partition count (librdkafka-based clients: partitioner=murmur2_random; their default "
        "is crc32-based). clean re-produces a record found on another partition or under another "
        "key to its tenant's partition (same value and headers, plus "
        "xietong-rerouted-from: topic/partition/offset) and cleans only that copy, so consumers "
        "of this topic may see such a record twice.",
        TENANT_KEY,
        tuple(EVENT_MODELS.values()),
        producers=("ingest",),
        consumers=("clean", "storage"),
    ),
    TopicSpec(
        dlq(EVENTS_RAW),
        "Records refused on the way in (ingest) or by cleaning, with original content and reason.",
        TENANT_KEY + "; empty when the tenant is unknown",
        (DeadLetter,),
        producers=("ingest", "clean"),
        consumers=("storage",),
    ),
    TopicSpec(
        EVENTS_CLEAN,
        "Cleaned events: de-duplicated, filled by policy, canonical units, quality flags. "
        "Partition p holds what clean emitted for raw partition p (its changelog), each record "
        "stamped with the moment it was cleaned.",
        TENANT_KEY,
        (CleanEvent,),
        producers=("clean",),
        consumers=("analytics", "ml", "nlp", "storage"),
    ),
    TopicSpec(
        dlq(EVENTS_CLEAN),
        "Clean events that analytics, ml, nlp or the storage archive could not process.",
        TENANT_KEY,
        (DeadLetter,),
        producers=("analytics", "ml", "nlp", "storage"),
        consumers=("storage",),
    ),
    TopicSpec(
        INSIGHTS_STATISTICS,
        "Windowed describe() per firm and metric.",
        TENANT_KEY + " (owner)",
        (Statistics,),
        producers=("analytics",),
        consumers=("subscribers", "storage"),
    ),
    TopicSpec(
        INSIGHTS_CORRELATION,
        "Windowed correlations between a firm's metrics.",
        TENANT_KEY + " (owner)",
        (Correlation,),
        producers=("analytics",),
        consumers=("subscribers", "storage"),
    ),
    TopicSpec(
        INSIGHTS_CLUSTERS,
        "The cluster of similar firms each firm belongs to.",
        TENANT_KEY + " (owner)",
        (ClusterAssignment,),
        producers=("analytics",),
        consumers=("subscribers", "storage"),
    ),
    TopicSpec(
        INSIGHTS_BENCHMARKS,
        "Industry benchmarks that passed the k-firms and dominance thresholds.",
        "'network' (cross-firm aggregates have no single owner)",
        (Benchmark,),
        producers=("analytics",),
        consumers=("subscribers", "storage"),
    ),
    TopicSpec(
        INSIGHTS_PREDICTIONS,
        "Model predictions per firm (the champion model's; owner: the firm the prediction "
        "is about).",
        TENANT_KEY + " (owner)",
        (Prediction,),
        producers=("ml",),
        consumers=("subscribers", "storage"),
    ),
    TopicSpec(
        INSIGHTS_MODEL_DRIFT,
        "Per model and event-time window: features whose live inputs drifted from the "
        "training data (owner: the model's owner, 'network' for models of pooled data).",
        TENANT_KEY + " (owner)",
        (ModelDrift,),
        producers=("ml",),
        consumers=("subscribers", "storage"),
    ),
    TopicSpec(
        ML_SHADOW_PREDICTIONS,
        "Internal to ml: the challenger model's predictions on the same batches as the "
        "champion's, for comparison. Not an insight topic: no grant or gateway path reads it.",
        TENANT_KEY + " (the firm scored)",
        (Prediction,),
        producers=("ml",),
        consumers=("ml",),
    ),
    TopicSpec(
        INSIGHTS_TEXT,
        "Per text document: language, class and probability, key terms and the pseudonyms of "
        "what was redacted (never the text).",
        TENANT_KEY + " (owner)",
        (TextInsight,),
        producers=("nlp",),
        consumers=("subscribers", "storage"),
    ),
    TopicSpec(
        INSIGHTS_TEXT_SUMMARY,
        "Per firm and event-time window: texts, languages, top terms and class mix.",
        TENANT_KEY + " (owner)",
        (TextSummary,),
        producers=("nlp",),
        consumers=("subscribers", "storage"),
    ),
    TopicSpec(
        CONTROL_TENANTS,
        "Registry of tenants (compacted).",
        "tenant id",
        (Tenant,),
        producers=("cli",),
        consumers=("ingest", "analytics"),
        compacted=True,
    ),
    TopicSpec(
        CONTROL_KEYS,
        "API keys as SHA-256 digests (compacted).",
        "key id",
        (ApiKey,),
        producers=("cli",),
        consumers=("ingest",),
        compacted=True,
    ),
    TopicSpec(
        CONTROL_GRANTS,
        "Sharing agreements and their revocations (compacted).",
        "grant id",
        (Grant,),
        producers=("cli", "ingest"),
        consumers=("ingest",),
        compacted=True,
    ),
    TopicSpec(
        CONTROL_MODELS,
        "Model registry: one card per trained model version, naming its artifact in the "
        "object store and its sha256 (compacted).",
        "'<model name>/<version>'",
        (ModelCard,),
        producers=("ml", "nlp", "cli"),
        consumers=("ml", "nlp", "cli"),
        compacted=True,
    ),
    TopicSpec(
        CONTROL_MODEL_ALIASES,
        "Model registry aliases (champion, challenger): the version each points at and the "
        "ones before it (compacted).",
        "'<model name>/<alias>'",
        (ModelAlias,),
        producers=("ml", "nlp", "cli"),
        consumers=("ml", "nlp", "cli"),
        compacted=True,
    ),
    TopicSpec(
        REFERENCE_FX_RATES,
        "Dated exchange rates to yuan (compacted), readable by every partner (GET /v1/rates). "
        "clean converts a price with the rate of the latest date on or before the event's date "
        "(UTC) among the rates published before the event reached events.raw.v1 (its Kafka "
        "timestamp), and records it on the clean event; a key published again corrects that "
        "date's rate for events that arrive afterwards.",
        "'<CURRENCY>/<YYYY-MM-DD>', e.g. EUR/2026-11-30",
        (FxRate,),
        producers=("cli",),
        consumers=("clean", "ingest"),
        compacted=True,
    ),
    TopicSpec(
        ANALYTICS_FIRM_WINDOWS,
        "Internal to analytics (one partition): closed firm-window summaries and source "
        "watermarks, from which one replica computes benchmarks and clusters.",
        "'network'",
        (FirmWindowSummary, PartitionWatermark),
        producers=("analytics",),
        consumers=("analytics",),
    ),
)

TOPICS += tuple(
    TopicSpec(
        dlq(topic),
        "Insights the storage service could not archive (unreadable, or labels no store may "
        "receive), with their original bytes and the reason.",
        TENANT_KEY + " (owner)",
        (DeadLetter,),
        producers=("storage",),
        consumers=("operators",),
    )
    for topic in INSIGHT_TOPICS.values()
)

TOPIC_BY_NAME: dict[str, TopicSpec] = {spec.name: spec for spec in TOPICS}
COMPACTED_TOPICS: frozenset[str] = frozenset(spec.name for spec in TOPICS if spec.compacted)
