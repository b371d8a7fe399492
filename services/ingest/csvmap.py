"""CSV onto events: the header names payload fields (and a few envelope fields), a row is a record.

The event type and version come with the request (``?type=...&version=1``), not from the file,
so the header is checked once, before any row: an unknown column is refused with the closest
field name (``difflib``) as a suggestion, a required payload field with no column is refused,
and so is a missing ``occurred_at`` column — these are whole-request errors
(:class:`CsvHeaderError`) because every row would fail the same way. Problems of one row (a
wrong number of cells, an empty required cell, a value of the wrong type) are refusals of that
row only.

Columns:

- ``event_id``, ``occurred_at``, ``record_id`` (-> ``source.record_id``), ``operation``
  (-> ``source.operation``) and ``corrects`` are envelope columns;
- every other column is a payload field; ``payload.<field>`` is accepted too, and a dotted
  name ``a.b`` builds a nested object ``{"a": {"b": ...}}`` for payloads that have one;
- an empty cell is a missing value: the field is left out so the contract's missing-value policy
  applies downstream (``default``, ``carry_forward`` or ``refuse``);
- a cell is text, and the contracts are strict about numbers (``"10"`` is not one in JSON): a
  cell of a number, integer or boolean field is converted to that type first
  (:func:`typed_cell`); a cell that does not read as one stays text, which the contract refuses
  with its reason.

A row without ``event_id`` gets ``uuid5(tenant, sha256(body), row index)``: sending the same file
again yields the same ids, so a client retry creates no duplicate downstream (the clean service
drops repeated ids).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import re
import types
import typing
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from schemas.events import PAYLOADS, latest_version
from services.ingest.intake import Incoming

CSV_NAMESPACE = uuid.UUID("6f0d1c52-6a4b-5d0e-9a53-58e1a1f7c0de")
"""Namespace of the deterministic event ids of CSV rows without an ``event_id`` column."""

ENVELOPE_COLUMNS = frozenset({"event_id", "occurred_at", "record_id", "operation", "corrects"})
REQUIRED_ENVELOPE_COLUMNS = ("occurred_at",)


class CsvError(ValueError):
    """The whole CSV request is unusable; ``status`` is the HTTP status that says why."""

    status = 400


class UnknownCsvType(CsvError):
    """``?type=`` / ``?version=`` name no contract."""

    status = 422


class CsvHeaderError(CsvError):
    """The header does not fit the event type: unknown, missing or duplicated columns."""


@dataclass(frozen=True)
class CsvLayout:
    """What each column of a checked header means."""

    type_name: str
    version: int
    columns: tuple[str, ...]
    paths: tuple[tuple[str, ...], ...]
    """Per column: ``("envelope", name)`` or ``("payload", field, sub, ...)``."""
    kinds: tuple[type | None, ...] = ()
    """Per column: ``float``, ``int`` or ``bool`` when its field is declared as one."""


def resolve_type(type_name: str | None, version: str | None) -> tuple[str, int]:
    """The ``(type, version)`` the query names; :class:`CsvError` / :class:`UnknownCsvType`."""
    if not type_name:
        raise CsvError("a CSV body needs the event type in the query: ?type=<event type>")
    known_types = sorted({name for name, _ in PAYLOADS})
    if type_name not in known_types:
        hint = _suggest(type_name, known_types)
        raise UnknownCsvType(
            f"unknown event type {type_name!r}{hint}; known: {', '.join(known_types)}"
        )
    if version is None or version == "":
        return type_name, latest_version(type_name)
    try:
        number = int(version)
    except ValueError:
        raise UnknownCsvType(f"version must be an integer, got {version!r}") from None
    if (type_name, number) not in PAYLOADS:
        versions = sorted(v for name, v in PAYLOADS if name == type_name)
        raise UnknownCsvType(
            f"event type {type_name!r} has no version {number}; known versions: {versions}"
        )
    return type_name, number


def check_header(header: list[str], type_name: str, version: int) -> CsvLayout:
    """Map each column onto the envelope or the payload, or raise :class:`CsvHeaderError`."""
    fields = PAYLOADS[(type_name, version)].model_fields
    candidates = sorted(set(fields) | ENVELOPE_COLUMNS)
    columns = tuple(name.strip() for name in header)
    paths: list[tuple[str, ...]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for position, name in enumerate(columns, start=1):
        if not name:
            problems.append(f"column {position} has no name")
            paths.append(())
            continue
        if name in seen:
            problems.append(f"column {name!r} appears twice")
        seen.add(name)
        if name in ENVELOPE_COLUMNS:
            paths.append(("envelope", name))
            continue
        parts = tuple(name.removeprefix("payload.").split("."))
        if parts[0] not in fields:
            hint = _suggest(parts[0], candidates)
            problems.append(f"unknown column {name!r} for {type_name} v{version}{hint}")
            paths.append(())
            continue
        paths.append(("payload", *parts))
    mapped = {path[1] for path in paths if path and path[0] == "payload"}
    for field_name, info in fields.items():
        if info.is_required() and field_name not in mapped:
            problems.append(f"missing column {field_name!r} (required by {type_name} v{version})")
    for name in REQUIRED_ENVELOPE_COLUMNS:
        if name not in columns:
            problems.append(f"missing column {name!r} (event time with UTC offset, RFC 3339)")
    if problems:
        raise CsvHeaderError("; ".join(problems))
    kinds = tuple(
        declared_scalar(fields[path[1]].annotation)
        if len(path) == 2 and path[0] == "payload"
        else None
        for path in paths
    )
    return CsvLayout(type_name, version, columns, tuple(paths), kinds)


SCALARS = (bool, int, float)
INTEGER_CELL = re.compile(r"[+-]?[0-9]+")
NUMBER_CELL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
"""What a number looks like in a spreadsheet export: ``10``, ``+2``, ``-2.5``, ``.5``, ``1e3``
(not ``nan``, ``inf`` or ``1_000``, which Python's ``float`` would read)."""


def declared_scalar(annotation: Any) -> type | None:
    """``float``, ``int`` or ``bool`` when a field is declared as one (optional or constrained),
    else None."""
    if typing.get_origin(annotation) is typing.Annotated:
        return declared_scalar(typing.get_args(annotation)[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = {declared_scalar(arg) for arg in typing.get_args(annotation)} - {None}
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return kinds.pop() if len(kinds) == 1 and len(members) == 1 else None
    return annotation if annotation in SCALARS else None


def typed_cell(text: str, kind: type | None) -> Any:
    """A cell as its field's declared type when it reads as one (``10``, ``-2.5``, ``1e3``,
    ``true``); otherwise the text, for the contract to refuse with its reason."""
    if kind is float and NUMBER_CELL.fullmatch(text):
        return float(text)
    if kind is int and INTEGER_CELL.fullmatch(text):
        return int(text)
    if kind is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def csv_event_id(tenant: str, body_sha256: str, row: int) -> str:
    """The deterministic id of row ``row`` of a body: a retry of the same body repeats it."""
    return str(uuid.uuid5(CSV_NAMESPACE, f"{tenant}/{body_sha256}/{row}"))


def parse_csv(body: bytes | bytearray, tenant: str, type_name: str, version: int) -> list[Incoming]:
    """Rows of a UTF-8 CSV body as records of ``type_name`` v``version`` for ``tenant``.

    Raises :class:`CsvError` for a body that cannot be read as CSV at all or whose header does
    not fit; a row that cannot become a record is returned with its ``error`` set.
    """
    body_sha256 = hashlib.sha256(body).hexdigest()
    rows = csv.reader(_lines(body), strict=True)
    try:
        header = next(rows)
    except StopIteration:
        raise CsvError("the CSV body is empty: a header row is needed") from None
    except (csv.Error, UnicodeDecodeError) as error:
        raise CsvError(f"the CSV header cannot be read: {error}") from None
    if header and header[0].startswith("\ufeff"):  # a byte-order mark from a spreadsheet export
        header[0] = header[0][1:]
    layout = check_header(header, type_name, version)
    items: list[Incoming] = []
    index = 0
    while True:
        try:
            cells = next(rows)
        except StopIteration:
            break
        except UnicodeDecodeError as error:
            raise CsvError(
                f"the CSV body is not UTF-8 (line {rows.line_num + 1}): {error.reason}"
            ) from None
        except csv.Error as error:
            raise CsvError(
                f"the CSV body cannot be parsed (line {rows.line_num}): {error}"
            ) from None
        if not cells or all(not cell.strip() for cell in cells):
            continue  # blank lines are not rows
        original = _original(layout.columns, cells)
        if len(cells) != len(layout.columns):
            items.append(
                Incoming(
                    index,
                    original,
                    None,
                    f"wrong number of cells: {len(cells)}, the header has {len(layout.columns)}",
                )
            )
        else:
            event = _event_of(layout, cells, tenant)
            event.setdefault("event_id", csv_event_id(tenant, body_sha256, index))
            items.append(Incoming(index, original, event))
        index += 1
    return items


def _event_of(layout: CsvLayout, cells: list[str], tenant: str) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    source: dict[str, Any] = {"system": "csv"}
    event: dict[str, Any] = {
        "tenant": tenant,
        "type": layout.type_name,
        "schema_version": layout.version,
        "source": source,
        "payload": payload,
    }
    for path, kind, cell in zip(layout.paths, layout.kinds, cells, strict=True):
        text = cell.strip()
        if not text:
            continue  # empty cell = missing value: the contract's policy applies downstream
        value = typed_cell(text, kind)
        if path[0] == "envelope":
            name = path[1]
            if name == "record_id":
                source["record_id"] = value
            elif name == "operation":
                source["operation"] = value
            else:
                event[name] = value
            continue
        target = payload
        for part in path[1:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return event


def _original(columns: tuple[str, ...], cells: list[str]) -> str:
    """The header and the row as CSV text: what the dead-letter topic keeps of the row."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerow(cells)
    return out.getvalue()


def _lines(body: bytes | bytearray) -> Iterator[str]:
    """Decode the body line by line, so it is never held twice (bytes and text) in memory."""
    view = memoryview(body)
    start = 0
    end = len(body)
    while start < end:
        stop = body.find(b"\n", start)
        stop = end if stop < 0 else stop + 1
        yield str(view[start:stop], "utf-8")
        start = stop


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
