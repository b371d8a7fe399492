"""Insight contracts: what the services give back to the network, and the dead-letter record.

Every insight has an owner (``tenant``: the firm it is about, or ``NETWORK_TENANT`` for
aggregates across firms), a ``visibility`` and a :class:`Provenance` that says which window,
how many firms, which topics and schema versions, and which service at which version made it.
Sharing rules act on ``tenant``, ``visibility`` and ``type``: a private insight reaches its owner
and those the owner granted that type to; a public one (a benchmark that passed its thresholds)
reaches everyone.
"""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID, uuid4

from pydantic import AwareDatetime, Field

from schemas.events import Contract, TenantId

NETWORK_TENANT = "network"
"""Owner of aggregates across firms (benchmarks): no single firm owns them."""

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Provenance(Contract):
    """Where an insight comes from: enough to reproduce or audit it."""

    window_start: AwareDatetime | None = Field(
        None, description="Start of the event-time window (inclusive)."
    )
    window_end: AwareDatetime | None = Field(
        None, description="End of the event-time window (exclusive)."
    )
    contributing_partners: int = Field(
        ge=0, description="Distinct firms whose events went into it."
    )
    event_count: int = Field(ge=0, description="Events that went into it.")
    source_topics: list[str] = Field(description="Topics read to make it.")
    schema_versions: dict[str, int] = Field(
        description="Event type -> payload schema version read."
    )
    service: str = Field(description="Producing service.")
    service_version: str = Field(description="Version of the producing service.")
    produced_at: AwareDatetime = Field(description="When it was computed.")
    restates: UUID | None = Field(
        None,
        description="Id of the earlier revision this insight replaces (late events of its "
        "window came in: a back-fill, a file drop, a change-data snapshot).",
    )


class Insight(Contract):
    """Fields every insight has."""

    insight_id: UUID = Field(default_factory=uuid4, description="Unique id of this insight.")
    type: str = Field(description="Insight type.")
    tenant: TenantId = Field(
        description=f"Owner: the firm it is about, or '{NETWORK_TENANT}' for cross-firm aggregates."
    )
    visibility: Literal["private", "public"] = Field(
        "private", description="private: owner and grantees only; public: every partner."
    )
    provenance: Provenance


class Statistics(Insight):
    """pandas ``describe()`` of one metric of one firm over one window."""

    type: Literal["statistics"] = "statistics"
    revision: int = Field(
        1, ge=1, description="1 when the window first closed; each restatement adds one."
    )
    metric: str = Field(description="Metric name, e.g. sales.amount_cny.")
    count: int = Field(ge=0)
    mean: FiniteFloat | None = None
    std: FiniteFloat | None = Field(
        None, description="Sample standard deviation (ddof=1), as pandas."
    )
    min: FiniteFloat | None = None
    p25: FiniteFloat | None = None
    p50: FiniteFloat | None = None
    p75: FiniteFloat | None = None
    max: FiniteFloat | None = None


class Correlation(Insight):
    """Pearson correlations between a firm's metrics over one window (pandas ``corr``)."""

    type: Literal["correlation"] = "correlation"
    revision: int = Field(
        1, ge=1, description="1 when the window first closed; each restatement adds one."
    )
    metrics: list[str] = Field(description="Metric names, the order of the matrix.")
    matrix: list[list[FiniteFloat | None]] = Field(
        description="Correlation matrix; null where undefined."
    )


class ClusterAssignment(Insight):
    """The group of similar firms a firm belongs to, with the profile of every group."""

    type: Literal["cluster_assignment"] = "cluster_assignment"
    cluster: int = Field(ge=0, description="Index of the firm's cluster.")
    k: int = Field(ge=1, description="Number of clusters, chosen by silhouette.")
    silhouette: FiniteFloat | None = Field(None, description="Mean silhouette of the fit.")
    features: list[str] = Field(description="KPIs the firms were compared on.")
    profiles: list[dict[str, FiniteFloat]] = Field(
        description="Per cluster: mean KPI values in original units."
    )
    cluster_sizes: list[int] = Field(description="Firms per cluster.")
    model_version: str = Field(description="Id of the fit (refit time and data hash).")


class Benchmark(Insight):
    """Quantiles of a metric across the firms of an industry and region.

    Published only when at least ``k`` firms contributed; the figures are differentially
    private (values clamped to the metric's declared range, keyed Laplace and exponential
    mechanisms): one firm changes their probability by at most ``e**epsilon``.
    """

    type: Literal["benchmark"] = "benchmark"
    metric: str
    industry: str
    region: str
    firms: int = Field(ge=1, description="Distinct contributing firms (at least k).")
    quantiles: dict[str, FiniteFloat] = Field(
        description="p10, p25, p50, p75, p90 of per-firm values."
    )
    mean: FiniteFloat


