"""Settings of the nlp service (environment prefix ``XIETONG_``: ``XIETONG_NLP_HTTP_PORT``)."""

from __future__ import annotations

from pydantic import Field

from schemas.topics import EVENTS_CLEAN, INSIGHTS_TEXT, INSIGHTS_TEXT_SUMMARY
from shared.settings import XietongSettings


class NlpSettings(XietongSettings):
    """What the nlp service needs beyond the platform settings."""

    nlp_http_port: int = Field(
        8084,
        ge=0,
        le=65535,
        description="Health and metrics port (8085 is the storage service's).",
    )
    nlp_group_id: str = Field("nlp", min_length=1, description="Consumer group of the service.")
    nlp_source_topic: str = Field(EVENTS_CLEAN, description="Clean events in.")
    nlp_insights_topic: str = Field(INSIGHTS_TEXT, description="Per-document text insights out.")
    nlp_summary_topic: str = Field(
        INSIGHTS_TEXT_SUMMARY, description="Per-firm, per-window text summaries out."
    )
    nlp_max_text_bytes: int = Field(
        20_000,
        ge=1,
        description="Longest text (UTF-8 bytes) analysed; longer ones are dead-lettered.",
    )
    nlp_window_seconds: int = Field(
        86_400, ge=60, description="Event-time window of the text summaries."
    )
    nlp_grace_seconds: int = Field(
        3_600, ge=0, description="How late a text may come and still count in its window."
    )
    nlp_top_terms: int = Field(20, ge=1, le=200, description="Terms a summary lists.")
    nlp_key_terms: int = Field(5, ge=1, le=50, description="Key terms per document.")
    nlp_model_alias: str = Field(
        "champion", description="Alias of the registry's models the service scores with."
    )
    nlp_bootstrap_models: bool = Field(
        True,
        description="When the registry has no champion for a task and language, train one from "
        "the shipped and generated examples and register it (the first start of a network).",
    )


def load_nlp_settings(**overrides: object) -> NlpSettings:
    """Read the environment now; keyword arguments win over it."""
    return NlpSettings(**overrides)  # type: ignore[arg-type]
