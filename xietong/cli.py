"""``xietong``: the operator's and the partner's command line.

Operator commands talk to Kafka directly (the control topics, through
:class:`~shared.control.ControlWriter` and :class:`~shared.control.ControlRegistry`):

- ``xietong tenants add TENANT --name N [--industry I] [--region R] [--kind partner|consumer]``
- ``xietong tenants list``
- ``xietong keys issue TENANT [--label L]`` — prints the key once; only its digest is stored
- ``xietong keys revoke KEY_ID``
- ``xietong keys list [TENANT]`` — never a secret

Publishing: ``xietong publish FILE [--type T] [--schema-version N]`` sends a CSV, NDJSON or
JSON-array file to the gateway (``--url`` or ``XIETONG_GATEWAY_URL``, key from ``--api-key`` or
``XIETONG_API_KEY``) or, with
``--direct --tenant T``, straight to Kafka through the same validation as the gateway
(:mod:`services.ingest.intake`). The file goes in batches of ``--batch-size`` records with a
progress bar; the summary lists accepted and refused records with each refusal's reason. The
exit status is 0 when every record was accepted, 2 when some were refused, 1 on an error that
stopped the upload (what was acknowledged before stays published: re-running the same file is
safe, event ids repeat and the clean service drops the repeats).

Commands are grouped under :func:`main` with ``@main.group()`` / ``@main.command()``, so more
(``share``, ``subscribe``, ``models``) can be added beside them. One option name means one thing
in every command: ``--kafka HOST:PORT`` is the bootstrap address (of the group), ``--url`` the
gateway, ``--tenant`` a tenant acted for, ``--as-tenant`` the tenant whose view is read,
``--version`` (of the group) the program's version and ``--schema-version`` a payload version.
Settings from the environment are :class:`xietong.settings.CliSettings`.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from schemas.control import Tenant
from schemas.events import latest_version
from schemas.topics import EVENTS_RAW, dlq
from shared.control import ControlRegistry, ControlWriter, issue_api_key
from shared.kafka import BatchPublisher, create_producer, ensure_topics, kafka_problem, started
from shared.settings import XietongSettings
from xietong.models import models
from xietong.nlp import nlp
from xietong.rates import rates
from xietong.settings import gateway_url, load_cli_settings
from xietong.share import share, subscribe
from xietong.storage import catalog, replay

T = TypeVar("T")

FORMATS = {".csv": "csv", ".ndjson": "ndjson", ".jsonl": "ndjson", ".json": "json"}
MEDIA = {"csv": "text/csv", "ndjson": "application/x-ndjson", "json": "application/json"}


@dataclass
class CliContext:
    """What the group options set: how to reach Kafka."""

    overrides: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> XietongSettings:
        return load_cli_settings(**self.overrides)


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


async def loaded_registry(settings: XietongSettings) -> ControlRegistry:
    """A registry that has read everything written so far (stop it after use)."""
    registry = ControlRegistry(settings)
    await registry.start()
    return registry


def with_registry(settings: XietongSettings, work: Callable[[ControlRegistry], T]) -> T:
    async def go() -> T:
        registry = await loaded_registry(settings)
        try:
            return work(registry)
        finally:
            await registry.stop()

    return asyncio.run(go())


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, *rows]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def moment(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value else "-"


class KafkaAwareGroup(click.Group):
    """The top-level group: a Kafka failure ends any command with one line saying what is wrong
    and what to run (``Error: Kafka at 127.0.0.1:9092 is not reachable — is it running? ...``,
    exit status 1), never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        # aiokafka's own warnings would reach stderr through logging's last resort: the one
        # line below says it all
        logging.getLogger("aiokafka").addHandler(logging.NullHandler())
        try:
            return super().invoke(ctx)
        except (KafkaError, TimeoutError, ConnectionError) as error:
            bootstrap = ctx.obj.settings().kafka_bootstrap_servers if ctx.obj else "Kafka"
            raise click.ClickException(kafka_problem(error, bootstrap)) from None


