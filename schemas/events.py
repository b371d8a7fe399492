"""Event contracts: the envelope every partner event travels in, and the payload of each type.

An event is ``{event_id, tenant, type, schema_version, occurred_at, source, payload}``. The
envelope is the same for every type; the payload model is chosen by ``(type, schema_version)``
through :data:`EVENT_MODELS`. ``event_id`` is the idempotency key: the same id twice is the same
event (a client retry), never a second one.

Fields a partner may leave out carry a **missing-value policy** in their JSON Schema
(``x-missing``): ``default`` (use the declared value), ``carry_forward`` (the tenant's last value
for the same key) or ``refuse`` (the record goes to the dead-letter topic). The clean service
applies them; the contract is where they are declared so every partner can read them.

Compatibility rule for a new version (checked by :mod:`schemas.compat`): a ``v<N+1>`` payload may
add optional fields and relax constraints, never remove or rename a field, change its type, or
make an optional field required. A breaking change is a new event type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Context, Decimal, Inexact, InvalidOperation
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
    create_model,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{1,62}$"
TenantId = Annotated[
    str,
    Field(
        pattern=TENANT_PATTERN,
        description="The firm that owns the event: lowercase letters, digits, '-' and '_'.",
    ),
]
CurrencyCode = Annotated[
    str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 currency code, e.g. CNY, EUR, USD.")
]


def _number_as_float(value: Any) -> Any:
    """A JSON number read exactly (:func:`decode_exact` gives a ``Decimal``) is still a number
    for a float field; anything else goes on to the strict check unchanged."""
    return float(value) if type(value) is Decimal else value


Quantity = Annotated[
    float, Field(ge=0, allow_inf_nan=False, strict=True), BeforeValidator(_number_as_float)
]
# Numbers are strict (``strict=True``) as the JSON Schema says "number" / "integer": "10" and
# true are refused, not read as 10 and 1 (pydantic's lax mode would). An integer may be sent
# for a number; CSV cells and mapped ERP columns are converted to the declared type first.

# --------------------------------------------------------------------------- money

MONEY_INTEGER_DIGITS = 20
MONEY_DECIMAL_PLACES = 18
MONEY_PATTERN = (
    rf"^(0|[1-9][0-9]{{0,{MONEY_INTEGER_DIGITS - 1}}})(\.[0-9]{{1,{MONEY_DECIMAL_PLACES}}})?$"
)
"""A decimal string: digits, an optional fraction; no sign, exponent, blank or separator."""
_MONEY_TEXT = re.compile(MONEY_PATTERN[1:-1].encode())  # fullmatch: no anchors needed
_MONEY_LIMIT = Decimal(10) ** MONEY_INTEGER_DIGITS
MONEY_CONTEXT = Context(prec=200, Emax=999_999, Emin=-999_999, traps=[InvalidOperation, Inexact])
"""Arithmetic on money: wide enough that every product and unit conversion of bounded amounts
is exact, and ``Inexact`` trapped so that one that is not raises instead of rounding."""


def money_error(value: Decimal) -> str | None:
    """Why ``value`` is no amount of money the contracts accept, or None."""
    if not value.is_finite():
        return "must be a finite number"
    if value < 0:
        return "must be greater than or equal to 0"
    if value >= _MONEY_LIMIT:
        return f"must be less than 1e{MONEY_INTEGER_DIGITS}"
    _, digits, exponent = value.as_tuple()
    extra = -int(exponent) - MONEY_DECIMAL_PLACES  # places past the limit, zero or not
    if extra > 0 and value and (extra > len(digits) or any(digits[-extra:])):
        return f"has more than {MONEY_DECIMAL_PLACES} decimal places"
    return None


def money_from_json(text: bytes) -> Decimal | None:
    """A money value from its JSON text: a number (read exactly) or a decimal string; None for
    ``null``. ``ValueError`` for anything else (the fast mirrors call this)."""
    if text == b"null":
        return None
    if text[:1] == b'"':
        if _MONEY_TEXT.fullmatch(text, 1, len(text) - 1) is None or text[-1:] != b'"':
            raise ValueError("not a decimal string")
        value = Decimal(text[1:-1].decode())
    elif text and text[:1] in b"-0123456789":
        value = Decimal(text.decode())
    else:
        raise ValueError("not a number or a decimal string")
    problem = money_error(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _money(value: Any) -> Decimal:
    if isinstance(value, bool):
        raise PydanticCustomError("decimal_type", "Input should be a number or a decimal string")
    if isinstance(value, str):
        if _MONEY_TEXT.fullmatch(value.encode()) is None:
            raise PydanticCustomError(
                "decimal_parsing",
                'Input should be a number or a decimal string such as "12.50" (digits, an '
                "optional fraction of at most {places} digits; no sign, exponent or blanks)",
                {"places": MONEY_DECIMAL_PLACES},
            )
        value = Decimal(value)
    elif isinstance(value, int):
        value = Decimal(value)
    elif isinstance(value, float):
        # Only Python callers hold a float here (every decoder of ours reads numbers exactly):
        # its shortest representation is the number they wrote.
        value = Decimal(repr(value))
    elif not isinstance(value, Decimal):
        raise PydanticCustomError("decimal_type", "Input should be a number or a decimal string")
    money: Decimal = value
    problem = money_error(money)
    if problem is not None:
        raise PydanticCustomError("decimal_bounds", "Input " + problem)
    return money


def decimal_text(value: Decimal) -> str:
    """Exact canonical text of a decimal: no exponent, no trailing zeros, ``0`` for zero."""
    if not value:
        return "0"
    return format(value.normalize(MONEY_CONTEXT), "f")


MONEY_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "number", "minimum": 0, "exclusiveMaximum": float(_MONEY_LIMIT)},
        {"type": "string", "pattern": MONEY_PATTERN},
    ],
    "x-decimal": {
        "integer_digits": MONEY_INTEGER_DIGITS,
        "decimal_places": MONEY_DECIMAL_PLACES,
        "read": "exactly from the JSON text of the number, never through a binary float",
    },
}
Money = Annotated[
    Decimal,
    PlainValidator(_money),
    PlainSerializer(decimal_text, return_type=str, when_used="json"),
    WithJsonSchema(MONEY_SCHEMA, mode="validation"),
]
"""An amount of money: a JSON number, read exactly from its text, or a decimal string
(``"12.50"``); at least 0, under 1e20, at most 18 decimal places. Never a binary float."""

DecimalText = Annotated[
    str,
    Field(
        pattern=r"^-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?$",
        description="An exact decimal as text (no exponent, no trailing zeros).",
    ),
]

_EXACT = msgspec.json.Decoder(float_hook=Decimal)


def decode_exact(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode JSON with every non-integer number as an exact ``Decimal`` (the contracts read
    money from it exactly, and quantities as floats); ``ValueError`` on bad input."""
    try:
        return _EXACT.decode(data)
    except RecursionError:  # ``[[[[...`` a few thousand deep: bad input, not a server error
        raise ValueError("JSON nested too deeply") from None


