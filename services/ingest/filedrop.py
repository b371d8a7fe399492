"""File-drop connector: CSV / NDJSON exports dropped in a folder -> Xietong events.

A folder belongs to one tenant. Every ``--interval`` seconds the connector lists the folder
(``*.csv``, ``*.ndjson``, ``*.jsonl``; hidden files ignored) and ingests the files that are
complete: a ``<name>.done`` marker next to the file, or the same size and modification time at
two consecutive polls (an ERP still writing the export is left alone).

Which event type a file holds, first match wins:

1. a ``files:`` entry of the mapping file (:mod:`.mapping`) whose glob matches the name: its
   columns are converted as the mapping says;
2. the name convention ``<tenant>__<type>__anything.csv`` (the tenant must be the folder's);
3. ``--type``.

Without a mapping entry, CSV columns are the payload's field names plus ``occurred_at`` (read by
:mod:`.csvmap`, as the HTTP gateway reads CSV), and an NDJSON line is either a whole event or a
flat object of payload fields plus ``occurred_at``.

Produces ``events.raw.v1`` (key: tenant); refused records go to ``events.raw.v1.dlq`` with the row,
the reasons and ``source_ref = "file:<name>#<row>"``. All records of a file are acknowledged by
Kafka (``acks=all``) before the file counts as ingested.

Each file is published once: the connector remembers ``(name, sha256 of the content)`` in a JSON
state file under ``XIETONG_STATE_DIR`` — the same file dropped again is skipped, a file rewritten
with new content is ingested again. Event ids are ``uuid5(tenant, type, content of the record,
occurrence)``, so a re-run after a crash (before the state was saved) and the unchanged rows of a
rewritten export repeat their ids, and the clean service's de-duplication drops them.

Afterwards the file moves to ``<dir>/.done/``; a file that cannot be parsed, or whose every record
was refused, moves to ``<dir>/.failed/`` with ``<name>.error.json`` next to it saying why.

Run::

    python -m services.ingest.filedrop --dir /srv/drop/acme \
        --mapping deploy/mappings/acme-filedrop.yaml
    python -m services.ingest.filedrop --dir /srv/drop/acme --tenant acme --type sales_order_line
    python -m services.ingest.filedrop ... --once      # one pass over what is there, then exit
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import hashlib
import io
import logging
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson

from schemas.events import (
    DEFAULT_EVENT_TIME,
    EVENT_TYPES,
    PAYLOADS,
    EventTimeBounds,
    latest_version,
)
from schemas.insights import FieldError
from schemas.topics import EVENTS_RAW, dlq
from services.ingest.csvmap import CsvError, parse_csv
from services.ingest.intake import (
    ForeignTenant,
    Incoming,
    Intake,
    Refused,
    publish_intake,
    validate_records,
)
from services.ingest.mapping import FileMapping, Mapping, MappingError, MappingFailure, load_mapping
from shared.codec import DecodeError, decode, encode
from shared.kafka import BatchPublisher, create_producer, ensure_topics, started, stop_on_signals
from shared.logs import configure_logging
from shared.settings import XietongSettings, load_settings

log = logging.getLogger(__name__)

FILE_NAMESPACE = uuid.UUID("3b9d7a4e-1f2c-5e8d-a6b0-c4d2e1f09a87")
"""Namespace of the deterministic event ids of file records (never change it)."""

KINDS = {".csv": "csv", ".ndjson": "ndjson", ".jsonl": "ndjson"}
MARKER = ".done"
DONE_DIR, FAILED_DIR = ".done", ".failed"
NAME_CONVENTION = re.compile(r"^(?P<tenant>[a-z0-9][a-z0-9_-]{1,62})__(?P<type>[A-Za-z0-9_]+)__")
ENVELOPE_KEYS = frozenset({"event_id", "occurred_at", "record_id", "operation", "corrects"})
PUBLISH_CHUNK = 10_000
REPORTED_REFUSALS = 1_000


class FileFailure(ValueError):
    """The whole file is unusable (unreadable, wrong header, no event type, foreign tenant)."""


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file."""

    name: str
    status: Literal["ingested", "skipped", "failed"]
    accepted: int = 0
    refused: int = 0
    error: str | None = None
    moved_to: Path | None = None


