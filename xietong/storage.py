"""``xietong catalog`` and ``xietong replay``: the storage service's archive from the command line.

Both read the two stores directly (``XIETONG_S3_*`` for the public one,
``XIETONG_STORAGE_PRIVATE_S3_*`` for the private one, as ``.run/local.env`` sets them):

- ``xietong catalog [TENANT]`` — what each tenant has stored, where, under which rule, and who
  may read it (grants read from the control topics);
- ``xietong replay TOPIC --from T --to T --into TARGET [--tenant T]... [--type T]...
  [--fields a,b] [--as GRANTEE] [--dry-run]`` — restore a time range of the archive into a
  topic (same partitions, per-key order, headers), every object checked against its manifest
  first; ``--as`` limits it to what that tenant's agreements let it see.
"""

from __future__ import annotations

import asyncio
from typing import Any

import click
import orjson

from services.storage.catalog import build_catalog
from services.storage.files import FileStore
from services.storage.objects import ArchiveMismatch
from services.storage.placement import Policy
from services.storage.reader import ArchiveReader, parse_moment
from services.storage.replay import replay as run_replay
from services.storage.settings import StorageSettings, load_storage_settings
from services.storage.stores import open_stores
from shared.control import ControlRegistry


def _settings(obj: Any) -> StorageSettings:
    overrides = getattr(obj, "overrides", {}) or {}
    return load_storage_settings(**overrides)


async def _catalog(settings: StorageSettings, tenant: str | None) -> dict[str, Any]:
    async with open_stores(settings) as stores, ControlRegistry(settings) as registry:
        reader = ArchiveReader(stores)
        files = FileStore(settings, stores, Policy.load(settings.storage_policy_file))
        tenants = [tenant] if tenant else sorted(registry.tenants)
        return {
            name: await build_catalog(reader, files, name, registry.grants_by(name))
            for name in tenants
        }


@click.command()
@click.argument("tenant", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_obj
def catalog(obj: Any, tenant: str | None, as_json: bool) -> None:
    """What each tenant has stored, where, under which rule, and who may read it."""
    found = asyncio.run(_catalog(_settings(obj), tenant))
    if as_json:
        click.echo(orjson.dumps(found, option=orjson.OPT_INDENT_2).decode())
        return
    for name, entries in found.items():
        if not entries:
            continue
        click.echo(f"{name}:")
        for e in entries:
            what = e["topic"] if e["what"] == "archive" else f"file {e['name']}"
            size = (
                f"{e['objects']} objects, {e['records']} records"
                if e["what"] == "archive"
                else f"{e['bytes']} bytes"
            )
            click.echo(
                f"  {what:<28} {e['kind']:<20} {e['store']:<8} {e['rule']:<40} {size:<30} "
                f"readers: {', '.join(e['readers'])}"
            )


@click.command()
@click.argument("topic")
@click.option("--from", "start", default=None, help="Start (RFC 3339 or a date), inclusive.")
@click.option("--to", "end", default=None, help="End (RFC 3339 or a date), exclusive.")
@click.option("--into", "target", default=None, help="Target topic (none: a dry run).")
@click.option("--tenant", "tenants", multiple=True, help="Only these owners (repeatable).")
@click.option("--type", "types", multiple=True, help="Only these event/insight types.")
@click.option("--fields", default="", help="Keep only these top-level fields (comma-separated).")
@click.option("--as", "reader", default=None, help="Only what this tenant's agreements allow.")
@click.option("--dry-run", is_flag=True, help="Check and count; send nothing.")
@click.pass_obj
def replay(
    obj: Any,
    topic: str,
    start: str | None,
    end: str | None,
    target: str | None,
    tenants: tuple[str, ...],
    types: tuple[str, ...],
    fields: str,
    reader: str | None,
    dry_run: bool,
) -> None:
    """Restore a time range of TOPIC's archive into a topic (every object checked first)."""
    settings = _settings(obj)
    try:
        begin, finish = parse_moment(start, "--from"), parse_moment(end, "--to")
    except ValueError as error:
        raise click.UsageError(str(error)) from None

    async def go() -> dict[str, Any]:
        async with open_stores(settings) as stores, ControlRegistry(settings) as registry:
            grants = registry.grants_to(reader) if reader else []
            report = await run_replay(
                settings,
                stores,
                topic=topic,
                target=target,
                start=begin,
                end=finish,
                tenants=tenants,
                types=types,
                fields=[f.strip() for f in fields.split(",") if f.strip()],
                reader=reader,
                grants=grants,
                dry_run=dry_run,
            )
            return report.as_dict()

    try:
        click.echo(orjson.dumps(asyncio.run(go()), option=orjson.OPT_INDENT_2).decode())
    except (ArchiveMismatch, ValueError) as error:
        raise click.ClickException(str(error)) from None


async def catalog_summary(settings: StorageSettings | None = None) -> list[str]:
    """A few lines for the demo: objects, records and bytes per store and rule, and files."""
    settings = settings or load_storage_settings()
    if not settings.storage_private_s3_endpoint_url:
        return ["  (no private store configured)"]
    async with open_stores(settings) as stores:
        found = await ArchiveReader(stores).all_manifests()
    totals: dict[tuple[str, str], list[int]] = {}
    for item in found:
        m = item.manifest
        entry = totals.setdefault((m.store, m.rule), [0, 0, 0])
        entry[0] += 1
        entry[1] += m.record_count
        entry[2] += m.object_bytes
    if not totals:
        return [
            "  (nothing archived yet: segments flush every XIETONG_STORAGE_SEGMENT_MAX_SECONDS)"
        ]
    return [
        f"  {store:<8} {rule:<42} {objects:>6,} objects {records:>9,} records {size / 1e6:>8.2f} MB"
        for (store, rule), (objects, records, size) in sorted(totals.items())
    ]