def is_money(info: FieldInfo) -> bool:
    """Is a contract field (optional or not) :data:`Money`? (Money is the only decimal.)"""
    annotation = info.annotation
    return annotation is Decimal or any(arg is Money for arg in getattr(annotation, "__args__", ()))


def money_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The money fields of a contract model."""
    return tuple(name for name, info in model.model_fields.items() if is_money(info))


def missing(
    policy: Literal["default", "carry_forward", "refuse"], value: Any = None
) -> dict[str, Any]:
    """JSON Schema extension that declares how the clean service fills a missing field."""
    rule: dict[str, Any] = {"policy": policy}
    if policy == "default":
        rule["value"] = value
    return {"x-missing": rule}


class Contract(BaseModel):
    """Base of every contract model: immutable, and unknown fields are refused."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)


# --------------------------------------------------------------------------- payloads (v1)


class SalesOrderLine(Contract):
    """One line of a customer order: what was sold, to whom, at what price."""

    order_id: str = Field(min_length=1, description="The seller's order number.")
    line_no: int = Field(1, ge=1, strict=True, description="Line within the order.")
    customer_id: str = Field(min_length=1, description="The seller's id of the customer.")
    product_sku: str = Field(min_length=1, description="The seller's product code.")
    quantity: Quantity = Field(description="Quantity sold, in `unit`.")
    unit: str | None = Field(
        None,
        description="Unit of `quantity` (pcs, kg, t, m, l ...).",
        json_schema_extra=missing("default", "pcs"),
    )
    unit_price: Money | None = Field(
        None,
        description="Price per `unit` in `currency`: a number or a decimal string, read exactly.",
        json_schema_extra=missing("carry_forward"),
    )
    currency: CurrencyCode | None = Field(
        None, description="Currency of `unit_price`.", json_schema_extra=missing("default", "CNY")
    )
    region: str | None = Field(
        None, description="Sales region.", json_schema_extra=missing("default", "unknown")
    )
    channel: str | None = Field(
        None, description="Sales channel (direct, distributor, online ...)."
    )