@click.group(cls=KafkaAwareGroup)
@click.version_option(package_name="xietong", prog_name="xietong", message="%(prog)s %(version)s")
@click.option(
    "--kafka",
    "bootstrap",
    default=None,
    metavar="HOST:PORT",
    help="Kafka bootstrap servers (default: XIETONG_KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:9092).",
)
@click.pass_context
def main(ctx: click.Context, bootstrap: str | None) -> None:
    """Xietong: operate the network (tenants, keys) and publish events."""
    overrides: dict[str, Any] = {}
    if bootstrap:
        overrides["kafka_bootstrap_servers"] = bootstrap
    ctx.obj = CliContext(overrides)


# --------------------------------------------------------------------------- tenants


@main.group()
def tenants() -> None:
    """Participants of the network."""


@tenants.command("add")
@click.argument("tenant")
@click.option("--name", required=True, help="Display name.")
@click.option("--industry", default="unknown", show_default=True, help="Industry (benchmarks).")
@click.option("--region", default="unknown", show_default=True, help="Region (benchmarks).")
@click.option(
    "--kind",
    type=click.Choice(["partner", "consumer"]),
    default="partner",
    show_default=True,
    help="partner: publishes and subscribes; consumer: subscribes only.",
)
@click.pass_obj
def tenants_add(
    obj: CliContext, tenant: str, name: str, industry: str, region: str, kind: str
) -> None:
    """Add a tenant (or update its name, industry, region and kind)."""
    settings = obj.settings()
    existing = with_registry(settings, lambda registry: registry.tenant(tenant))
    try:
        record = Tenant(
            tenant=tenant,
            name=name,
            kind=kind,  # type: ignore[arg-type]
            industry=industry,
            region=region,
            created_at=existing.created_at if existing else datetime.now(UTC),
        )
    except ValidationError as error:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in error.errors())
        raise click.BadParameter(problems, param_hint="TENANT/options") from None

    async def put() -> None:
        async with ControlWriter(settings) as writer:
            await writer.put_tenant(record)

    run(put())
    click.echo(f"tenant {tenant} {'updated' if existing else 'added'} ({kind})")


@tenants.command("list")
@click.pass_obj
def tenants_list(obj: CliContext) -> None:
    """List the tenants."""
    found = with_registry(
        obj.settings(), lambda registry: sorted(registry.tenants.values(), key=lambda t: t.tenant)
    )
    rows = [
        [t.tenant, t.kind, t.name, t.industry, t.region, "active" if t.active else "inactive"]
        for t in found
    ]
    click.echo(table(rows, ["TENANT", "KIND", "NAME", "INDUSTRY", "REGION", "STATUS"]))


# --------------------------------------------------------------------------- keys


@main.group()
def keys() -> None:
    """API keys of tenants (stored as digests; a key is shown once, when issued)."""


@keys.command("issue")
@click.argument("tenant")
@click.option("--label", default="", help="What the key is for (shown in `keys list`).")
@click.pass_obj
def keys_issue(obj: CliContext, tenant: str, label: str) -> None:
    """Issue a key for TENANT and print it (once: store it now)."""
    settings = obj.settings()
    known = with_registry(settings, lambda registry: registry.tenant(tenant))
    if known is None or not known.active:
        raise click.ClickException(
            f"no active tenant {tenant!r}: add it with `xietong tenants add`"
        )
    plaintext, record = issue_api_key(tenant, label)

    async def put() -> None:
        async with ControlWriter(settings) as writer:
            await writer.put_key(record)

    run(put())
    click.echo(f"key {record.key_id} issued for {tenant}; it is shown only now:", err=True)
    click.echo(plaintext)


@keys.command("revoke")
@click.argument("key_id")
@click.pass_obj
def keys_revoke(obj: CliContext, key_id: str) -> None:
    """Revoke a key: every gateway refuses it within moments."""
    settings = obj.settings()
    record = with_registry(settings, lambda registry: registry.keys.get(key_id))
    if record is None:
        raise click.ClickException(f"no key {key_id!r}")
    if record.revoked_at is not None:
        click.echo(f"key {key_id} was already revoked at {moment(record.revoked_at)}")
        return

    async def put() -> None:
        async with ControlWriter(settings) as writer:
            await writer.put_key(record.model_copy(update={"revoked_at": datetime.now(UTC)}))

    run(put())
    click.echo(f"key {key_id} of {record.tenant} revoked")


