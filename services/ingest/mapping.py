"""Declarative mapping of ERP records onto Xietong events, one YAML file per tenant.

An ERP integration engineer writes which table (CDC) or which exported file (file drop) becomes
which event type, which column feeds which payload field, and how values are converted. The
file is loaded and checked once, at start-up, by :func:`load_mapping`: unknown event types,
payload fields that do not exist (a typo) and required payload fields left unmapped are refused
with the path of the offending key, before any record flows.

.. code-block:: yaml

    tenant: acme
    source_system: debezium-postgres     # optional: derived from the change event otherwise
    topics: [erp.public.sales_lines]     # CDC: Debezium topics to consume
    tables:
      public.sales_lines:                # "<schema or db>.<table>" or just "<table>"
        event_type: sales_order_line
        schema_version: 1                # optional: the latest version by default
        record_id: [order_no, line_no]   # primary-key columns -> source.record_id
        occurred_at: {column: ordered_at, convert: datetime}
        timezone: Asia/Shanghai          # for timestamps without an offset
        fields:
          order_id: order_no             # short form: payload field: column
          line_no: line_no
          quantity: {column: qty_grams, divide: 1000}
          unit: {constant: kg}
          unit_price: {column: price_cents, divide: 100}
          currency: {column: cur, values: {RMB: CNY}}
    files:                               # file drop: first pattern that matches the name wins
      - pattern: "inventory_*.csv"
        event_type: inventory_level
        occurred_at: {column: snapshot_date, convert: date, format: "%d.%m.%Y"}
        fields: {site_id: plant, product_sku: material, on_hand: {column: stock, convert: float}}

A field is converted in this order: ``values`` (translate codes), ``epoch`` / ``scale``
(decode integers since the epoch and base64 decimals when no schema says what they are),
``multiply`` / ``divide`` (exact decimal arithmetic, e.g. cents -> currency units), ``convert``.
Empty values (``None``, ``""``) take ``default`` or are left out, so the contract's
missing-value policy applies downstream. Last, a value of a number, integer or boolean field is
read as that type (:func:`as_declared`; the contracts accept no ``"10"`` for a number).
"""

from __future__ import annotations

import base64
import fnmatch
import types
import typing
from datetime import date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from schemas.events import PAYLOADS, TENANT_PATTERN, UnknownEventType, latest_version, model_for
from services.ingest.csvmap import declared_scalar

EPOCH = date(1970, 1, 1)
EPOCH_UNITS: dict[str, int] = {
    "seconds": 1,
    "millis": 1_000,
    "micros": 1_000_000,
    "nanos": 1_000_000_000,
}


class MappingError(ValueError):
    """The mapping file cannot be read or does not describe valid events."""


class MappingFailure(ValueError):
    """One record cannot be mapped: which payload field (or column) and why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FieldMapping(_Model):
    """Where one payload field comes from and how its value is converted."""

    column: str | None = Field(None, description="Source column (exclusive with `constant`).")
    constant: Any = Field(None, description="A fixed value for every record, e.g. a unit.")
    values: dict[str, Any] | None = Field(
        None, description="Translate source codes, e.g. {ST: pcs, RMB: CNY}."
    )
    epoch: Literal["days", "seconds", "millis", "micros", "nanos"] | None = Field(
        None, description="An integer counts these units since 1970-01-01 (when no schema says)."
    )
    scale: int | None = Field(
        None, ge=0, description="A base64 string is a Kafka Connect decimal with this scale."
    )
    multiply: Decimal | None = Field(None, description="Multiply the number by this.")
    divide: Decimal | None = Field(None, description="Divide the number by this (cents: 100).")
    convert: Literal["str", "int", "float", "bool", "date", "datetime"] | None = Field(
        None, description="Target type."
    )
    format: str | None = Field(None, description="strptime format of date or datetime strings.")
    default: Any = Field(None, description="Value when the column is empty.")

    @model_validator(mode="after")
    def _one_source(self) -> FieldMapping:
        has_constant = "constant" in self.model_fields_set
        if (self.column is None) == (not has_constant):
            raise ValueError("give exactly one of `column` or `constant`")
        if self.divide is not None and self.divide == 0:
            raise ValueError("`divide` must not be 0")
        return self


def _short_form(value: Any) -> Any:
    return {"column": value} if isinstance(value, str) else value


def _wants_str(annotation: Any) -> bool:
    """Whether a payload field's type is a string (possibly optional or constrained)."""
    if annotation is str:
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_wants_str(arg) for arg in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Annotated:
        return _wants_str(typing.get_args(annotation)[0])
    return False