@dataclass
class IngestState:
    """``(file name, sha256)`` of every file ingested, kept in a small JSON file."""

    path: Path
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> IngestState:
        try:
            data = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return cls(path)
        return cls(path, dict(data.get("files", {})))

    @staticmethod
    def key(name: str, sha256: str) -> str:
        return f"{name}@{sha256}"

    def seen(self, name: str, sha256: str) -> bool:
        return self.key(name, sha256) in self.files

    def remember(self, name: str, sha256: str, **facts: Any) -> None:
        """Record the file and write the state atomically (a crash leaves the old or the new)."""
        self.files[self.key(name, sha256)] = {"name": name, "sha256": sha256, **facts}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_suffix(".tmp")
        scratch.write_bytes(
            orjson.dumps({"version": 1, "files": self.files}, option=orjson.OPT_INDENT_2)
        )
        os.replace(scratch, self.path)


def state_path(state_dir: str | Path, tenant: str, directory: Path) -> Path:
    """Where the memory of one watched folder lives (one file per tenant and folder)."""
    digest = hashlib.sha1(str(directory.resolve()).encode(), usedforsecurity=False).hexdigest()
    return Path(state_dir) / "filedrop" / f"{tenant}-{digest[:12]}.json"


def content_digest(record: dict[str, Any]) -> str:
    """sha256 of a record's canonical JSON (sorted keys)."""
    return hashlib.sha256(
        orjson.dumps(record, option=orjson.OPT_SORT_KEYS, default=str)
    ).hexdigest()


def content_event_id(tenant: str, type_name: str, digest: str, occurrence: int) -> str:
    """The id of a record from its content: the same row in a re-dropped export keeps its id.

    ``occurrence`` counts identical records before this one in the file, so two equal rows
    stay two events.
    """
    return str(uuid.uuid5(FILE_NAMESPACE, f"{tenant}\x1f{type_name}\x1f{digest}\x1f{occurrence}"))


@dataclass(frozen=True)
class Prepared:
    """A parsed and validated file, ready to publish."""

    name: str
    sha256: str
    type_name: str
    intake: Intake