@keys.command("list")
@click.argument("tenant", required=False)
@click.pass_obj
def keys_list(obj: CliContext, tenant: str | None) -> None:
    """List keys (all, or TENANT's): ids, labels and dates, never secrets."""
    found = with_registry(
        obj.settings(),
        lambda registry: sorted(
            (k for k in registry.keys.values() if tenant is None or k.tenant == tenant),
            key=lambda k: (k.tenant, k.created_at),
        ),
    )
    rows = [
        [
            k.key_id,
            k.tenant,
            k.label or "-",
            moment(k.created_at),
            "revoked " + moment(k.revoked_at) if k.revoked_at else "active",
        ]
        for k in found
    ]
    click.echo(table(rows, ["KEY_ID", "TENANT", "LABEL", "CREATED", "STATUS"]))


# --------------------------------------------------------------------------- publish


@dataclass
class Chunk:
    """A batch of the file: its body as the gateway takes it, and where it starts."""

    body: bytes
    first: int
    records: int


@dataclass
class Outcome:
    accepted: int = 0
    refused: int = 0
    refusals: list[tuple[int, str, str]] = field(default_factory=list)

    def add(self, answer: dict[str, Any], first: int) -> None:
        self.accepted += answer["accepted"]
        self.refused += answer["refused"]
        self.refusals += [(first + r["index"], r["field"], r["reason"]) for r in answer["refusals"]]


