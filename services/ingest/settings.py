"""Settings of the ingest gateway (environment prefix ``XIETONG_``: ``XIETONG_INGEST_HTTP_PORT``,
``XIETONG_INGEST_METRICS_PORT``, ``XIETONG_INGEST_MAX_BODY_BYTES``)."""

from __future__ import annotations

from pydantic import Field, SecretStr

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
    ingest_insights_per_series: int = Field(
        50,
        ge=1,
        le=5000,
        description="Latest insights the gateway keeps per series (owner, type, metric) for "
        "GET /v1/insights and the console (a year of daily windows: 366).",
    )
    operator_token: SecretStr | None = Field(
        None,
        description="Bearer token of the operator view (/v1/operator/*, the console's operator "
        "page); unset: those routes answer 404. `make up` and the demo generate one into the run "
        "folder's local.env.",
    )
    operator_scrape: dict[str, str] = Field(
        default_factory=lambda: {
            "ingest": "http://127.0.0.1:8090",
            "clean": "http://127.0.0.1:8081",
            "analytics": "http://127.0.0.1:8082",
            "ml": "http://127.0.0.1:8083",
            "nlp": "http://127.0.0.1:8084",
            "storage": "http://127.0.0.1:8085",
        },
        description="Service -> base URL of its health and Prometheus port, read by the operator "
        "view (JSON object).",
    )


def load_ingest_settings(**overrides: object) -> IngestSettings:
    """Read the environment now; keyword arguments win over it."""
    return IngestSettings(**overrides)  # type: ignore[arg-type]