class InventoryLevel(Contract):
    """Stock on hand of one product at one site at `occurred_at`."""

    site_id: str = Field(min_length=1, description="Warehouse or plant.")
    product_sku: str = Field(min_length=1, description="The firm's product code.")
    on_hand: Quantity = Field(description="Quantity on hand, in `unit`.")
    unit: str | None = Field(
        None, description="Unit of the quantities.", json_schema_extra=missing("default", "pcs")
    )
    reserved: Quantity | None = Field(
        None, description="Quantity reserved for orders.", json_schema_extra=missing("default", 0)
    )
    reorder_point: Quantity | None = Field(
        None,
        description="Level at which the firm reorders.",
        json_schema_extra=missing("carry_forward"),
    )
    unit_cost: Money | None = Field(
        None, description="Cost per unit in `currency`: a number or a decimal string, read exactly."
    )
    currency: CurrencyCode | None = Field(
        None, description="Currency of `unit_cost`.", json_schema_extra=missing("default", "CNY")
    )


class PurchaseOrder(Contract):
    """An order placed with a supplier."""

    po_id: str = Field(min_length=1, description="The buyer's purchase-order number.")
    line_no: int = Field(1, ge=1, strict=True, description="Line within the purchase order.")
    supplier_id: str = Field(min_length=1, description="The buyer's id of the supplier.")
    product_sku: str = Field(min_length=1, description="What is ordered.")
    quantity: Quantity = Field(description="Quantity ordered, in `unit`.")
    unit: str | None = Field(
        None, description="Unit of `quantity`.", json_schema_extra=missing("default", "pcs")
    )
    unit_price: Money | None = Field(
        None,
        description="Agreed price per unit: a number or a decimal string, read exactly.",
        json_schema_extra=missing("refuse"),
    )
    currency: CurrencyCode | None = Field(
        None, description="Currency of `unit_price`.", json_schema_extra=missing("default", "CNY")
    )
    promised_date: date | None = Field(None, description="Delivery date the supplier promised.")


class SupplierDelivery(Contract):
    """Goods received against a purchase order: quantity, timeliness, quality."""

    po_id: str = Field(min_length=1, description="The purchase order delivered against.")
    supplier_id: str = Field(min_length=1, description="Who delivered.")
    product_sku: str = Field(min_length=1, description="What was delivered.")
    delivered_quantity: Quantity = Field(description="Quantity received, in `unit`.")
    unit: str | None = Field(
        None, description="Unit of the quantities.", json_schema_extra=missing("default", "pcs")
    )
    rejected_quantity: Quantity | None = Field(
        None, description="Quantity refused at inspection.", json_schema_extra=missing("default", 0)
    )
    promised_date: date | None = Field(None, description="Date promised in the order.")
    delivered_date: date = Field(description="Date the goods arrived.")