class FileDrop:
    """Watches one folder of one tenant; :meth:`poll` ingests the files that are complete."""

    def __init__(
        self,
        directory: str | Path,
        tenant: str,
        publisher: BatchPublisher,
        *,
        state_dir: str | Path,
        mapping: Mapping | None = None,
        event_type: str | None = None,
        version: int | None = None,
        source_system: str | None = None,
        event_time: EventTimeBounds = DEFAULT_EVENT_TIME,
    ) -> None:
        if mapping is not None and mapping.tenant != tenant:
            raise MappingError(f"the mapping is for {mapping.tenant!r}, the folder for {tenant!r}")
        if event_type is not None and event_type not in EVENT_TYPES:
            raise MappingError(
                f"unknown event type {event_type!r}; known: {', '.join(sorted(EVENT_TYPES))}"
            )
        self.directory = Path(directory)
        self.tenant = tenant
        self.publisher = publisher
        self.mapping = mapping
        self.event_type = event_type
        self.version = version
        self.source_system = (
            source_system or (mapping.source_system if mapping else None) or "file-drop"
        )
        self.event_time = event_time
        self.state = IngestState.load(state_path(state_dir, tenant, self.directory))
        self._last_seen: dict[str, tuple[int, int]] = {}

    # ----------------------------------------------------------------------- polling

    def candidates(self) -> list[tuple[Path, tuple[int, int]]]:
        """Export files in the folder (not hidden, not markers) with (size, mtime), oldest first."""
        found: list[tuple[Path, tuple[int, int]]] = []
        for path in self.directory.iterdir():
            if path.suffix.lower() not in KINDS or path.name.startswith("."):
                continue
            with contextlib.suppress(FileNotFoundError):  # gone since the listing
                stat = path.stat()
                if path.is_file():
                    found.append((path, (stat.st_size, stat.st_mtime_ns)))
        return sorted(found, key=lambda item: (item[1][1], item[0].name))

    async def poll(self, *, settle: bool = True) -> list[FileOutcome]:
        """Ingest every complete file (``settle=False``: every file present counts as complete)."""
        ready: list[Path] = []
        present: dict[str, tuple[int, int]] = {}
        for path, signature in self.candidates():
            present[path.name] = signature
            marked = path.with_name(path.name + MARKER).exists()
            if marked or not settle or self._last_seen.get(path.name) == signature:
                ready.append(path)
        self._last_seen = present
        outcomes = []
        for path in ready:
            outcome = await self.ingest(path)
            self._last_seen.pop(path.name, None)
            log.info(
                "file %s: %s",
                outcome.name,
                outcome.status,
                extra={
                    "accepted": outcome.accepted,
                    "refused": outcome.refused,
                    "error": outcome.error,
                },
            )
            outcomes.append(outcome)
        return outcomes

    async def ingest(self, path: Path) -> FileOutcome:
        """Publish one file (unless already ingested) and move it to ``.done`` or ``.failed``."""
        body = await asyncio.to_thread(path.read_bytes)
        sha256 = hashlib.sha256(body).hexdigest()
        if self.state.seen(path.name, sha256):
            return FileOutcome(path.name, "skipped", moved_to=self._move(path, DONE_DIR, sha256))
        try:
            prepared = await asyncio.to_thread(self.prepare, path.name, body, sha256)
        except FileFailure as error:
            return self._fail(path, sha256, str(error), Intake())
        intake = prepared.intake
        for start in range(0, max(len(intake.accepted), len(intake.refused)), PUBLISH_CHUNK):
            chunk = Intake(
                intake.accepted[start : start + PUBLISH_CHUNK],
                intake.refused[start : start + PUBLISH_CHUNK],
            )
            await publish_intake(self.publisher, chunk, self.tenant, source_ref=f"file:{path.name}")
        if intake.refused and not intake.accepted:
            return self._fail(path, sha256, "every record was refused", intake)
        self.state.remember(
            path.name,
            sha256,
            type=prepared.type_name,
            accepted=len(intake.accepted),
            refused=len(intake.refused),
            ingested_at=datetime.now(UTC).isoformat(),
        )
        moved = self._move(path, DONE_DIR, sha256)
        return FileOutcome(
            path.name, "ingested", len(intake.accepted), len(intake.refused), moved_to=moved
        )

    # ----------------------------------------------------------------------- parsing

    def prepare(self, name: str, body: bytes, sha256: str) -> Prepared:
        """Parse and validate a file; :class:`FileFailure` when the whole file is unusable."""
        spec, type_name, version = self._type_of(name)
        kind = KINDS[Path(name).suffix.lower()]
        refused: list[Refused] = []
        if kind == "csv" and spec is None:
            try:
                items = parse_csv(body, self.tenant, type_name, version)
            except CsvError as error:
                raise FileFailure(str(error)) from None
            if not _csv_has_event_ids(body):
                items = [_without_event_id(item) for item in items]
        elif kind == "csv":
            assert spec is not None
            items, refused = self._mapped_rows(_csv_rows(body, spec), spec, name)
        elif spec is not None:
            items, refused = self._mapped_rows(_ndjson_rows(body), spec, name)
        else:
            items = self._ndjson_events(body, type_name, version)
        items = self._stamp(items, type_name, name)
        try:
            intake = validate_records(
                items, self.tenant, source_system=self.source_system, bounds=self.event_time
            )
        except ForeignTenant as error:
            raise FileFailure(str(error)) from None
        intake.refused.extend(refused)
        intake.refused.sort(key=lambda refusal: refusal.index)
        return Prepared(name, sha256, type_name, intake)

    def _type_of(self, name: str) -> tuple[FileMapping | None, str, int]:
        convention = NAME_CONVENTION.match(name)
        if convention and convention["tenant"] != self.tenant:
            raise FileFailure(
                f"the file name is for tenant {convention['tenant']!r}, "
                f"but this folder belongs to {self.tenant!r}"
            )
        spec = self.mapping.file(name) if self.mapping else None
        if spec is not None:
            return spec, spec.event_type, spec.version
        type_name = convention["type"] if convention else self.event_type
        if type_name is None:
            raise FileFailure(
                "no event type: name the file <tenant>__<type>__<anything>, "
                "add a `files:` pattern to the mapping, or start the connector with --type"
            )
        if type_name not in EVENT_TYPES:
            raise FileFailure(
                f"unknown event type {type_name!r}; known: {', '.join(sorted(EVENT_TYPES))}"
            )
        version = self.version if self.version and not convention else latest_version(type_name)
        if (type_name, version) not in PAYLOADS:
            raise FileFailure(f"event type {type_name!r} has no version {version}")
        return None, type_name, version

    def _mapped_rows(
        self, rows: list[tuple[int, str, Any]], spec: FileMapping, name: str
    ) -> tuple[list[Incoming], list[Refused]]:
        items: list[Incoming] = []
        refused: list[Refused] = []
        for index, original, row in rows:
            if not isinstance(row, dict):
                reason = row if isinstance(row, str) else "a record must be a JSON object"
                refused.append(
                    Refused(index, [FieldError(field="", reason=reason)], original, reason)
                )
                continue
            try:
                event: dict[str, Any] = {
                    "type": spec.event_type,
                    "schema_version": spec.version,
                    "source": {"system": self.source_system, "record_id": spec.record_id_of(row)},
                    "payload": spec.payload_of(row),
                }
                occurred_at = spec.occurred_at_of(row)
            except MappingFailure as error:
                reason = f"cannot map: {error}"
                refused.append(
                    Refused(
                        index,
                        [FieldError(field=error.field, reason=error.reason)],
                        original,
                        reason,
                    )
                )
                continue
            if occurred_at is not None:
                event["occurred_at"] = occurred_at
            items.append(Incoming(index, original, event))
        return items, refused

    def _ndjson_events(self, body: bytes, type_name: str, version: int) -> list[Incoming]:
        items: list[Incoming] = []
        for index, original, data in _ndjson_rows(body):
            if not isinstance(data, dict):
                error = data if isinstance(data, str) else "a record must be a JSON object"
                items.append(Incoming(index, original, None, error))
                continue
            if "payload" in data:  # a whole event
                event = {"type": type_name, "schema_version": version, **data}
            else:  # payload fields plus envelope fields
                event = {
                    "type": type_name,
                    "schema_version": version,
                    "payload": {k: v for k, v in data.items() if k not in ENVELOPE_KEYS},
                    **{
                        k: v
                        for k, v in data.items()
                        if k in ENVELOPE_KEYS - {"record_id", "operation"}
                    },
                }
                source = {k: data[k] for k in ("record_id", "operation") if k in data}
                if source:
                    event["source"] = {"system": self.source_system, **source}
            items.append(Incoming(index, original, event))
        return items

    def _stamp(self, items: list[Incoming], type_name: str, name: str) -> list[Incoming]:
        """Content-derived event ids and the file as source, where the record gives none."""
        occurrences: dict[str, int] = {}
        stamped: list[Incoming] = []
        for item in items:
            data = item.data
            if not isinstance(data, dict):
                stamped.append(item)
                continue
            data = dict(data)
            source = dict(data.get("source") or {})
            if source.get("system") in (None, "csv"):  # csvmap stamps "csv": we know better
                source["system"] = self.source_system
            if not source.get("record_id"):
                source["record_id"] = f"{name}#{item.index + 1}"
            if not data.get("event_id"):
                digest = content_digest({k: v for k, v in data.items() if k != "source"})
                occurrence = occurrences.get(digest, 0)
                occurrences[digest] = occurrence + 1
                data["event_id"] = content_event_id(self.tenant, type_name, digest, occurrence)
            data["source"] = source
            stamped.append(Incoming(item.index, item.original, data, item.error))
        return stamped

    # ----------------------------------------------------------------------- moving aside

    def _move(self, path: Path, folder: str, sha256: str) -> Path:
        target_dir = self.directory / folder
        target_dir.mkdir(exist_ok=True)
        target = target_dir / path.name
        if target.exists():  # an earlier file of the same name: keep both
            target = target_dir / f"{path.stem}.{sha256[:12]}{path.suffix}"
        os.replace(path, target)
        path.with_name(path.name + MARKER).unlink(missing_ok=True)
        return target

    def _fail(self, path: Path, sha256: str, error: str, intake: Intake) -> FileOutcome:
        moved = self._move(path, FAILED_DIR, sha256)
        report = {
            "file": path.name,
            "moved_to": str(moved),
            "sha256": sha256,
            "tenant": self.tenant,
            "failed_at": datetime.now(UTC).isoformat(),
            "error": error,
            "accepted": len(intake.accepted),
            "refused": len(intake.refused),
            "refusals": [
                {
                    "record": refusal.index,
                    "reason": refusal.reason,
                    "errors": [e.model_dump() for e in refusal.errors],
                }
                for refusal in intake.refused[:REPORTED_REFUSALS]
            ],
            "refusals_in_dead_letter_topic": dlq(EVENTS_RAW) if intake.refused else None,
        }
        moved.with_name(moved.name + ".error.json").write_bytes(
            orjson.dumps(report, option=orjson.OPT_INDENT_2)
        )
        return FileOutcome(path.name, "failed", 0, len(intake.refused), error=error, moved_to=moved)


