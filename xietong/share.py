"""``xietong share`` and ``xietong subscribe``: sharing agreements and live insights, from a shell.

Both talk to the gateway with the tenant's API key (``--api-key`` or ``XIETONG_API_KEY``; the
gateway is ``--url`` or ``XIETONG_GATEWAY_URL``, see :func:`xietong.settings.gateway_url`).
``subscribe --as-tenant TENANT`` is the operator's way to read the insight topics directly (the
Kafka of ``xietong --kafka HOST:PORT`` or ``XIETONG_KAFKA_BOOTSTRAP_SERVERS``), filtered by the
same sharing rule (Kafka ACLs are what keeps everyone else off the topics).

To be added to the main group of :mod:`xietong.cli`: ``main.add_command(share)`` and
``main.add_command(subscribe)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import aiohttp
import click

from schemas.insights import (
    Benchmark,
    ClusterAssignment,
    Correlation,
    Insight,
    Prediction,
    Statistics,
    TextInsight,
)
from schemas.topics import INSIGHT_TOPICS
from shared.codec import encode
from shared.sdk import (
    DEFAULT_URL,
    GatewayClient,
    GatewayError,
    InsightFilter,
    ServerSentEvent,
    Subscriber,
)
from shared.settings import XietongSettings, load_settings
from xietong.settings import gateway_url

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def parse_until(value: str | None) -> datetime | None:
    """``2027-01-01`` (midnight UTC) or an RFC 3339 timestamp; naive times are UTC."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a date nor a timestamp") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def split_types(values: tuple[str, ...] | str) -> list[str]:
    """``("statistics,benchmark", "prediction")`` -> three known insight types."""
    raw = [values] if isinstance(values, str) else list(values)
    types = [t.strip() for value in raw for t in value.split(",") if t.strip()]
    unknown = sorted(set(types) - INSIGHT_TOPICS.keys())
    if unknown:
        raise click.BadParameter(
            f"unknown insight type(s) {unknown}; known: {sorted(INSIGHT_TOPICS)}"
        )
    return types


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def describe_insight(insight: Insight) -> str:
    """One line for the terminal: when, what, whose, and the numbers that matter."""
    when = insight.provenance.produced_at
    head = f"{when:%Y-%m-%d %H:%M:%S} {insight.type:<18} {insight.tenant:<14}"
    if isinstance(insight, Statistics):
        detail = (
            f"{insight.metric} n={insight.count} mean={_number(insight.mean)} "
            f"p50={_number(insight.p50)} min={_number(insight.min)} max={_number(insight.max)}"
        )
    elif isinstance(insight, Benchmark):
        quantiles = " ".join(f"{q}={_number(v)}" for q, v in sorted(insight.quantiles.items()))
        where = f"{insight.industry}/{insight.region}"
        detail = f"{insight.metric} {where} firms={insight.firms} {quantiles}"
    elif isinstance(insight, Correlation):
        detail = f"{len(insight.metrics)} metrics: {', '.join(insight.metrics)}"
    elif isinstance(insight, ClusterAssignment):
        detail = (
            f"cluster {insight.cluster} of k={insight.k} silhouette={_number(insight.silhouette)}"
        )
    elif isinstance(insight, Prediction):
        outcome = insight.label if insight.label is not None else _number(insight.value)
        detail = f"{insight.target}={outcome} ({insight.model_name} {insight.model_version})"
    elif isinstance(insight, TextInsight):
        detail = (
            f"[{insight.language}] {insight.label or '-'} sentiment={_number(insight.sentiment)} "
            f"{', '.join(insight.key_terms[:5])}"
        )
    else:
        detail = ""
    window = insight.provenance.window_start
    return f"{head} {detail}" + (f"  (window {window:%Y-%m-%d %H:%M})" if window else "")