class ProductionOutput(Contract):
    """Output of one production line over a shift or period."""

    line_id: str = Field(min_length=1, description="Production line or work centre.")
    product_sku: str = Field(min_length=1, description="What was produced.")
    quantity: Quantity = Field(description="Good units produced, in `unit`.")
    unit: str | None = Field(
        None, description="Unit of the quantities.", json_schema_extra=missing("default", "pcs")
    )
    scrap_quantity: Quantity | None = Field(
        None, description="Units scrapped.", json_schema_extra=missing("default", 0)
    )
    machine_hours: Quantity | None = Field(
        None, description="Machine hours used.", json_schema_extra=missing("carry_forward")
    )
    energy_kwh: Quantity | None = Field(None, description="Energy used, kWh.")


class Workforce(Contract):
    """Headcount, hours and absences of one site over a period (aggregates, never people)."""

    site_id: str = Field(min_length=1, description="Site or department.")
    headcount: int = Field(
        ge=0, strict=True, description="People employed at the end of the period."
    )
    hours_worked: Quantity | None = Field(
        None, description="Hours worked in the period.", json_schema_extra=missing("refuse")
    )
    absence_hours: Quantity | None = Field(
        None, description="Hours of absence in the period.", json_schema_extra=missing("default", 0)
    )
    overtime_hours: Quantity | None = Field(
        None, description="Overtime hours in the period.", json_schema_extra=missing("default", 0)
    )
    period_days: int = Field(
        1, ge=1, le=366, strict=True, description="Length of the period in days."
    )


class MarketPrice(Contract):
    """An observed market price of a commodity or product (external data)."""

    commodity: str = Field(
        min_length=1, description="What is priced (steel-hrc, copper, pp-resin ...)."
    )
    market: str = Field(min_length=1, description="Where: an exchange, a region or a platform.")
    price: Money = Field(
        description="Price per `unit` in `currency`: a number or a decimal string, read exactly."
    )
    currency: CurrencyCode = Field(description="Currency of `price`.")
    unit: str = Field(min_length=1, description="Unit the price is quoted per (t, kg ...).")
    publisher: str | None = Field(None, description="Who published the price.")


class TextDocument(Contract):
    """Free text: customer feedback, a supplier note, news or a policy notice."""

    kind: Literal["customer_feedback", "supplier_note", "news", "policy"] = Field(
        description="What sort of text this is."
    )
    language: Literal["en", "zh"] = Field(description="ISO 639-1 language of `text`.")
    title: str | None = Field(None, description="Headline or subject, if any.")
    text: str = Field(min_length=1, max_length=100_000, description="The text itself.")
    author_ref: str | None = Field(None, description="Pseudonymous reference to the author.")
    subject_ref: str | None = Field(
        None, description="Customer, supplier or product the text is about."
    )
    label: str | None = Field(
        None,
        max_length=64,
        description="A known class of the text, for training the nlp classifiers: positive or "
        "negative (customer_feedback), quality, delay, price or other (supplier_note).",
    )


# --------------------------------------------------------------------------- the envelope


class Source(Contract):
    """Where an event came from, so any figure can be traced back to an ERP record."""

    system: str = Field(
        min_length=1, description="Emitting system: sdk, http, csv, erp-sap, odoo, debezium ..."
    )
    record_id: str | None = Field(None, description="Id of the originating record in that system.")
    operation: Literal["create", "update", "delete", "snapshot"] = Field(
        "create",
        description="For change data capture: an update or delete corrects an earlier event.",
    )