def _decode_text(body: bytes) -> str:
    try:
        return body.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise FileFailure(f"the file is not UTF-8 (byte {error.start}): {error.reason}") from None


def _csv_rows(body: bytes, spec: FileMapping) -> list[tuple[int, str, Any]]:
    """CSV rows as (index, original text, column -> value or the error text).

    The header must hold every column the mapping reads: otherwise every row would fail alike.
    """
    reader = csv.DictReader(io.StringIO(_decode_text(body), newline=""), strict=True)
    rows: list[tuple[int, str, Any]] = []
    try:
        header = reader.fieldnames
        if not header:
            raise FileFailure("the CSV file is empty: a header row is needed")
        wanted = [f.column for f in (*spec.fields.values(), spec.occurred_at) if f and f.column]
        missing = sorted(set(wanted + spec.record_id) - {column.strip() for column in header})
        if missing:
            raise FileFailure(
                f"columns the mapping reads are missing from the header: {', '.join(missing)}; "
                f"the header has: {', '.join(header)}"
            )
        for index, row in enumerate(reader):
            original = encode({k: v for k, v in row.items() if k is not None}).decode()
            if None in row or any(v is None for v in row.values()):
                rows.append(
                    (
                        index,
                        original,
                        f"row has a different number of cells than the header ({len(header)})",
                    )
                )
            else:
                rows.append((index, original, row))
    except csv.Error as error:
        raise FileFailure(
            f"the CSV file cannot be parsed (line {reader.line_num}): {error}"
        ) from None
    return rows


