"""Settings of the ``xietong`` command line (environment prefix ``XIETONG_``): the gateway it
talks to and the tenant key it uses, on top of the platform settings (Kafka, S3) that the
operator commands need.

Every command that talks to the gateway (``publish``, ``share``, ``subscribe``) reads the one
variable ``XIETONG_GATEWAY_URL``; unset, the gateway is the one this machine's settings would
start (``XIETONG_HTTP_HOST``, ``XIETONG_INGEST_HTTP_PORT``). ``XIETONG_URL``, read by ``share``
and ``subscribe`` before, still works and says it is deprecated.
"""

from __future__ import annotations

import os

import click
from pydantic import Field, SecretStr

from shared.settings import XietongSettings

DEPRECATED_URL_VARIABLE = "XIETONG_URL"
LOOPBACK_FOR = {"", "0.0.0.0", "::"}
"""Hosts a server binds to that a client cannot connect to as such: it uses 127.0.0.1."""


class CliSettings(XietongSettings):
    """The ``xietong`` command line: which gateway, which key."""

    gateway_url: str | None = Field(
        None,
        description="The gateway `publish`, `share` and `subscribe` talk to (`--url` wins). "
        "Unset: http://XIETONG_HTTP_HOST:XIETONG_INGEST_HTTP_PORT, the gateway these settings "
        "start on this machine. Replaces XIETONG_URL (still read, with a deprecation notice).",
    )
    api_key: SecretStr | None = Field(
        None, description="The tenant's API key for the gateway commands (`--api-key` wins)."
    )


def load_cli_settings(**overrides: object) -> CliSettings:
    """Read the environment now; keyword arguments win over it."""
    return CliSettings(**overrides)  # type: ignore[arg-type]


def gateway_url(given: str | None = None) -> str:
    """The gateway URL: ``given`` (``--url``), else ``XIETONG_GATEWAY_URL``, else the deprecated
    ``XIETONG_URL`` (with a notice on stderr), else the local gateway of these settings."""
    if given:
        return given
    settings = load_cli_settings()
    if settings.gateway_url:
        return settings.gateway_url
    old = os.environ.get(DEPRECATED_URL_VARIABLE)
    if old:
        click.echo(
            f"{DEPRECATED_URL_VARIABLE} is deprecated: set XIETONG_GATEWAY_URL instead", err=True
        )
        return old
    # The CLI is a client of the ingest service: it reads that service's port setting.
    from services.ingest.settings import load_ingest_settings

    ingest = load_ingest_settings()
    host = "127.0.0.1" if ingest.http_host in LOOPBACK_FOR else ingest.http_host
    return f"http://{host}:{ingest.ingest_http_port}"


def api_key(given: str | None = None) -> str | None:
    """The tenant key: ``given`` (``--api-key``), else ``XIETONG_API_KEY``."""
    if given:
        return given
    key = load_cli_settings().api_key
    return key.get_secret_value() if key else None
