"""Settings from the environment, one prefix (``XIETONG_``) for the whole platform.

Settings are built by :func:`load_settings` (or a service's own ``load_*`` function) when a
process starts, never at import time, so tests can override any of them. Secrets are
``SecretStr`` and come only from the environment.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import AwareDatetime, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.events import EventTimeBounds


class XietongSettings(BaseSettings):
    """What every service needs: where Kafka and S3 are, how to batch, how to log."""

    model_config = SettingsConfigDict(env_prefix="XIETONG_", frozen=True, extra="ignore")

    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092", description="Comma-separated host:port list of the Kafka brokers."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="How clients talk to the brokers: PLAINTEXT, SSL, SASL_*."
    )
    kafka_sasl_mechanism: str | None = Field(
        None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user of every client.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password.")
    kafka_ssl_cafile: str | None = Field(
        None, description="CA bundle (PEM file) that signed the brokers' certificates."
    )
    kafka_partitions: int = Field(6, ge=1, description="Partitions of topics the platform creates.")
    kafka_replication_factor: int = Field(
        1, ge=1, description="Replicas of each topic the platform creates (3 in production)."
    )
    kafka_linger_ms: int = Field(5, ge=0, description="Producer linger: how long a batch may wait.")
    kafka_max_batch_bytes: int = Field(
        256 * 1024,
        description="Producer batch size (aiokafka's 16 KiB default stalls under load).",
    )
    kafka_fetch_max_records: int = Field(5000, ge=1, description="Records per getmany batch.")
    kafka_fetch_timeout_ms: int = Field(
        200, ge=1, description="How long getmany waits for records."
    )
    kafka_unready_after_seconds: float = Field(
        10.0,
        gt=0,
        description="A service whose loops made no progress with Kafka, or whose broker did not "
        "answer, for this long says so on /readyz (503).",
    )

    s3_endpoint_url: str | None = Field(None, description="S3 endpoint; None means AWS itself.")
    s3_region: str = Field("us-east-1", description="Region the S3 requests are signed for.")
    s3_access_key_id: SecretStr | None = Field(
        None, description="S3 access key id (public store and model registry)."
    )
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret access key.")

    models_bucket: str = Field(
        "xietong-models",
        min_length=3,
        description="Object-store bucket of the model registry's artifacts (shared.models).",
    )

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR.")
    log_format: Literal["json", "text"] = Field(
        "json", description="json: one object per line (for collectors); text: for people."
    )
    http_host: str = Field("127.0.0.1", description="Where health, metrics and APIs listen.")
    state_dir: str = Field(
        ".run/state", description="Local state (RocksDB tables, file-drop memory)."
    )
    network_secret: SecretStr | None = Field(
        None,
        description="Secret of the network: keys insight ids and the benchmark noise. Required "
        "by the analytics service; the same for all its replicas, kept across restarts.",
    )

    def network_key(self) -> bytes:
        """The network secret's bytes; exits with a one-line message when it is not set."""
        secret = self.network_secret.get_secret_value() if self.network_secret else ""
        if not secret:
            raise SystemExit(
                "XIETONG_NETWORK_SECRET is not set: the analytics service keys insight ids and "
                "benchmark noise with it (make up writes one to .run/local.env)"
            )
        return secret.encode()

    event_time_max_ahead_seconds: float = Field(
        3600.0,
        ge=0,
        description="How far ahead of the moment it is received an event's occurred_at may be "
        "(ingest, connectors and clean refuse it beyond).",
    )
    event_time_earliest: AwareDatetime = Field(
        datetime(2000, 1, 1, tzinfo=UTC),
        description="Events that occurred before this are refused as implausible.",
    )

    control_sync_interval_seconds: float = Field(
        1.0,
        gt=0,
        description="How often a control registry asks the broker where the control topics end "
        "and reads up to there (bounds how long a revocation takes to apply).",
    )
    control_max_staleness_seconds: float = Field(
        10.0,
        gt=0,
        description="A control registry not confirmed caught up for this long fails closed: it "
        "vouches for no key (the gateway answers 503 and is not ready) until it is again.",
    )

    def event_time_bounds(self) -> EventTimeBounds:
        """The bounds of ``occurred_at`` that every way in applies."""
        return EventTimeBounds(
            max_ahead=timedelta(seconds=self.event_time_max_ahead_seconds),
            earliest=self.event_time_earliest,
        )


def load_settings(**overrides: object) -> XietongSettings:
    """Read the environment now; keyword arguments win over it (handy in tests)."""
    return XietongSettings(**overrides)  # type: ignore[arg-type]


class LocalSettings(BaseSettings):
    """The local platform of ``make up`` / ``make demo`` (``deploy.local.infra``): where it keeps
    its data and which ports its Kafka broker and SeaweedFS servers take. The services do not read
    these: ``make up`` writes where the broker and the stores listen to ``.run/local.env``
    (``XIETONG_KAFKA_BOOTSTRAP_SERVERS``, ``XIETONG_S3_ENDPOINT_URL`` ...)."""

    # deploy.local.infra reads these names with the standard library (it runs before the venv
    # exists); tests/deploy/test_settings_doc.py checks it reads exactly these.
    model_config = SettingsConfigDict(env_prefix="XIETONG_", frozen=True, extra="ignore")

    run_dir: str = Field(
        ".run", description="The local platform's folder: broker log, stores, state, logs, keys."
    )
    local_kafka_port: int = Field(
        9092, ge=1, le=65535, description="Port of the local broker (alias: KAFKA_PORT)."
    )
    local_kafka_controller_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Its KRaft controller port; unset: the broker port + 1 (alias: "
        "KAFKA_CONTROLLER_PORT).",
    )
    local_s3_port: int = Field(
        8333,
        ge=1,
        le=65535,
        description="S3 port of the local public store; SeaweedFS also opens the seven below "
        "it and their +10000 gRPC twins (alias: S3_PORT).",
    )
    local_s3_private_port: int = Field(
        8433,
        ge=1,
        le=65535,
        description="S3 port of the local private store (alias: S3_PRIVATE_PORT).",
    )