def gateway_options(api_key_required: bool = True) -> Callable[[F], F]:
    def decorate(command: F) -> F:
        command = click.option(
            "--api-key",
            "--owner-key",
            "api_key",
            envvar="XIETONG_API_KEY",
            required=api_key_required,
            help="The tenant's API key (env XIETONG_API_KEY).",
        )(command)
        return click.option(
            "--url",
            default=None,
            help="The gateway (default: XIETONG_GATEWAY_URL, else the local gateway "
            f"{DEFAULT_URL} or the port of XIETONG_INGEST_HTTP_PORT).",
        )(command)

    return decorate


def _call(url: str | None, api_key: str, action: Callable[[GatewayClient], Awaitable[T]]) -> T:
    url = gateway_url(url)

    async def go() -> T:
        async with GatewayClient(url, api_key) as client:
            return await action(client)

    try:
        return asyncio.run(go())
    except GatewayError as error:
        raise click.ClickException(str(error)) from None
    except aiohttp.ClientError as error:
        raise click.ClickException(f"cannot reach the gateway at {url}: {error}") from None


def _echo_json(value: Any) -> None:
    click.echo(encode(value).decode())


@click.group()
def share() -> None:
    """Sharing agreements: who may read which of your insights, until when."""


@share.command("grant")
@gateway_options()
@click.option(
    "--to", "grantee", required=True, help="Tenant id of the firm or consumer to share with."
)
@click.option(
    "--types", required=True, help="Insight types, comma-separated (e.g. statistics,prediction)."
)
@click.option(
    "--until",
    help="End of the agreement: a date (UTC midnight) or a timestamp. Default: until revoked.",
)
@click.option("--purpose", default="", help="Why (kept in the audit trail).")
@click.option("--json", "as_json", is_flag=True, help="Print the grant as JSON.")
def grant_command(
    url: str | None,
    api_key: str,
    grantee: str,
    types: str,
    until: str | None,
    purpose: str,
    as_json: bool,
) -> None:
    """Let another tenant read your insights of some types."""
    insight_types = split_types(types)
    expires_at = parse_until(until)
    grant = _call(
        url,
        api_key,
        lambda c: c.grant(grantee, insight_types, expires_at=expires_at, purpose=purpose),
    )
    if as_json:
        _echo_json(grant)
        return
    ending = f"until {grant.expires_at.isoformat()}" if grant.expires_at else "until revoked"
    click.echo(
        f"granted {grant.grant_id}: {grant.grantee} may read {', '.join(grant.insight_types)} "
        f"of {grant.owner} {ending}"
    )


@share.command("revoke")
@gateway_options()
@click.argument("grant_id")
def revoke_command(url: str | None, api_key: str, grant_id: str) -> None:
    """End an agreement now (open streams stop delivering under it)."""
    grant = _call(url, api_key, lambda c: c.revoke(grant_id))
    click.echo(f"revoked {grant.grant_id} ({grant.grantee}: {', '.join(grant.insight_types)})")


def _grant_line(grant: dict[str, Any]) -> str:
    ending = grant.get("expires_at") or "until revoked"
    return (
        f"{grant['grant_id']:<18} {grant['owner']:<16} -> {grant['grantee']:<16} "
        f"{','.join(grant['insight_types']):<28} {grant['status']:<8} {ending}"
    )


@share.command("list")
@gateway_options()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_command(url: str | None, api_key: str, as_json: bool) -> None:
    """Agreements you granted and agreements granted to you."""
    shares = _call(url, api_key, lambda c: c.shares())
    if as_json:
        _echo_json(shares)
        return
    for title, key in (("granted by you", "granted"), ("granted to you", "received")):
        click.echo(f"{title}:")
        for grant in shares[key]:
            click.echo("  " + _grant_line(grant))
        if not shares[key]:
            click.echo("  (none)")


@share.command("audit")
@gateway_options()
@click.option("--json", "as_json", is_flag=True, help="Print NDJSON.")
def audit_command(url: str | None, api_key: str, as_json: bool) -> None:
    """The history of your agreements: granted, revoked, expired."""
    history = _call(url, api_key, lambda c: c.audit())
    for entry in history:
        if as_json:
            _echo_json(entry)
        else:
            click.echo(
                f"{entry['at']} {entry['action']:<8} {entry['grant_id']} {entry['owner']} -> "
                f"{entry['grantee']} {','.join(entry['insight_types'])} {entry.get('purpose', '')}"
            )