class EventEnvelope(Contract):
    """Fields every event has, whatever its type."""

    event_id: UUID = Field(
        description="Unique id, the idempotency key: resending it is not a new event."
    )
    tenant: TenantId
    type: str = Field(description="Event type, e.g. sales_order_line.")
    schema_version: int = Field(ge=1, strict=True, description="Version of the payload contract.")
    occurred_at: AwareDatetime = Field(description="Event time with its UTC offset (RFC 3339).")
    source: Source = Field(description="Originating system and record.")
    corrects: UUID | None = Field(
        None,
        description="The row this event restates, if any: the id of the event it corrects, or "
        "(ERP change data) the id every change of the same database row names. An update "
        "replaces that row, a delete removes it, a create puts it back.",
    )
    payload: Any = Field(description="The typed payload; its model depends on type and version.")

    @model_validator(mode="before")
    @classmethod
    def _version_is_an_integer(cls, data: Any) -> Any:
        """Each event model's ``Literal[version]`` would take ``true`` or ``1.0`` for 1 (and a
        field validator cannot run before a union's discriminator)."""
        version = data.get("schema_version", 1) if isinstance(data, dict) else 1
        if isinstance(version, bool) or not isinstance(version, int):
            raise PydanticCustomError(
                "int_type",
                "schema_version: Input should be a valid integer, not {kind}",
                {"kind": type(version).__name__},
            )
        return data


def _event_model(type_name: str, version: int, payload: type[Contract]) -> type[EventEnvelope]:
    name = "".join(part.title() for part in type_name.split("_")) + f"EventV{version}"
    model = create_model(
        name,
        __base__=EventEnvelope,
        __doc__=f"A `{type_name}` event, payload version {version}: {payload.__doc__}",
        # Literal of a runtime value: the discriminators of this (type, version) pair.
        type=(Literal[type_name], Field(description="Event type.")),  # type: ignore[arg-type]
        schema_version=(
            Literal[version],  # type: ignore[arg-type]
            Field(description="Version of the payload contract."),
        ),
        payload=(payload, Field(description=payload.__doc__ or "")),
    )
    return model


PAYLOADS: dict[tuple[str, int], type[Contract]] = {
    ("sales_order_line", 1): SalesOrderLine,
    ("inventory_level", 1): InventoryLevel,
    ("purchase_order", 1): PurchaseOrder,
    ("supplier_delivery", 1): SupplierDelivery,
    ("production_output", 1): ProductionOutput,
    ("workforce", 1): Workforce,
    ("market_price", 1): MarketPrice,
    ("text_document", 1): TextDocument,
}

EVENT_MODELS: dict[tuple[str, int], type[EventEnvelope]] = {
    key: _event_model(key[0], key[1], payload) for key, payload in PAYLOADS.items()
}
EVENT_TYPES: frozenset[str] = frozenset(name for name, _ in PAYLOADS)


def latest_version(type_name: str) -> int:
    return max(version for name, version in PAYLOADS if name == type_name)


class UnknownEventType(LookupError):
    """The ``(type, schema_version)`` pair has no contract."""

    def __init__(self, type_name: object, version: object) -> None:
        known = ", ".join(f"{n} v{v}" for n, v in sorted(PAYLOADS))
        super().__init__(f"unknown event type {type_name!r} version {version!r}; known: {known}")
        self.type_name = type_name
        self.version = version


def model_for(type_name: object, version: object) -> type[EventEnvelope]:
    """The envelope model of ``(type, version)``; raises :class:`UnknownEventType`."""
    model = (
        EVENT_MODELS.get((type_name, version))
        if isinstance(type_name, str) and isinstance(version, int) and not isinstance(version, bool)
        else None
    )
    if model is None:
        raise UnknownEventType(type_name, version)
    return model


def validate_event(data: dict[str, Any]) -> EventEnvelope:
    """Validate a decoded event against its contract (``pydantic.ValidationError`` on failure)."""
    return model_for(data.get("type"), data.get("schema_version")).model_validate(data)


# --------------------------------------------------------------------------- event time


@dataclass(frozen=True)
class EventTimeBounds:
    """How far an event's ``occurred_at`` may be from the moment the network received it.

    Not part of the contract (no schema can say "now"): every way in checks it with
    :func:`event_time_error` — the gateway, CSV, the CDC and file-drop connectors against the
    time they read the record, the clean service against the record's Kafka timestamp (so a
    replay of old records later is not refused). Historical data is welcome back to
    ``earliest``; nothing may come from further ahead than ``max_ahead`` (clock skew)."""

    max_ahead: timedelta = timedelta(hours=1)
    earliest: datetime = datetime(2000, 1, 1, tzinfo=UTC)