class Prediction(Insight):
    """A model's prediction for a firm (demand, risk, ...)."""

    type: Literal["prediction"] = "prediction"
    target: str = Field(description="What is predicted.")
    model_name: str
    model_version: str
    subject_event_id: UUID | None = Field(
        None, description="The event the prediction was made for."
    )
    value: FiniteFloat | None = Field(None, description="Regression output.")
    label: str | None = Field(None, description="Classification output.")
    probability: FiniteFloat | None = Field(None, ge=0, le=1)
    model_sha256: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{64}$",
        description="SHA-256 of the model artifact that scored (its card in the registry).",
    )


class ModelDrift(Insight):
    """Live inputs of a model have drifted from its training data (for the model's owner)."""

    type: Literal["model_drift"] = "model_drift"
    model_name: str
    model_version: str
    rows: int = Field(ge=0, description="Live rows of the window compared.")
    threshold: FiniteFloat = Field(description="Population stability index that counts as drift.")
    psi: dict[str, FiniteFloat] = Field(
        description="Per feature: population stability index against the training reference."
    )
    drifted: list[str] = Field(description="Features whose index crossed the threshold.")


class TextInsight(Insight):
    """What a text says: its class, sentiment and key terms."""

    type: Literal["text_insight"] = "text_insight"
    document_event_id: UUID
    language: Literal["en", "zh"]
    label: str | None = None
    label_probability: FiniteFloat | None = Field(None, ge=0, le=1)
    sentiment: FiniteFloat | None = Field(
        None, ge=-1, le=1, description="-1 negative .. 1 positive."
    )
    key_terms: list[str] = Field(
        default_factory=list, description="Its highest TF-IDF terms, from the redacted text."
    )
    kind: str | None = Field(None, description="What sort of text: customer_feedback, ...")
    task: str | None = Field(
        None, description="What `label` is: sentiment or topic (None: not classified)."
    )
    model_version: str | None = Field(
        None, description="The classifier that labelled it: <model name>/<version>."
    )
    entities: list[str] = Field(
        default_factory=list,
        description="Pseudonyms of the personal data redacted from the text (KIND:<hex>), keyed "
        "per sharing agreement: the same value gives the same pseudonym in every insight read "
        "under one agreement (the owner's own, or one grant) and another under any other.",
    )


class TermCount(Contract):
    """A term and how many documents of the window had it among their terms."""

    term: str
    documents: int = Field(ge=1)


class TextSummary(Insight):
    """A firm's texts over one window: how many, in which languages, top terms, class mix."""

    type: Literal["text_summary"] = "text_summary"
    documents: int = Field(ge=1, description="Texts of the firm that occurred in the window.")
    languages: dict[str, int] = Field(description="Texts per language.")
    top_terms: list[TermCount] = Field(
        description="Most frequent terms of the redacted texts, by documents."
    )
    class_mix: dict[str, dict[str, int]] = Field(
        description="Task (sentiment, topic) -> class -> texts classified so."
    )


INSIGHT_MODELS: dict[str, type[Insight]] = {
    "statistics": Statistics,
    "correlation": Correlation,
    "cluster_assignment": ClusterAssignment,
    "benchmark": Benchmark,
    "prediction": Prediction,
    "model_drift": ModelDrift,
    "text_insight": TextInsight,
    "text_summary": TextSummary,
}


class FieldError(Contract):
    """One reason a record was refused."""

    field: str = Field(description="Dotted path of the field, or '' for the whole record.")
    reason: str


class DeadLetter(Contract):
    """A record the platform could not process: the original bytes, why, and where from."""

    original: str = Field(
        description="The original record as received (UTF-8 text, or base64 if binary)."
    )
    original_encoding: Literal["utf-8", "base64"] = "utf-8"
    reason: str = Field(description="Summary of why it was refused.")
    errors: list[FieldError] = Field(default_factory=list, description="Per-field reasons.")
    tenant: str | None = Field(None, description="The tenant it came from, where known.")
    source_topic: str | None = Field(
        None, description="Topic it was read from (None for HTTP/file input)."
    )
    source_partition: int | None = None
    source_offset: int | None = None
    source_ref: str | None = Field(
        None, description="Other origin: request id and index, file name and line ..."
    )
    service: str = Field(description="Service that refused it.")
    failed_at: AwareDatetime = Field(description="When it was refused.")
