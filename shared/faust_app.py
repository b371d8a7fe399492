"""A Faust app factory on the platform settings, for services whose state earns Faust's cost
(tables, windows, changelog recovery) — typically at the rate of pre-aggregated partials."""

from __future__ import annotations

import ssl
from typing import Any

from shared.codec import register_faust_codec
from shared.settings import XietongSettings


def create_faust_app(
    service: str, settings: XietongSettings, *, store: str | None = None, **options: Any
) -> Any:
    """One ``faust.App`` per service: consumer group = service name, RocksDB tables by default
    (``store="memory://"`` in unit tests), the platform's JSON codec."""
    import faust  # imported here: Faust is heavy and most processes never need it

    register_faust_codec()
    broker = ",".join(f"kafka://{server}" for server in settings.kafka_bootstrap_servers.split(","))
    options.setdefault("datadir", f"{settings.state_dir}/faust-{service}")
    credentials = _broker_credentials(settings)
    if credentials is not None:
        options.setdefault("broker_credentials", credentials)
    return faust.App(
        service,
        broker=broker,
        store=store or f"rocksdb://{settings.state_dir}/{service}",
        value_serializer="xietong-json",
        key_serializer="raw",
        topic_partitions=settings.kafka_partitions,
        topic_replication_factor=settings.kafka_replication_factor,
        web_enabled=False,
        **options,
    )


def _broker_credentials(settings: XietongSettings) -> Any:
    """SASL/TLS for Faust from the same settings the aiokafka helpers use."""
    import faust

    protocol = settings.kafka_security_protocol
    ssl_context = None
    if protocol in ("SSL", "SASL_SSL"):
        ssl_context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_sasl_mechanism:
        password = settings.kafka_sasl_password
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password.get_secret_value() if password else None,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=ssl_context,
        )
    if ssl_context is not None:
        return faust.SSLCredentials(ssl_context)
    return None
