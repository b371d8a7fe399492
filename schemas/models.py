"""Model registry contracts: the card that describes a trained model version, and an alias.

Any service that trains models (ml: random forests and Keras networks; nlp: TF-IDF + logistic
regression) describes each trained version with a :class:`ModelCard` and stores its artifact
as bytes in the object store; the card names the artifact (bucket, key, sha256, serialisation)
so any reader can fetch it and prove it is the one trained. Cards travel on the compacted topic
``control.models.v1`` keyed ``<name>/<version>``; :class:`ModelAlias` records (``champion``,
``challenger``) on ``control.model-aliases.v1`` keyed ``<name>/<alias>``. ``family`` and
``serialization`` are free names (``sklearn-rf``, ``keras-mlp``, ``tfidf-logreg``; ``joblib``,
``keras``) so a new kind of model needs no new contract.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, Field

from schemas.events import Contract, TenantId
from schemas.insights import NETWORK_TENANT, FiniteFloat

MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{1,62}$"
ModelName = Annotated[
    str,
    Field(
        pattern=MODEL_NAME_PATTERN,
        description="Name of the model (its use case): lowercase letters, digits, '-' and '_'.",
    ),
]
AliasName = Annotated[
    str,
    Field(
        pattern=r"^[a-z][a-z0-9_-]{0,31}$",
        description="An alias of a model name, e.g. champion or challenger.",
    ),
]
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._+-]{0,62}$")]


class FeatureSpec(Contract):
    """One input of a model: what a record must carry to be scored."""

    name: str = Field(min_length=1, description="Feature (input column) name.")
    dtype: Literal["number", "integer", "category", "text"] = Field(
        description="number / integer: finite values; category: one of `categories` (others "
        "map to an unknown level); text: free text."
    )
    description: str = Field("", description="What the feature is and how it is built.")
    minimum: FiniteFloat | None = Field(None, description="Smallest value accepted, if bounded.")
    maximum: FiniteFloat | None = Field(None, description="Largest value accepted, if bounded.")
    categories: list[str] | None = Field(
        None, description="Known levels of a category feature (seen in training)."
    )


class MetricReport(Contract):
    """One evaluation figure, next to the naive baseline and the random-split figure."""

    metric: str = Field(min_length=1, description="roc_auc, brier, mae, rmse, accuracy ...")
    split: str = Field(
        min_length=1,
        description="time (event-time split with a gap), firm_holdout (unseen firms), ...",
    )
    value: FiniteFloat = Field(description="The model's figure on that split's test rows.")
    baseline: FiniteFloat | None = Field(
        None, description="A naive baseline's figure on the same rows (base rate, last value)."
    )
    random_split: FiniteFloat | None = Field(
        None,
        description="The same metric on a random split of the same rows: far better than "
        "`value` means the random split leaks the future.",
    )
    rows: int = Field(0, ge=0, description="Test rows the figure is computed on.")


class ModelCard(Contract):
    """A trained model version: what it predicts, from what, how well, and where it is."""

    name: ModelName
    version: int = Field(ge=1, strict=True, description="Version number within the name.")
    use_case: str = Field(min_length=1, description="What the model is for, in a sentence.")
    task: Literal["classification", "regression"] = Field(description="Kind of prediction.")
    target: str = Field(min_length=1, description="What is predicted (the label).")
    family: Slug = Field(description="Model family: sklearn-rf, keras-mlp, tfidf-logreg ...")
    serialization: Slug = Field(
        description="How the artifact's bytes are written: joblib, keras ... (the reader needs "
        "the matching loader)."
    )
    params: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="Hyperparameters of the fit."
    )
    features: list[FeatureSpec] = Field(description="The input schema, in the model's order.")
    source_event_types: list[str] = Field(
        default_factory=list, description="Event types the rows were built from."
    )
    training_window_start: AwareDatetime | None = Field(
        None, description="Event time of the first training row."
    )
    training_window_end: AwareDatetime | None = Field(
        None, description="Event time of the last training row."
    )
    training_rows: int = Field(ge=0, description="Rows fitted on.")
    contributing_firms: int = Field(ge=0, description="Distinct firms whose rows were fitted on.")
    metrics: list[MetricReport] = Field(default_factory=list, description="Evaluation.")
    owner: TenantId = Field(
        NETWORK_TENANT,
        description="Who the model belongs to: 'network' for models of pooled data.",
    )
    visibility: Literal["private", "public"] = Field(
        "public",
        description="private: the owner and its grantees (type model_card); public: every "
        "tenant (a card holds aggregates only: metrics and firm counts).",
    )
    artifact_bucket: str = Field(min_length=3, description="Object-store bucket.")
    artifact_key: str = Field(min_length=1, description="Object key of the artifact.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the artifact's bytes.")
    size_bytes: int = Field(ge=0, description="Size of the artifact.")
    created_at: AwareDatetime = Field(description="When the version was registered.")
    created_by: str = Field(min_length=1, description="Service (or person) that registered it.")


class ModelAlias(Contract):
    """Which version of a model an alias points at now, and where it pointed before."""

    name: ModelName
    alias: AliasName
    version: int | None = Field(
        None, ge=1, strict=True, description="The version it points at; None: cleared."
    )
    history: list[int] = Field(
        default_factory=list,
        description="Versions it pointed at before, most recent last (a rollback pops one).",
    )
    set_at: AwareDatetime = Field(description="When it was moved.")
    set_by: str = Field(min_length=1, description="Who moved it.")
    reason: str = Field("", description="Why: promote, rollback, first champion ...")