def chunks_of(
    data: bytes, fmt: str, size: int, type_name: str | None, version: int | None
) -> Iterator[Chunk]:
    """Split a file into gateway-sized bodies; indices of refusals stay file-wide."""
    if fmt == "csv":
        rows = csv.reader(io.StringIO(data.decode("utf-8-sig")))
        header = next(rows, None)
        if header is None:
            raise click.ClickException("the CSV file is empty")
        batch: list[list[str]] = []
        first = 0
        for row in rows:
            if not row or all(not cell.strip() for cell in row):
                continue
            batch.append(row)
            if len(batch) == size:
                yield Chunk(_csv_body(header, batch), first, len(batch))
                first += len(batch)
                batch = []
        if batch:
            yield Chunk(_csv_body(header, batch), first, len(batch))
        return
    if fmt == "ndjson":
        lines = data.split(b"\n")
        if lines and not lines[-1].strip():
            lines.pop()
        for start in range(0, len(lines), size):
            part = [_with_type(line, type_name, version) for line in lines[start : start + size]]
            count = sum(1 for line in part if line.strip())
            yield Chunk(b"\n".join(part) + b"\n", start, count)
        return
    try:
        records = orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise click.ClickException(f"the file is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise click.ClickException("a .json file must hold a JSON array of events")
    for start in range(0, len(records), size):
        part = [_typed(r, type_name, version) for r in records[start : start + size]]
        yield Chunk(orjson.dumps(part), start, len(part))


def _csv_body(header: list[str], rows: list[list[str]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def _typed(record: Any, type_name: str | None, version: int | None) -> Any:
    if type_name and isinstance(record, dict) and "type" not in record:
        record = {**record, "type": type_name}
        if "schema_version" not in record:
            record["schema_version"] = version or latest_version(type_name)
    return record


def _with_type(line: bytes, type_name: str | None, version: int | None) -> bytes:
    if not type_name or not line.strip():
        return line
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line  # the gateway refuses it with the reason
    typed = _typed(record, type_name, version)
    return line if typed is record else orjson.dumps(typed)


RETRIED_STATUSES = frozenset({502, 503, 504})


async def _publish_http(
    chunks: list[Chunk],
    fmt: str,
    url: str,
    api_key: str,
    params: dict[str, str],
    progress: Any,
    retries: int = 3,
) -> Outcome:
    """POST each chunk; a 502/503/504 or a lost connection is retried with back-off — safe,
    because a chunk re-sent carries the same event ids (the clean service drops repeats)."""
    import aiohttp

    outcome = Outcome()
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": MEDIA[fmt]}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    endpoint = f"{url.rstrip('/')}/v1/events"
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for chunk in chunks:
            span = f"records {chunk.first}-{chunk.first + chunk.records - 1}"
            for attempt in range(retries + 1):
                problem = ""
                try:
                    async with session.post(
                        endpoint, data=chunk.body, headers=headers, params=params
                    ) as response:
                        try:
                            answer = await response.json(content_type=None)
                        except ValueError:
                            answer = {"error": (await response.text())[:500]}
                        if response.status == 202:
                            break
                        problem = f"the gateway answered {response.status} for {span}: " + str(
                            answer.get("error", answer) if isinstance(answer, dict) else answer
                        )
                        if response.status not in RETRIED_STATUSES:
                            raise click.ClickException(
                                f"{problem} (accepted so far: {outcome.accepted})"
                            )
                except aiohttp.ClientError as error:
                    problem = f"cannot reach the gateway at {url}: {error}"
                if attempt == retries:
                    raise click.ClickException(
                        f"{problem} (after {retries + 1} attempts; accepted so far: "
                        f"{outcome.accepted})"
                    )
                click.echo(f"{problem}; retrying", err=True)
                await asyncio.sleep(0.5 * 2**attempt)
            outcome.add(answer, chunk.first)
            progress.update(chunk.records)
    return outcome


async def _publish_direct(
    chunks: list[Chunk],
    fmt: str,
    settings: XietongSettings,
    tenant: str,
    type_name: str | None,
    version: int | None,
    progress: Any,
) -> Outcome:
    # The CLI reuses the gateway's parsers and intake (imported here, not at start-up: the
    # operator commands need none of it).
    from services.ingest.csvmap import CsvError, parse_csv
    from services.ingest.handlers import (
        Parsed,
        RequestError,
        parse_json_array,
        split_ndjson,
        validate_parsed,
    )
    from services.ingest.intake import ForeignTenant, publish_intake

    registry = await loaded_registry(settings)
    try:
        known = registry.tenant(tenant)
    finally:
        await registry.stop()
    if known is None or not known.active or known.kind == "consumer":
        raise click.ClickException(f"no active partner tenant {tenant!r} to publish for")
    await ensure_topics(settings, [EVENTS_RAW, dlq(EVENTS_RAW)])
    outcome = Outcome()
    source_ref = f"cli:{uuid.uuid4().hex}"
    async with started(create_producer(settings)) as producer:
        publisher = BatchPublisher(producer)
        for chunk in chunks:
            try:
                if fmt == "csv":
                    assert type_name is not None and version is not None
                    items = parse_csv(chunk.body, tenant, type_name, version)
                    parsed = Parsed(items, "csv", source_system="csv")
                else:
                    parsed = (split_ndjson if fmt == "ndjson" else parse_json_array)(chunk.body)
                    parsed.source_system = "cli"
                intake = validate_parsed(parsed, tenant, settings.event_time_bounds())
            except (CsvError, RequestError) as error:
                raise click.ClickException(str(error)) from None
            except ForeignTenant as error:
                raise click.ClickException(
                    f"{error} (nothing of this batch was published)"
                ) from None
            await publish_intake(
                publisher, intake, tenant, source_ref=f"{source_ref}@{chunk.first}"
            )
            outcome.add(
                {
                    "accepted": len(intake.accepted),
                    "refused": len(intake.refused),
                    "refusals": [
                        {"index": r.index, "field": e.field, "reason": e.reason}
                        for r in intake.refused
                        for e in r.errors
                    ],
                },
                chunk.first,
            )
            progress.update(chunk.records)
    return outcome


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--type", "type_name", help="Event type (required for CSV; fills records without one)."
)
@click.option(
    "--schema-version",
    "version",
    type=click.IntRange(min=1),
    default=None,
    help="Payload version, the records' schema_version (default: the latest).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "ndjson", "json"]),
    default=None,
    help="File format (default: from the extension: .csv, .ndjson/.jsonl, .json).",
)
@click.option(
    "--url",
    default=None,
    help="The gateway (default: XIETONG_GATEWAY_URL, else the local gateway on "
    "XIETONG_INGEST_HTTP_PORT, 8080).",
)
@click.option(
    "--api-key", envvar="XIETONG_API_KEY", default=None, help="Tenant key (or XIETONG_API_KEY)."
)
@click.option(
    "--direct", is_flag=True, help="Publish straight to Kafka (operator), not via the gateway."
)
@click.option("--tenant", default=None, help="With --direct: the tenant the records belong to.")
@click.option("--batch-size", type=click.IntRange(1, 1_000_000), default=5000, show_default=True)
@click.option(
    "--retries",
    type=click.IntRange(0, 20),
    default=3,
    show_default=True,
    help="Re-sends of a batch the gateway could not publish (503) or did not answer.",
)
@click.option("--show", type=int, default=20, show_default=True, help="Refusals to print.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_obj
def publish(
    obj: CliContext,
    file: Path,
    type_name: str | None,
    version: int | None,
    fmt: str | None,
    url: str | None,
    api_key: str | None,
    direct: bool,
    tenant: str | None,
    batch_size: int,
    retries: int,
    show: int,
    no_progress: bool,
) -> None:
    """Publish FILE (CSV, NDJSON or a JSON array) and summarise what was accepted and refused."""
    from tqdm import tqdm

    fmt = fmt or FORMATS.get(file.suffix.lower())
    if fmt is None:
        raise click.UsageError(f"cannot tell the format of {file.name}: use --format")
    if fmt == "csv":
        if not type_name:
            raise click.UsageError("a CSV file needs --type")
        from services.ingest.csvmap import CsvError, resolve_type

        try:
            type_name, version = resolve_type(type_name, None if version is None else str(version))
        except CsvError as error:
            raise click.UsageError(str(error)) from None
    if direct and not tenant:
        raise click.UsageError("--direct needs --tenant")
    if not direct and not api_key:
        raise click.UsageError("a key is needed: --api-key or XIETONG_API_KEY (or --direct)")

    chunks = list(chunks_of(file.read_bytes(), fmt, batch_size, type_name, version))
    total = sum(chunk.records for chunk in chunks)
    with tqdm(total=total, unit="rec", file=sys.stderr, disable=no_progress, desc=file.name) as bar:
        if direct:
            assert tenant is not None
            outcome = run(
                _publish_direct(chunks, fmt, obj.settings(), tenant, type_name, version, bar)
            )
        else:
            assert api_key is not None
            params = (
                {"type": type_name, "version": str(version)} if fmt == "csv" and type_name else {}
            )
            where = gateway_url(url)
            outcome = run(_publish_http(chunks, fmt, where, api_key, params, bar, retries))

    click.echo(f"{total} records: {outcome.accepted} accepted, {outcome.refused} refused")
    if outcome.refusals:
        reasons = Counter(reason.partition(":")[0] for _, _, reason in outcome.refusals)
        click.echo(
            "refusals by reason: " + ", ".join(f"{r} ({n})" for r, n in reasons.most_common())
        )
        for index, field_name, reason in outcome.refusals[:show]:
            click.echo(f"  record {index}: {field_name or '(record)'}: {reason}")
        if len(outcome.refusals) > show:
            click.echo(f"  ... and {len(outcome.refusals) - show} more (--show N)")
        sys.exit(2)


# Sharing agreements and subscriptions act with a tenant's key through the gateway.
main.add_command(share)
main.add_command(subscribe)
main.add_command(catalog)
main.add_command(replay)
# The model registry (the ml and nlp services' models) on the control topics and S3.
main.add_command(models)
# Dated exchange rates (reference.fx-rates.v1), which the clean service converts with.
main.add_command(rates)
# Training the nlp service's text classifiers from a labelled file or labelled events.
main.add_command(nlp)
