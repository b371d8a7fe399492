"""Settings of the ml service (environment prefix ``XIETONG_``: ``XIETONG_ML_HTTP_PORT``,
``XIETONG_ML_BATCH_WAIT_MS``, ``XIETONG_ML_MIN_FIRMS`` ...; the registry's bucket
``XIETONG_MODELS_BUCKET`` is in :mod:`shared.settings`)."""

from __future__ import annotations

from pydantic import Field

from schemas.topics import (
    EVENTS_CLEAN,
    INSIGHTS_MODEL_DRIFT,
    INSIGHTS_PREDICTIONS,
    ML_SHADOW_PREDICTIONS,
    dlq,
)
from shared.settings import XietongSettings


class MlSettings(XietongSettings):
    """Scoring, training and drift of the ml service."""

    ml_http_port: int = Field(
        8083, ge=0, le=65535, description="Model cards (GET /v1/models), health and metrics."
    )
    ml_group_id: str = Field("ml", min_length=1, description="Consumer group of the scorer.")
    ml_source_topic: str = Field(EVENTS_CLEAN, min_length=1, description="Clean events in.")
    ml_predictions_topic: str = Field(
        INSIGHTS_PREDICTIONS, min_length=1, description="Champion predictions out (insights)."
    )
    ml_shadow_topic: str = Field(
        ML_SHADOW_PREDICTIONS, min_length=1, description="Challenger predictions (internal)."
    )
    ml_drift_topic: str = Field(
        INSIGHTS_MODEL_DRIFT, min_length=1, description="Drift reports out (insights)."
    )
    ml_dead_letter_topic: str = Field(
        dlq(EVENTS_CLEAN), min_length=1, description="Rows the models cannot score, with why."
    )
    ml_models: list[str] = Field(
        default_factory=lambda: ["supplier-delay", "demand"],
        description="Use cases scored (and refitted) by this process.",
    )
    ml_batch_wait_ms: int = Field(
        100, ge=1, description="Longest a micro-batch waits for records (getmany timeout)."
    )
    ml_batch_max_records: int = Field(1000, ge=1, description="Records per micro-batch.")
    ml_min_firms: int = Field(
        5, ge=1, description="k: a model is published only when this many firms contributed."
    )
    ml_demand_window_seconds: int = Field(
        86_400, ge=60, description="Event-time window of the demand use case."
    )
    ml_drift_window_seconds: int = Field(
        86_400, ge=60, description="Event-time window over which live inputs are compared."
    )
    ml_drift_threshold: float = Field(
        0.25, gt=0, description="Population stability index of a feature that counts as drift."
    )
    ml_drift_min_rows: int = Field(50, ge=1, description="Live rows a drift check needs.")
    ml_refit: bool = Field(
        True, description="Refit each use case on its schedule (spec.refit_every_seconds)."
    )
    ml_refit_family: str = Field("sklearn-rf", description="Family the scheduled refit trains.")
    ml_replay_days: float = Field(
        60.0,
        gt=0,
        description="On start, how far back the clean topic is replayed (without publishing) "
        "to rebuild the feature state up to the group's committed offsets.",
    )


def load_ml_settings(**overrides: object) -> MlSettings:
    """Read the environment now; keyword arguments win over it."""
    return MlSettings(**overrides)  # type: ignore[arg-type]