class RecordMapping(_Model):
    """How one kind of ERP record (a table, a file) becomes events of one type."""

    event_type: str = Field(description="Xietong event type, e.g. sales_order_line.")
    schema_version: int | None = Field(None, ge=1, description="Payload version; latest if unset.")
    record_id: list[str] = Field(
        default_factory=list,
        description="Primary-key columns; joined with '/' as source.record_id.",
    )
    occurred_at: FieldMapping | None = Field(
        None, description="Event time column; CDC falls back to the commit time."
    )
    timezone: str = Field("UTC", description="Zone of timestamps that carry no offset.")
    fields: dict[str, FieldMapping] = Field(description="Payload field -> where it comes from.")

    @field_validator("record_id", mode="before")
    @classmethod
    def _one_column(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("occurred_at", mode="before")
    @classmethod
    def _occurred_short(cls, value: Any) -> Any:
        return _short_form(value)

    @field_validator("fields", mode="before")
    @classmethod
    def _fields_short(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {name: _short_form(spec) for name, spec in value.items()}
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as error:
            raise ValueError(f"unknown time zone {value!r}") from error
        return value

    @model_validator(mode="after")
    def _fits_the_contract(self) -> RecordMapping:
        version = self.version
        try:
            model_for(self.event_type, version)
        except UnknownEventType as error:
            raise ValueError(str(error)) from error
        fields = PAYLOADS[(self.event_type, version)].model_fields
        unknown = sorted(set(self.fields) - set(fields))
        if unknown:
            raise ValueError(
                f"{self.event_type} v{version} has no field(s) {', '.join(unknown)}; "
                f"its fields: {', '.join(fields)}"
            )
        unmapped = sorted(
            name for name, info in fields.items() if info.is_required() and name not in self.fields
        )
        if unmapped:
            raise ValueError(
                f"required field(s) of {self.event_type} not mapped: {', '.join(unmapped)}"
            )
        return self

    @property
    def version(self) -> int:
        if self.schema_version is not None:
            return self.schema_version
        try:
            return latest_version(self.event_type)
        except ValueError:  # max() of nothing: an unknown type, reported by the validator
            return 1

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def record_id_of(self, row: dict[str, Any]) -> str | None:
        """The record's primary key as text (``SO-1/2``), None when no key columns are set."""
        if not self.record_id:
            return None
        missing = [column for column in self.record_id if row.get(column) in (None, "")]
        if missing:
            raise MappingFailure("source.record_id", f"key column(s) empty: {', '.join(missing)}")
        return "/".join(_key_text(row[column]) for column in self.record_id)

    def payload_of(self, row: dict[str, Any]) -> dict[str, Any]:
        """Map one record (column -> value) onto the payload; :class:`MappingFailure` if not."""
        payload: dict[str, Any] = {}
        model_fields = PAYLOADS[(self.event_type, self.version)].model_fields
        zone = self.zone
        for name, spec in self.fields.items():
            value = convert_value(spec, row, name, zone)
            if value is None:
                continue
            kind = declared_scalar(model_fields[name].annotation)
            if kind is not None:
                value = as_declared(value, kind, name)
            if (
                _wants_str(model_fields[name].annotation)
                and isinstance(value, (int, float, Decimal))
                and not isinstance(value, bool)
            ):
                value = _key_text(value)
            payload[name] = value
        return payload

    def occurred_at_of(self, row: dict[str, Any]) -> datetime | None:
        """The event time from the mapped column, as an aware datetime (None if unmapped/empty)."""
        if self.occurred_at is None:
            return None
        value = convert_value(self.occurred_at, row, "occurred_at", self.zone)
        if value is None:
            return None
        return as_aware(value, self.zone, "occurred_at")


class TableMapping(RecordMapping):
    """A database table captured by Debezium."""


class FileMapping(RecordMapping):
    """Exported files whose name matches ``pattern`` (a glob such as ``sales_*.csv``)."""

    pattern: str = Field(min_length=1, description="Glob matched against the file name.")


class Mapping(_Model):
    """The mapping file of one tenant."""

    tenant: str = Field(pattern=TENANT_PATTERN, description="The firm whose records these are.")
    source_system: str | None = Field(
        None, description="source.system of the events; derived from the connector otherwise."
    )
    consumer_group: str = Field(
        "ingest-cdc", description="Kafka consumer group of the CDC connector."
    )
    topics: list[str] = Field(default_factory=list, description="Debezium topics to consume.")
    tables: dict[str, TableMapping] = Field(
        default_factory=dict, description="'<schema or db>.<table>' or '<table>' -> mapping."
    )
    files: list[FileMapping] = Field(default_factory=list, description="File-drop mappings.")

    @model_validator(mode="after")
    def _tables_for_topics(self) -> Mapping:
        if self.topics and not self.tables:
            raise ValueError("`topics` are given but no `tables` say how to map them")
        return self

    def table(self, namespace: str | None, table: str) -> TableMapping | None:
        """The mapping of ``namespace.table`` (schema or database), or of bare ``table``."""
        if namespace:
            found = self.tables.get(f"{namespace}.{table}")
            if found is not None:
                return found
        return self.tables.get(table)

    def file(self, name: str) -> FileMapping | None:
        """The first file mapping whose pattern matches the file name."""
        return next((spec for spec in self.files if fnmatch.fnmatchcase(name, spec.pattern)), None)


def load_mapping(path: str | Path) -> Mapping:
    """Read and check a mapping file; :class:`MappingError` says precisely what is wrong."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise MappingError(f"{path}: cannot read the mapping: {error}") from error
    return parse_mapping(data, origin=str(path))


def parse_mapping(data: Any, *, origin: str = "mapping") -> Mapping:
    """Check an already decoded mapping (a dict, as from YAML)."""
    try:
        return Mapping.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc']) or '(top)'}: {item['msg']}"
            for item in error.errors(include_url=False, include_input=False)
        )
        raise MappingError(f"{origin}: {problems}") from error


# --------------------------------------------------------------------------- value conversion


def _key_text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value == value.to_integral_value() else str(value)
    return str(value)


def as_aware(value: Any, zone: ZoneInfo, field: str) -> datetime:
    """A date or datetime as an aware datetime; naive values are in ``zone``."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=zone)
    if isinstance(value, date):
        return datetime.combine(value, time(), tzinfo=zone)
    if isinstance(value, str):
        return as_aware(_parse_datetime(value, None, field), zone, field)
    raise MappingFailure(field, f"expected a date or timestamp, got {type(value).__name__}")


def decode_connect_decimal(encoded: str | bytes, scale: int) -> Decimal:
    """A Kafka Connect ``Decimal``: big-endian two's-complement unscaled value (base64 in JSON)."""
    raw = base64.b64decode(encoded, validate=True) if isinstance(encoded, str) else encoded
    return Decimal(int.from_bytes(raw, "big", signed=True)).scaleb(-scale)


def from_epoch(value: int, unit: str) -> date | datetime:
    """Days since the epoch -> date; seconds/millis/micros/nanos -> naive datetime."""
    if unit == "days":
        return EPOCH + timedelta(days=value)
    per_second = EPOCH_UNITS[unit]
    seconds, rest = divmod(value, per_second)
    return datetime(1970, 1, 1) + timedelta(
        seconds=seconds, microseconds=rest * 1_000_000 // per_second
    )


def _number(value: Any, field: str) -> Decimal:
    if isinstance(value, bool):
        raise MappingFailure(field, "expected a number, got a boolean")
    if isinstance(value, (int, Decimal)):
        return Decimal(value)
    if isinstance(value, (float, str)):
        try:
            number = Decimal(str(value).strip())
        except InvalidOperation:
            raise MappingFailure(field, f"{value!r} is not a number") from None
        if not number.is_finite():
            raise MappingFailure(field, f"{value!r} is not a finite number")
        return number
    raise MappingFailure(field, f"expected a number, got {type(value).__name__}")


def _parse_datetime(value: str, fmt: str | None, field: str) -> datetime:
    text = value.strip()
    try:
        if fmt:
            return datetime.strptime(text, fmt)
        return datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        expected = f"format {fmt!r}" if fmt else "ISO 8601"
        raise MappingFailure(field, f"{value!r} is not a date/time in {expected}") from None


def _to_date(value: Any, fmt: str | None, field: str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return EPOCH + timedelta(days=value)
    if isinstance(value, str):
        return _parse_datetime(value, fmt, field).date()
    raise MappingFailure(field, f"expected a date, got {type(value).__name__}")


def _to_datetime(value: Any, fmt: str | None, field: str) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return datetime.combine(value, time())
    if isinstance(value, int) and not isinstance(value, bool):
        result = from_epoch(value, "millis")  # Kafka Connect's Timestamp unit
        assert isinstance(result, datetime)
        return result
    if isinstance(value, str):
        return _parse_datetime(value, fmt, field)
    raise MappingFailure(field, f"expected a timestamp, got {type(value).__name__}")


def _to_bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "t", "x"):
        return True
    if text in ("0", "false", "no", "n", "f"):
        return False
    raise MappingFailure(field, f"{value!r} is not a boolean")


def as_declared(value: Any, kind: type, field: str) -> Any:
    """A value of a number, integer or boolean field as that type: the contracts are strict
    (``"10"`` is no number), while a CSV cell or a Debezium decimal in string mode is text, and
    a divided integer is a float. Other values are left for the contract to judge."""
    if kind is bool:
        return _to_bool(value, field) if isinstance(value, str) else value
    if kind is float and isinstance(value, (str, bool)):  # a boolean fails: it is no number
        return float(_number(value, field))
    if kind is int and isinstance(value, (str, float, bool, Decimal)):
        number = _number(value, field)
        if number != number.to_integral_value():
            raise MappingFailure(field, f"{value!r} is not a whole number")
        return int(number)
    return value


def convert_value(spec: FieldMapping, row: dict[str, Any], field: str, zone: ZoneInfo) -> Any:
    """The value of one payload field from ``row`` (None when empty and without default)."""
    if "constant" in spec.model_fields_set:
        value = spec.constant
    else:
        assert spec.column is not None
        if spec.column not in row:
            raise MappingFailure(field, f"column {spec.column!r} is not in the record")
        value = row[spec.column]
    if value is None or (isinstance(value, str) and not value.strip()):
        return spec.default
    if spec.values is not None:
        value = spec.values.get(str(value), value)
    try:
        if spec.epoch is not None and not isinstance(value, (date, datetime)):
            value = from_epoch(int(_number(value, field)), spec.epoch)
        if spec.scale is not None and isinstance(value, (str, bytes)):
            value = decode_connect_decimal(value, spec.scale)
    except (ValueError, TypeError) as error:
        if isinstance(error, MappingFailure):
            raise
        raise MappingFailure(field, f"cannot decode {value!r}: {error}") from None
    if spec.multiply is not None or spec.divide is not None:
        number = _number(value, field)
        if spec.multiply is not None:
            number *= spec.multiply
        if spec.divide is not None:
            number /= spec.divide
        value = number
    match spec.convert:
        case "str":
            value = value.isoformat() if isinstance(value, (date, datetime)) else _key_text(value)
        case "int":
            number = _number(value, field)
            if number != number.to_integral_value():
                raise MappingFailure(field, f"{value!r} is not a whole number")
            value = int(number)
        case "float":
            value = float(_number(value, field))
        case "bool":
            value = _to_bool(value, field)
        case "date":
            value = _to_date(value, spec.format, field)
        case "datetime":
            parsed = _to_datetime(value, spec.format, field)
            value = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=zone)
        case None:
            pass
    # A Decimal stays one: money fields keep every digit (the raw record carries it as a
    # decimal string), a number field takes it as a float (the contract converts it).
    return value


__all__ = [
    "EPOCH",
    "FieldMapping",
    "FileMapping",
    "Mapping",
    "MappingError",
    "MappingFailure",
    "RecordMapping",
    "TableMapping",
    "as_aware",
    "as_declared",
    "convert_value",
    "decode_connect_decimal",
    "from_epoch",
    "load_mapping",
    "parse_mapping",
]