DEFAULT_EVENT_TIME = EventTimeBounds()


def event_time_error(
    occurred_at: datetime, received: datetime | None, bounds: EventTimeBounds = DEFAULT_EVENT_TIME
) -> str | None:
    """Why ``occurred_at`` (aware) is implausible for a record received at ``received`` (None:
    unknown, then only ``earliest`` is checked), or None when it is plausible.

    Differences, never sums: ``occurred_at`` may be year 9999 with an offset, which has no UTC
    datetime (converting it raises ``OverflowError``)."""
    if occurred_at - bounds.earliest < timedelta(0):
        return f"{occurred_at.isoformat()} is before {bounds.earliest.isoformat()}"
    if received is not None and occurred_at - received > bounds.max_ahead:
        return (
            f"{occurred_at.isoformat()} is more than {bounds.max_ahead} ahead of the time "
            f"the record was received ({received.isoformat(timespec='seconds')})"
        )
    return None


def kafka_received_at(timestamp_ms: int | None) -> datetime | None:
    """A Kafka record's timestamp as the moment it was received; None when it has none
    (Kafka's ``-1``; ``0`` too, which no real producer or broker writes)."""
    if timestamp_ms is None or timestamp_ms <= 0:
        return None
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC)


def payload_fields(type_name: str, version: int | None = None) -> dict[str, Any]:
    """Field name -> pydantic FieldInfo of a payload (CSV column mapping uses it)."""
    model = PAYLOADS[(type_name, version or latest_version(type_name))]
    return dict(model.model_fields)


class QualityFlags(Contract):
    """What cleaning did to an event, so consumers can weigh or filter it."""

    filled: list[str] = Field(
        default_factory=list, description="Fields filled by their missing-value policy."
    )
    converted: list[str] = Field(
        default_factory=list, description="Fields converted to canonical units or currency."
    )
    outliers: list[str] = Field(
        default_factory=list, description="Metrics flagged by the robust z-score."
    )


class Conversion(Contract):
    """One money field converted to yuan, and the dated rate it was converted with."""

    field: str = Field(description="The payload field converted (e.g. unit_price).")
    from_currency: CurrencyCode = Field(description="The currency it was stated in.")
    original: DecimalText = Field(description="Its value as stated, in `from_currency`.")
    rate: DecimalText = Field(description="Yuan per unit of `from_currency` used.")
    rate_date: date = Field(
        description="Date of the rate: the latest on or before the event's date (UTC)."
    )
    rate_source: str = Field(description="Who published the rate (reference.fx-rates.v1).")


class CleanEvent(EventEnvelope):
    """An event after cleaning: canonical units and currency, fills applied, quality flagged.

    ``payload`` keeps the event type's fields with canonical values (money as exact decimal
    strings, in CNY); ``amounts`` the money measures computed from them exactly; ``metrics``
    the numeric measures (e.g. ``sales.amount_cny``, the float of its exact amount) that
    analytics works on; ``conversions`` the rate each converted field was converted with.
    """

    payload: dict[str, Any] = Field(
        description="The payload with canonical values; money as exact decimal strings in CNY."
    )
    metrics: dict[str, float] = Field(
        default_factory=dict, description="Numeric measures derived from the payload."
    )
    amounts: dict[str, DecimalText] = Field(
        default_factory=dict,
        description="Money measures computed exactly (Decimal, no rounding) from the payload, "
        "as decimal strings; the metric of the same name is its float.",
    )
    conversions: list[Conversion] = Field(
        default_factory=list, description="Currency conversions made, with the dated rate used."
    )
    quality: QualityFlags = Field(default_factory=QualityFlags, description="What cleaning did.")
