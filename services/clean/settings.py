"""Settings of the clean service (environment prefix ``XIETONG_``: ``XIETONG_CLEAN_HTTP_PORT``)."""

from __future__ import annotations

from pydantic import Field

from schemas.topics import EVENTS_CLEAN, EVENTS_RAW, REFERENCE_FX_RATES
from shared.settings import XietongSettings


class CleanSettings(XietongSettings):
    """What the clean hop needs beyond the platform settings."""

    clean_http_port: int = Field(8081, ge=0, le=65535, description="Health and metrics port.")
    clean_group_id: str = Field("clean", min_length=1, description="Consumer group of the hop.")
    clean_source_topic: str = Field(EVENTS_RAW, description="Raw events in.")
    clean_target_topic: str = Field(EVENTS_CLEAN, description="Clean events out.")
    clean_rates_topic: str = Field(
        REFERENCE_FX_RATES,
        description="Dated exchange rates to CNY (xietong rates set|load). A price in a currency "
        "with no rate on or before the event's date goes to the dead-letter topic.",
    )
    clean_dedupe_horizon_days: float = Field(
        7.0,
        gt=0,
        description="How long an event_id is remembered after it was cleaned (by the hop's "
        "clock, never by the event's occurred_at); kept on disk under the state dir.",
    )
    clean_dedupe_memory_mb: int = Field(
        16,
        ge=1,
        description="Memory of each partition's on-disk store (write buffers and block cache), "
        "whatever the number of ids it holds.",
    )
    clean_outlier_window: int = Field(
        200, ge=3, description="Recent values per tenant and metric the robust z-score uses."
    )
    clean_outlier_min_history: int = Field(
        20, ge=3, description="Values a tenant's metric needs before outliers are flagged."
    )
    clean_outlier_threshold: float = Field(
        3.5, gt=0, description="|modified z| above this is an outlier."
    )


def load_clean_settings(**overrides: object) -> CleanSettings:
    """Read the environment now; keyword arguments win over it."""
    return CleanSettings(**overrides)  # type: ignore[arg-type]