def _notice(event: ServerSentEvent) -> None:
    click.echo(f"[{event.event}] {event.data}", err=True)


async def _stream_http(
    url: str,
    api_key: str,
    types: list[str],
    owner: str | None,
    metric: str | None,
    emit: Callable[[Insight], None],
    count: int | None,
) -> None:
    async with (
        GatewayClient(url, api_key) as client,
        client.stream(types=types, owner=owner, metric=metric, on_notice=_notice) as stream,
    ):
        click.echo(f"subscribed to {url} ({', '.join(types) or 'all types'})", err=True)
        seen = 0
        async for insight in stream:
            emit(insight)
            seen += 1
            if count is not None and seen >= count:
                return


async def _stream_kafka(
    settings: XietongSettings,
    tenant: str,
    types: list[str],
    owner: str | None,
    metric: str | None,
    emit: Callable[[Insight], None],
    count: int | None,
) -> None:
    wanted = InsightFilter(owner=owner, metric=metric)
    async with Subscriber(settings, tenant, types=types or None) as subscriber:
        click.echo(f"subscribed to Kafka {settings.kafka_bootstrap_servers} as {tenant}", err=True)
        seen = 0
        async for insight in subscriber:
            if not wanted.matches(insight):
                continue
            emit(insight)
            seen += 1
            if count is not None and seen >= count:
                return


@click.command()
@gateway_options(api_key_required=False)
@click.option("--type", "types", multiple=True, help="Insight type(s); repeat or comma-separate.")
@click.option("--owner", help="Only insights of this tenant.")
@click.option("--metric", help="Only insights about this metric.")
@click.option("--ndjson", is_flag=True, help="One JSON insight per line (for pipes).")
@click.option("--count", type=int, help="Stop after this many insights.")
@click.option(
    "--as-tenant",
    "kafka_tenant",
    metavar="TENANT",
    help="Operator: read the insight topics on Kafka directly, as TENANT sees them (the broker "
    "of `xietong --kafka HOST:PORT` or XIETONG_KAFKA_BOOTSTRAP_SERVERS).",
)
@click.option(
    "--kafka",
    "misplaced_kafka",
    hidden=True,
    help="Not here: --kafka is the bootstrap address, before the command.",
)
@click.pass_obj
def subscribe(
    obj: Any,
    url: str | None,
    api_key: str | None,
    types: tuple[str, ...],
    owner: str | None,
    metric: str | None,
    ndjson: bool,
    count: int | None,
    kafka_tenant: str | None,
    misplaced_kafka: str | None,
) -> None:
    """Show the insights you may read as they arrive (or print them as NDJSON)."""
    if misplaced_kafka is not None:
        raise click.UsageError(
            "--kafka is the Kafka bootstrap address and goes before the command: "
            "`xietong --kafka HOST:PORT subscribe --as-tenant TENANT` reads the topics as TENANT"
        )
    wanted = split_types(types)

    def emit(insight: Insight) -> None:
        if ndjson:
            sys.stdout.write(encode(insight).decode() + "\n")
            sys.stdout.flush()
        else:
            click.echo(describe_insight(insight))

    if kafka_tenant:
        # The group's --kafka (obj) when run as `xietong subscribe`, else the environment.
        settings = obj.settings() if obj is not None else load_settings()
        work = _stream_kafka(settings, kafka_tenant, wanted, owner, metric, emit, count)
    elif api_key:
        url = gateway_url(url)
        work = _stream_http(url, api_key, wanted, owner, metric, emit, count)
    else:
        raise click.UsageError("give --api-key (or XIETONG_API_KEY), or --as-tenant TENANT")
    with contextlib.suppress(KeyboardInterrupt):
        try:
            asyncio.run(work)
        except GatewayError as error:
            raise click.ClickException(str(error)) from None
        except aiohttp.ClientError as error:
            raise click.ClickException(f"cannot reach the gateway at {url}: {error}") from None
