"""Settings of the ingest gateway (environment prefix ``XIETONG_``: ``XIETONG_INGEST_HTTP_PORT``,
``XIETONG_INGEST_METRICS_PORT``, ``XIETONG_INGEST_MAX_BODY_BYTES``)."""

from __future__ import annotations

from pydantic import Field

from shared.settings import XietongSettings


class IngestSettings(XietongSettings):
    """What the gateway needs beyond the platform settings."""

    ingest_http_port: int = Field(
        8080, ge=0, le=65535, description="Partner-facing port of the HTTP gateway."
    )
    ingest_metrics_port: int = Field(
        8090,
        ge=0,
        le=65535,
        description="Operator port: Prometheus /metrics, /healthz and /readyz (never on the "
        "partner port, which keeps /healthz and /readyz for load balancers).",
    )
    ingest_max_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1,
        description="Largest request body, counted while it is read (after decompression): 413.",
    )
    ingest_publish_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="How long a request waits for Kafka's acknowledgements before answering 503 "
        "with Retry-After (an idempotent producer never gives a batch up by itself: without this "
        "bound a request would wait out a broker outage). A broker known to be away is answered "
        "503 at once.",
    )
    ingest_producers: int = Field(
        1,
        ge=1,
        le=16,
        description="Producers publishing rounds in parallel (group-commit lanes; a producer has "
        "one request in flight per partition). On one small broker more lanes measured no gain.",
    )
    ingest_with_insights: bool = Field(
        True, description="Also serve the insight and sharing routes (services.ingest.insights)."
    )


def load_ingest_settings(**overrides: object) -> IngestSettings:
    """Read the environment now; keyword arguments win over it."""
    return IngestSettings(**overrides)  # type: ignore[arg-type]