def _ndjson_rows(body: bytes) -> list[tuple[int, str, Any]]:
    """Non-blank lines as (index, original, decoded object — or the error text)."""
    rows: list[tuple[int, str, Any]] = []
    for line_no, line in enumerate(_decode_text(body).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data: Any = decode(line)
        except DecodeError as error:
            data = f"line {line_no} is not JSON: {error}"
        rows.append((len(rows), line, data))
    return rows


def _csv_has_event_ids(body: bytes) -> bool:
    first = body.split(b"\n", 1)[0].decode("utf-8-sig", "replace")
    return "event_id" in {column.strip() for column in next(csv.reader([first]), [])}


def _without_event_id(item: Incoming) -> Incoming:
    """Drop the body-hash id csvmap gives, so :meth:`FileDrop._stamp` derives one from the row."""
    if not isinstance(item.data, dict):
        return item
    return Incoming(
        item.index,
        item.original,
        {k: v for k, v in item.data.items() if k != "event_id"},
        item.error,
    )


async def run_filedrop(
    settings: XietongSettings,
    directory: str | Path,
    tenant: str,
    stop: asyncio.Event,
    *,
    mapping: Mapping | None = None,
    event_type: str | None = None,
    version: int | None = None,
    interval: float = 5.0,
    once: bool = False,
) -> None:
    """Poll ``directory`` every ``interval`` seconds until ``stop`` (one pass with ``once``)."""
    await ensure_topics(settings, [EVENTS_RAW, dlq(EVENTS_RAW)])
    async with started(create_producer(settings)) as producer:
        drop = FileDrop(
            directory,
            tenant,
            BatchPublisher(producer),
            state_dir=settings.state_dir,
            mapping=mapping,
            event_type=event_type,
            version=version,
            event_time=settings.event_time_bounds(),
        )
        while not stop.is_set():
            await drop.poll(settle=not once)
            if once:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m services.ingest.filedrop --dir DIR (--mapping FILE | --tenant T [--type T])``."""
    parser = argparse.ArgumentParser(
        prog="python -m services.ingest.filedrop",
        description="Publish CSV / NDJSON files dropped in a folder (settings: XIETONG_* env).",
    )
    parser.add_argument("--dir", required=True, type=Path, help="the folder to watch")
    parser.add_argument("--mapping", help="the tenant's mapping file (YAML) with `files:` patterns")
    parser.add_argument("--tenant", help="the folder's tenant (default: the mapping's)")
    parser.add_argument("--type", dest="event_type", help="event type of files no rule names")
    parser.add_argument("--version", type=int, help="payload version for --type (default: latest)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between polls")
    parser.add_argument("--once", action="store_true", help="ingest what is there now, then exit")
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging("ingest-filedrop", settings.log_level, settings.log_format)
    mapping = None
    if args.mapping:
        try:
            mapping = load_mapping(args.mapping)
        except MappingError as error:
            parser.exit(2, f"{error}\n")
    tenant = args.tenant or (mapping.tenant if mapping else None)
    if tenant is None:
        parser.error("give --tenant or a --mapping that names the tenant")
    if not args.dir.is_dir():
        parser.error(f"{args.dir} is not a folder")

    async def run() -> None:
        stop = asyncio.Event()
        stop_on_signals(stop)
        await run_filedrop(
            settings,
            args.dir,
            tenant,
            stop,
            mapping=mapping,
            event_type=args.event_type,
            version=args.version,
            interval=args.interval,
            once=args.once,
        )

    try:
        asyncio.run(run())
    except MappingError as error:
        parser.exit(2, f"{error}\n")


if __name__ == "__main__":
    main()
