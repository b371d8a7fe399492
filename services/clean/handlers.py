"""The cleaning rules as plain functions over a consumed batch; no broker in this module.

:func:`clean_batch` takes the records of one ``getmany`` and the per-partition
:class:`CleanState`, and returns the clean records to produce (grouped by source partition) and
the dead letters. For each record, in order:

1. **validate** against the contract (``model_for(type, version).model_validate`` — exactly what
   :func:`schemas.events.validate_event` does); undecodable or invalid -> dead letter, and so
   is an ``occurred_at`` out of :func:`schemas.events.event_time_error`'s bounds (relative to
   the record's Kafka timestamp, as ingest checks it against its arrival);
   a valid record that is not on its tenant's **home partition** (murmur2 of the tenant id, as
   Java's default partitioner and :func:`shared.kafka.partition_of` compute it) or not keyed by
   its tenant is **re-routed**: returned to be produced again, unchanged but for the key and a
   :data:`REROUTED_HEADER`, to the home partition of the source topic, and not cleaned here.
   So every record of a tenant is cleaned by the owner of one partition, whatever partitioner
   its producer used, and a repeated ``event_id`` meets the ids it must be checked against;
2. **de-duplicate** by ``event_id`` against the ids the partition cleaned within the horizon,
   measured from when each was cleaned (:class:`PartitionState`: on disk, one lookup per batch);
3. **fill** missing values by the contract's ``x-missing`` policy: ``default`` values are written
   before conversion (they are stated in canonical units and CNY), ``refuse`` -> dead letter,
   ``carry_forward`` takes the tenant's last canonical value for the same entity (e.g. the SKU
   and unit) after conversion, if it is no older in event time than the dedupe horizon; with no
   such value the field stays empty (and metrics that need it are left out);
4. **convert** prices to CNY with the dated rates of ``reference.fx-rates.v1``
   (:class:`shared.rates.FxRates`: the rate of the latest date on or before the event's date in
   UTC, among the rates published before the raw record's Kafka timestamp; none -> dead letter
   ``no EUR rate on or before 2026-11-30``, which can be re-driven — published again, the same
   ``event_id`` — once the rate exists), recording each rate used on the clean event
   (``conversions``); units to canonical ones (kg, l, m, pcs; per-unit prices follow the unit)
   and ``occurred_at`` to UTC;
5. derive the **metrics** analytics works on and flag **outliers** by a robust (modified) z-score
   ``0.6745 * (x - median) / MAD`` over the tenant's last ``window`` values of the metric, once at
   least ``min_history`` values exist. When more than half of the window equals its median (MAD
   is 0) the mean absolute deviation is used instead, ``(x - median) / (1.253314 * MeanAD)``; when
   every value of the window is the same, any different value is an outlier.

**Money is exact.** A record is read by the msgspec mirrors of its contract
(:func:`schemas.fast.fast_any_event`, money as ``Decimal`` from the JSON text) or, when a mirror
refuses it, by the contract itself from :func:`schemas.events.decode_exact`; never through a
float. Prices, rates and amounts are ``Decimal`` and computed in
:data:`schemas.events.MONEY_CONTEXT`, which is wide enough for every product of bounded values
and traps ``Inexact``: **no rounding anywhere**. A quantity is a float in the contract; an amount
uses its shortest decimal form (``repr``: the number as sent, up to 15 significant digits) times
the unit factor, exactly. The clean event carries money as exact decimal strings (payload in
CNY, ``amounts``); the float ``metrics`` (statistics are floats) are the floats of those amounts.

Corrections (``source.operation`` update or delete, referencing ``corrects``) are cleaned the
same way and passed through, but they restate an earlier fact rather than add an observation, so
they are not outlier-scored and feed neither the rolling windows nor the carry-forward values.

The state is kept per partition on disk (:mod:`services.clean.store`) and is a copy of what the
clean topic implies: everything it holds can be rebuilt from the clean events themselves
(:meth:`CleanState.remember`), which is how the app catches a store up, or rebuilds a lost one,
when a partition is assigned. Only the ids of the current batch, the carry-forward values and
the rolling windows (per tenant; no tenant's events move another's) are held in memory.

Why plain Python rather than pandas per batch: each value is scored against the window *as it
was just before it* (exact and independent of batch boundaries, so a replay flags the same
values). Vectorised exactly with numpy (sliding windows, median and MAD per row) that measured
about 6 us per value; a sorted window per tenant and metric with bisection costs about 1 us,
and the rest is per-record branching that a DataFrame would not make cheaper, while building
one and turning it back into records costs about 10 us per record.
"""

from __future__ import annotations

import asyncio
import math
import time
from bisect import bisect_left, bisect_right, insort
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol
from uuid import UUID

import msgspec
from pydantic import ValidationError

from schemas.events import (
    DEFAULT_EVENT_TIME,
    MONEY_CONTEXT,
    PAYLOADS,
    EventTimeBounds,
    UnknownEventType,
    decimal_text,
    decode_exact,
    event_time_error,
    kafka_received_at,
    model_for,
)
from schemas.fast import EVENT_TYPE_OF, fast_any_event
from schemas.insights import FieldError
from services.clean.settings import CleanSettings
from services.clean.store import CarryKey, PartitionStore, WindowKey
from shared.codec import encode
from shared.deadletter import ConsumedRecord, dead_letter_record, field_errors, record_dead_letter
from shared.kafka import KafkaHealth, OutRecord, partition_of, retrying
from shared.rates import FxRates, RatesReader

SERVICE = "clean"
CORRECTIONS = frozenset({"update", "delete"})
_ZERO = timedelta(0)

# --------------------------------------------------------------------------- rules and tables


@dataclass(frozen=True)
class CleanRules:
    """The knobs of cleaning, taken from :class:`CleanSettings` (rates are live state:
    :attr:`CleanState.rates`)."""

    horizon_seconds: float = 7 * 86400.0
    window: int = 200
    min_history: int = 20
    threshold: float = 3.5
    memory_mb: int = 16
    event_time: EventTimeBounds = DEFAULT_EVENT_TIME

    @classmethod
    def from_settings(cls, settings: CleanSettings) -> CleanRules:
        return cls(
            horizon_seconds=settings.clean_dedupe_horizon_days * 86400.0,
            memory_mb=settings.clean_dedupe_memory_mb,
            window=settings.clean_outlier_window,
            min_history=settings.clean_outlier_min_history,
            threshold=settings.clean_outlier_threshold,
            event_time=settings.event_time_bounds(),
        )


UNITS: dict[str, tuple[str, float]] = {
    "kg": ("kg", 1.0),
    "kgs": ("kg", 1.0),
    "g": ("kg", 0.001),
    "t": ("kg", 1000.0),
    "ton": ("kg", 1000.0),
    "tons": ("kg", 1000.0),
    "tonne": ("kg", 1000.0),
    "tonnes": ("kg", 1000.0),
    "l": ("l", 1.0),
    "ml": ("l", 0.001),
    "m": ("m", 1.0),
    "cm": ("m", 0.01),
    "mm": ("m", 0.001),
    "pcs": ("pcs", 1.0),
    "pc": ("pcs", 1.0),
    "piece": ("pcs", 1.0),
    "pieces": ("pcs", 1.0),
}
"""Unit as written (case-insensitive) -> (canonical unit, factor to multiply quantities by).
Units not listed (kWh, box, set ...) are kept as they are."""


def canonical_unit(unit: str) -> tuple[str, float] | None:
    """``"T"`` -> ``("kg", 1000.0)``; None for a unit with no canonical form."""
    return UNITS.get(unit.strip().lower())


_EXACT_FACTORS: dict[float, Decimal] = {
    factor: Decimal(repr(factor)) for _, factor in UNITS.values()
}
"""Each unit factor as the decimal it is written as (0.001, not the float nearest to it)."""


def exact_quantity(value: float | int) -> Decimal:
    """A quantity (a float in the contract) as the decimal it was sent as: its shortest
    representation, exact for up to 15 significant digits."""
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def as_money(value: Any) -> Decimal:
    """A money value held in state (a decimal string; a float in stores of older versions)."""
    if isinstance(value, Decimal):
        return value
    return Decimal(value) if isinstance(value, str) else exact_quantity(value)


Metrics = dict[str, float]


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def _sales_metrics(p: Mapping[str, Any]) -> Metrics:
    return {"sales.quantity": float(p["quantity"])}


def _inventory_metrics(p: Mapping[str, Any]) -> Metrics:
    return {"inventory.on_hand": float(p["on_hand"])}


def _purchase_metrics(p: Mapping[str, Any]) -> Metrics:
    return {"purchasing.quantity": float(p["quantity"])}


def _delivery_metrics(p: Mapping[str, Any]) -> Metrics:
    m = {"delivery.quantity": float(p["delivered_quantity"])}
    rate = _ratio(p["rejected_quantity"] or 0.0, p["delivered_quantity"])
    if rate is not None:
        m["delivery.reject_rate"] = rate
    if p["promised_date"] is not None:
        m["delivery.delay_days"] = float((p["delivered_date"] - p["promised_date"]).days)
    return m


def _production_metrics(p: Mapping[str, Any]) -> Metrics:
    m = {"production.quantity": float(p["quantity"])}
    scrap = p["scrap_quantity"] or 0.0
    rate = _ratio(scrap, p["quantity"] + scrap)
    if rate is not None:
        m["production.scrap_rate"] = rate
    return m


def _workforce_metrics(p: Mapping[str, Any]) -> Metrics:
    m = {"workforce.headcount": float(p["headcount"])}
    worked = p["hours_worked"]
    if worked is not None:
        m["workforce.hours_worked"] = float(worked)
        rate = _ratio(p["absence_hours"] or 0.0, worked + (p["absence_hours"] or 0.0))
        if rate is not None:
            m["workforce.absence_rate"] = rate
    return m


def _no_metrics(p: Mapping[str, Any]) -> Metrics:
    return {}


@dataclass(frozen=True)
class TypeShape:
    """What cleaning needs to know about an event type beyond its contract."""

    entity: tuple[str, ...]
    """Payload fields naming the entity whose last value ``carry_forward`` uses (with the
    canonical unit where there is one: a price per kg is no price per piece)."""
    quantities: tuple[str, ...] = ()
    """Fields measured in ``unit``: multiplied by the unit's factor."""
    prices: tuple[str, ...] = ()
    """Fields priced in ``currency`` per ``unit``: to CNY, divided by the unit's factor."""
    metrics: Callable[[Mapping[str, Any]], Metrics] = _no_metrics
    amounts: tuple[tuple[str, str | None, str], ...] = ()
    """Money metrics, computed exactly: (metric, quantity field or None, price field); the
    amount is quantity x price in CNY (or the price itself)."""


SHAPES: dict[str, TypeShape] = {
    "sales_order_line": TypeShape(
        ("product_sku", "unit"),
        ("quantity",),
        ("unit_price",),
        _sales_metrics,
        (("sales.amount_cny", "quantity", "unit_price"),),
    ),
    "inventory_level": TypeShape(
        ("site_id", "product_sku", "unit"),
        ("on_hand", "reserved", "reorder_point"),
        ("unit_cost",),
        _inventory_metrics,
        (("inventory.value_cny", "on_hand", "unit_cost"),),
    ),
    "purchase_order": TypeShape(
        ("supplier_id", "product_sku", "unit"),
        ("quantity",),
        ("unit_price",),
        _purchase_metrics,
        (("purchasing.amount_cny", "quantity", "unit_price"),),
    ),
    "supplier_delivery": TypeShape(
        ("supplier_id", "product_sku", "unit"),
        ("delivered_quantity", "rejected_quantity"),
        (),
        _delivery_metrics,
    ),
    "production_output": TypeShape(
        ("line_id", "product_sku", "unit"),
        ("quantity", "scrap_quantity"),
        (),
        _production_metrics,
    ),
    "workforce": TypeShape(("site_id",), (), (), _workforce_metrics),
    "market_price": TypeShape(
        ("commodity", "market"), (), ("price",), _no_metrics, (("market.price_cny", None, "price"),)
    ),
    "text_document": TypeShape(()),
}
_GENERIC = TypeShape(())


@dataclass(frozen=True)
class FillRule:
    field: str
    policy: Literal["default", "carry_forward", "refuse"]
    value: Any = None


@cache
def fill_rules(type_name: str, version: int) -> tuple[FillRule, ...]:
    """The ``x-missing`` policies the contract declares for ``(type, version)``."""
    rules: list[FillRule] = []
    for name, info in PAYLOADS[(type_name, version)].model_fields.items():
        extra = info.json_schema_extra
        rule = extra.get("x-missing") if isinstance(extra, dict) else None
        if isinstance(rule, dict):
            rules.append(FillRule(name, rule["policy"], rule.get("value")))  # type: ignore[arg-type]
    return tuple(rules)


@cache
def _fill_plan(type_name: str, version: int) -> tuple[tuple[FillRule, ...], tuple[str, ...]]:
    """(default and refuse rules, carry-forward fields): the two moments fills happen."""
    rules = fill_rules(type_name, version)
    early = tuple(rule for rule in rules if rule.policy != "carry_forward")
    carried = tuple(rule.field for rule in rules if rule.policy == "carry_forward")
    return early, carried


# --------------------------------------------------------------------------- state


def exceeds(ordered: Sequence[float], value: float, min_history: int, threshold: float) -> bool:
    """Is ``|0.6745 (value - median) / MAD| > threshold`` against the sorted ``ordered``?

    Sorted, the median is an index away and ``MAD < bound`` is a count of the deviations below
    the bound (two bisections); the MAD itself is computed only in the rare tie of an even-sized
    window. When the MAD is 0 the mean absolute deviation stands in (see the module docstring).
    """
    n = len(ordered)
    if n < min_history:
        return False
    half = n >> 1
    median = ordered[half] if n & 1 else (ordered[half - 1] + ordered[half]) * 0.5
    distance = abs(value - median)
    if distance == 0:
        return False
    bound = 0.6745 * distance / threshold  # |z| > threshold  <=>  MAD < bound
    below = bisect_left(ordered, median + bound) - bisect_right(ordered, median - bound)
    if below > half:  # the middle deviation(s) are below the bound: an outlier, unless MAD is 0
        if 2 * (bisect_right(ordered, median) - bisect_left(ordered, median)) <= n:
            return True
        mean_ad = sum(abs(v - median) for v in ordered) / n
        return mean_ad == 0 or distance / (1.253314 * mean_ad) > threshold
    if below < half or n & 1:
        return False
    deviations = sorted(abs(v - median) for v in ordered)  # even n, straddling: exact
    mad = (deviations[half - 1] + deviations[half]) * 0.5
    return 0.6745 * distance / mad > threshold


class RollingWindow:
    """The last ``size`` values of one tenant's metric, in arrival order and sorted."""

    __slots__ = ("arrival", "ordered")

    def __init__(self) -> None:
        self.arrival: deque[float] = deque()
        self.ordered: list[float] = []

    def push(self, value: float, size: int) -> None:
        arrival, ordered = self.arrival, self.ordered
        if len(arrival) >= size:
            del ordered[bisect_left(ordered, arrival.popleft())]
        arrival.append(value)
        insort(ordered, value)

    def is_outlier(self, value: float, min_history: int, threshold: float) -> bool:
        """Would ``value`` be flagged against the values held (without adding it)?"""
        return exceeds(self.ordered, value, min_history, threshold)

    def observe(self, value: float, size: int, min_history: int, threshold: float) -> bool:
        """Score ``value`` against the window, then add it; True if it is an outlier."""
        arrival, ordered = self.arrival, self.ordered
        outlier = exceeds(ordered, value, min_history, threshold)
        if len(arrival) >= size:
            del ordered[bisect_left(ordered, arrival.popleft())]
        arrival.append(value)
        insort(ordered, value)
        return outlier

    def __len__(self) -> int:
        return len(self.arrival)


def robust_z(value: float, history: Sequence[float]) -> float:
    """The modified z-score of ``value`` against ``history`` (reference; used by tests)."""
    ordered = sorted(history)
    n = len(ordered)
    median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
    deviations = sorted(abs(v - median) for v in ordered)
    mad = (deviations[(n - 1) // 2] + deviations[n // 2]) / 2
    if mad > 0:
        return 0.6745 * (value - median) / mad
    mean_ad = sum(deviations) / n
    if mean_ad > 0:
        return (value - median) / (1.253314 * mean_ad)
    return 0.0 if value == median else math.copysign(math.inf, value - median)


EXPIRE_EVERY_MS = 60_000
"""How often a partition's store forgets the ids past the horizon (lookups check the time of
each id anyway, so this only bounds the disk)."""
EXPIRE_STEP = 20_000
"""Most ids one flush forgets: a backlog of expired ids is worked off over several batches."""


class PartitionState:
    """What cleaning remembers for one partition: the ids on disk, with those cleaned since the
    last :meth:`flush` in memory; the carry-forward values and rolling windows in memory, and on
    disk as of the last checkpoint.

    An id is a duplicate while it was cleaned within the horizon, measured by when it was cleaned
    (the hop's clock, the clean record's timestamp), never by an event's ``occurred_at``: no
    tenant's clock moves what another tenant's ids are remembered for.
    """

    def __init__(self, store: PartitionStore, window_size: int) -> None:
        self.store = store
        self.pending: dict[bytes, int] = {}
        """Ids cleaned since the last flush -> when (ms); written to the store by :meth:`flush`."""
        self.carry: dict[CarryKey, tuple[Any, float]] = dict(store.carried())
        """The tenant's last value of a carry-forward field and its event time."""
        self.windows: dict[WindowKey, RollingWindow] = {}
        for key, values in store.windows():
            window = self.windows[key] = RollingWindow()
            for value in values:
                window.push(value, window_size)
        self.changed_carry: set[CarryKey] = set()
        self.changed_windows: set[WindowKey] = set()
        self.next_offset: int | None = store.checkpoint
        """The clean-topic offset our next record there should get while every record since the
        store's checkpoint is ours (None once another writer's record came between)."""
        self.expired_at = -EXPIRE_EVERY_MS

    def seen(self, ids: Sequence[bytes], since_ms: int) -> set[bytes]:
        """Those of ``ids`` cleaned at ``since_ms`` or later (one store lookup for all)."""
        pending = self.pending
        found = self.store.seen_since(ids, since_ms)
        return {
            event_id
            for event_id, stored in zip(ids, found, strict=True)
            if stored or pending.get(event_id, -1) >= since_ms
        }

    def advance(self, runs: Sequence[tuple[int, int]]) -> int | None:
        """Our records just acknowledged on the clean partition, as (base offset, count) in the
        order sent: the new checkpoint if they follow the last one without a gap, else None."""
        offset = self.next_offset
        for base, count in runs:
            if offset is None or base != offset:
                self.next_offset = None
                return None
            offset = base + count
        self.next_offset = offset
        return offset if runs else None

    def flush(
        self, checkpoint: int | None, now_ms: int, horizon_ms: int, tail: bytes | None = None
    ) -> None:
        """Write the pending ids to the store — and, with a ``checkpoint`` (the clean offset every
        record below which is now reflected) and the ``tail`` digest of the record just below it,
        the changed windows and carry values with them."""
        windows = carry = None
        if checkpoint is not None:
            windows = {key: self.windows[key].arrival for key in self.changed_windows}
            carry = {key: self.carry[key] for key in self.changed_carry}
        if self.pending or checkpoint is not None:
            self.store.write(self.pending, windows, carry, checkpoint, tail)
        self.pending = {}
        self.changed_windows.clear()
        self.changed_carry.clear()
        due = now_ms - self.expired_at >= EXPIRE_EVERY_MS
        if due and self.store.expire(now_ms - horizon_ms, EXPIRE_STEP) < EXPIRE_STEP:
            self.expired_at = now_ms  # else a bounded step now, the rest with the next batch


class CleanState:
    """Per-partition state of the hop; partitions come and go with the consumer group.

    Partition ``p``'s store lives in ``directory/p`` and outlives the process; ``partitions``
    is the source topic's partition count, which decides each tenant's home partition.
    ``rates`` is the table of dated rates (the app's :class:`shared.rates.RatesReader` keeps it
    current; the hop waits until it has read past a batch's records before cleaning it).
    """

    def __init__(
        self,
        rules: CleanRules,
        directory: Path | str,
        *,
        partitions: int,
        rates: FxRates | None = None,
    ) -> None:
        self.rules = rules
        self.rates = rates if rates is not None else FxRates()
        self.rates_reader: RatesReader | None = None
        self.directory = Path(directory)
        self.source_partitions = partitions
        self.partitions: dict[int, PartitionState] = {}
        self._homes: dict[str, tuple[bytes, int]] = {}

    def follow_rates(self, reader: RatesReader) -> None:
        """Convert with ``reader``'s table, waiting for it in :meth:`rates_caught_up`."""
        self.rates_reader, self.rates = reader, reader.table

    async def rates_caught_up(
        self,
        batches: Mapping[Any, Sequence[RawRecord]],
        *,
        health: KafkaHealth | None = None,
        stop: asyncio.Event | None = None,
        attempt_seconds: float = 30.0,
    ) -> None:
        """Wait until the rates table holds every rate published before the newest record
        that may need one (a record naming a currency other than CNY; the check is on the raw
        bytes, erring towards waiting), so that which rate an event gets depends on the rates
        topic and the event's Kafka timestamp only, never on when this hop read either.

        While the rates topic cannot be read (the broker away) this waits as long as it takes,
        saying so every ``attempt_seconds`` through ``health``: a batch in hand is never
        cleaned with a rate that may be out of date, and the hop does not stop for it. Once
        ``stop`` is set, the next failed attempt raises (the batch is read again on restart)."""
        reader = self.rates_reader
        if reader is None:
            return
        newest = 0
        for records in batches.values():
            for record in records:
                value = record.value
                if (
                    value is not None
                    and record.timestamp > newest
                    and b'"currency"' in value
                    and b'"currency":"CNY"' not in value
                ):
                    newest = record.timestamp
        if newest > self.rates.synced_ms:
            await retrying(
                lambda: reader.caught_up(newest, attempt_seconds),
                what="reading the exchange rates",
                health=health,
                stop=stop,
            )

    def home(self, tenant: str) -> tuple[bytes, int]:
        """(key, partition) a record of ``tenant`` belongs to: the contract's murmur2 of the key."""
        found = self._homes.get(tenant)
        if found is None:
            key = tenant.encode()
            found = self._homes[tenant] = (key, partition_of(key, self.source_partitions))
        return found

    def partition(self, number: int) -> PartitionState:
        state = self.partitions.get(number)
        if state is None:
            store = PartitionStore(self.directory / str(number), self.rules.memory_mb)
            state = self.partitions[number] = PartitionState(store, self.rules.window)
        return state

    def drop(self, number: int) -> None:
        """Close partition ``number``'s store (it stays on disk) and forget it here."""
        state = self.partitions.pop(number, None)
        if state is not None:
            state.store.close()

    def wipe(self, number: int) -> None:
        """Delete partition ``number``'s store: it will be rebuilt from the clean topic."""
        self.drop(number)
        PartitionStore.destroy(self.directory / str(number))

    def close(self) -> None:
        for number in list(self.partitions):
            self.drop(number)

    def flush(
        self, number: int, checkpoint: int | None, now_ms: int, tail: bytes | None = None
    ) -> None:
        horizon_ms = int(self.rules.horizon_seconds * 1000)
        self.partition(number).flush(checkpoint, now_ms, horizon_ms, tail)

    def remember(self, number: int, event: Mapping[str, Any], cleaned_ms: int) -> None:
        """Replay one clean event (decoded), cleaned at ``cleaned_ms`` (its record's timestamp),
        into the state of partition ``number``."""
        state = self.partition(number)
        state.pending[UUID(event["event_id"]).bytes] = cleaned_ms
        if event["source"].get("operation") in CORRECTIONS:
            return
        at = datetime.fromisoformat(event["occurred_at"]).timestamp()
        tenant, type_name, payload = event["tenant"], event["type"], event["payload"]
        if (type_name, event["schema_version"]) in PAYLOADS:
            carried = _fill_plan(type_name, event["schema_version"])[1]
            if carried:
                entity = tuple(payload.get(name) for name in SHAPES.get(type_name, _GENERIC).entity)
                filled = event["quality"]["filled"]
                for name in carried:  # a value filled by carrying it is not a newer observation
                    if payload.get(name) is not None and name not in filled:
                        key = (tenant, type_name, entity, name)
                        state.carry[key] = (payload[name], at)
                        state.changed_carry.add(key)
        size = self.rules.window
        for metric, value in event["metrics"].items():
            window = state.windows.get((tenant, metric))
            if window is None:
                window = state.windows[(tenant, metric)] = RollingWindow()
            window.push(value, size)
            state.changed_windows.add((tenant, metric))


# --------------------------------------------------------------------------- the batch


class RawRecord(ConsumedRecord, Protocol):
    """What :func:`clean_batch` reads of a consumed record (aiokafka's ``ConsumerRecord``)."""

    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


REROUTED_HEADER = "xietong-rerouted-from"
"""Header added to a raw record re-produced to its tenant's partition: ``topic/partition/offset``
of where it arrived."""


@dataclass
class CleanedBatch:
    """The outcome of one batch: what to produce and what happened."""

    clean: dict[int, list[OutRecord]] = field(default_factory=dict)
    """Source partition -> clean records (produced to the same partition of the clean topic)."""
    dead: list[OutRecord] = field(default_factory=list)
    dead_reasons: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    rerouted: dict[int, list[OutRecord]] = field(default_factory=dict)
    """Home partition -> raw records that arrived elsewhere (or keyed otherwise), to produce
    again, unchanged but for the key and one header, to that partition of the source topic."""

    @property
    def clean_count(self) -> int:
        return sum(len(records) for records in self.clean.values())

    @property
    def rerouted_count(self) -> int:
        return sum(len(records) for records in self.rerouted.values())


def _dead_letter(
    record: RawRecord, reason: str, errors: Sequence[FieldError] = (), tenant: str | None = None
) -> OutRecord:
    return dead_letter_record(
        record_dead_letter(record, reason, service=SERVICE, errors=errors, tenant=tenant)
    )


class _Refused(NamedTuple):
    letter: OutRecord
    reason: str


class _Event(NamedTuple):
    """A valid event as the batch needs it, from a mirror or from its contract."""

    event_id: UUID
    tenant: str
    type: str
    schema_version: int
    occurred_at: datetime
    source: dict[str, Any]
    corrects: UUID | None
    payload: dict[str, Any]
    """Money as ``Decimal``, read exactly."""


_asdict = msgspec.structs.asdict


def _read(value: bytes) -> _Event:
    """The record's event: the msgspec mirror when it certainly meets its contract (the usual
    case, ~3 us), else the contract (``ValidationError`` etc. say why), numbers read exactly."""
    fast = fast_any_event(value)
    if fast is not None:
        return _Event(
            fast.event_id,
            fast.tenant,
            EVENT_TYPE_OF[type(fast)],
            fast.schema_version,
            fast.occurred_at,
            _asdict(fast.source),
            fast.corrects,
            _asdict(fast.payload),
        )
    data = decode_exact(value)
    if not isinstance(data, dict):
        raise TypeError("an event must be a JSON object")
    event = model_for(data.get("type"), data.get("schema_version")).model_validate(data)
    return _Event(
        event.event_id,
        event.tenant,
        event.type,
        event.schema_version,
        event.occurred_at,
        dict(event.source.__dict__),
        event.corrects,
        dict(event.payload.__dict__),
    )


def _validated(record: RawRecord, rules: CleanRules) -> _Event | _Refused:
    """Decode and validate, as :func:`schemas.events.validate_event` (see :func:`_read`)."""
    if record.value is None:
        return _Refused(_dead_letter(record, "empty record (tombstone)"), "undecodable")
    try:
        event = _read(record.value)
    except ValidationError as error:
        return _Refused(_dead_letter(record, "invalid event", field_errors(error)), "invalid")
    except (ValueError, TypeError, UnknownEventType) as error:  # msgspec's DecodeError too
        reason = "undecodable" if not isinstance(error, UnknownEventType) else "invalid"
        return _Refused(_dead_letter(record, str(error)), reason)
    # ... and its event time bounded as at ingest, against when Kafka received the record
    late = event_time_error(
        event.occurred_at, kafka_received_at(record.timestamp), rules.event_time
    )
    if late is not None:
        problem = [FieldError(field="occurred_at", reason=late)]
        return _Refused(
            _dead_letter(record, "event time out of bounds", problem, event.tenant), "invalid"
        )
    return event


def _rerouted(record: RawRecord, key: bytes) -> OutRecord:
    assert record.value is not None  # a tombstone is a dead letter where it arrived
    origin = f"{record.topic}/{record.partition}/{record.offset}".encode()
    return OutRecord(key, record.value, (*(record.headers or ()), (REROUTED_HEADER, origin)))


def clean_batch(
    records: Iterable[RawRecord], state: CleanState, now_ms: int | None = None
) -> CleanedBatch:
    """Clean one consumed batch in order, updating ``state``; see the module docstring.

    ``now_ms`` (default: the clock) is when the batch is cleaned: what its ids are remembered
    from, and what the horizon is measured back from.
    """
    rules = state.rules
    rates, window_size = state.rates, rules.window
    min_history, threshold = rules.min_history, rules.threshold
    horizon = rules.horizon_seconds
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    since_ms = now_ms - int(horizon * 1000)
    result = CleanedBatch()
    clean, dead, reasons, rerouted = result.clean, result.dead, result.dead_reasons, result.rerouted

    # 1. validate; a record that is not on its tenant's partition under its tenant's key goes there
    checked: list[tuple[RawRecord, _Event | _Refused]] = []
    ids: dict[int, list[bytes]] = {}
    home = state.home
    for record in records:
        valid = _validated(record, rules)
        if not isinstance(valid, _Refused):
            home_key, number = home(valid.tenant)
            if number != record.partition or record.key != home_key:
                out = rerouted.get(number)
                if out is None:
                    out = rerouted[number] = []
                out.append(_rerouted(record, home_key))
                continue
            found = ids.get(number)
            if found is None:
                found = ids[number] = []
            found.append(valid.event_id.bytes)
        checked.append((record, valid))
    # ... and the ids each partition cleaned within the horizon: one store lookup per partition
    known = {number: state.partition(number).seen(found, since_ms) for number, found in ids.items()}

    for record, event in checked:
        if isinstance(event, _Refused):
            dead.append(event.letter)
            reasons[event.reason] += 1
            continue

        # 2. de-duplicate
        partition = state.partition(record.partition)
        event_id = event.event_id.bytes
        pending = partition.pending
        if event_id in known[record.partition] or pending.get(event_id, -1) >= since_ms:
            result.duplicates += 1
            continue

        tenant, type_name = event.tenant, event.type
        shape = SHAPES.get(type_name, _GENERIC)
        payload = event.payload
        filled: list[str] = []
        converted: list[str] = []
        conversions: list[dict[str, str]] = []
        exact: dict[str, Decimal] = {}  # canonical quantities as decimals, for the amounts

        # 3a. defaults (stated in canonical units and CNY) and refusals
        early, carried = _fill_plan(type_name, event.schema_version)
        refused: list[FieldError] = []
        for rule in early:
            if payload[rule.field] is None:
                if rule.policy == "default":
                    payload[rule.field] = rule.value
                    filled.append(rule.field)
                else:
                    refused.append(
                        FieldError(
                            field=f"payload.{rule.field}",
                            reason="missing, and the contract refuses a record without it",
                        )
                    )
        if refused:
            dead.append(_dead_letter(record, "missing value refused by policy", refused, tenant))
            reasons["refused_missing"] += 1
            continue

        # 4. conversions: currency to CNY (the dated rate), unit to its canonical form; money
        # in Decimal arithmetic that traps anything inexact (see the module docstring)
        if shape.prices:
            currency = payload.get("currency")
            if currency is not None and currency != "CNY":
                day = event.occurred_at.astimezone(UTC).date()
                stamp = record.timestamp
                as_of = stamp if stamp is not None and 0 < stamp <= rates.synced_ms else None
                used = rates.rate_for(currency, day, as_of or rates.synced_ms)
                if used is None:
                    why = f"no {currency} rate on or before {day.isoformat()}"
                    no_rate = FieldError(field="payload.currency", reason=why)
                    dead.append(_dead_letter(record, why, [no_rate], tenant))
                    reasons["no_rate"] += 1
                    continue
                rate_text = decimal_text(used.rate)
                for name in shape.prices:
                    value = payload[name]
                    if value is not None:
                        payload[name] = MONEY_CONTEXT.multiply(value, used.rate)
                        converted.append(name)
                        conversions.append(
                            {
                                "field": name,
                                "from_currency": currency,
                                "original": decimal_text(value),
                                "rate": rate_text,
                                "rate_date": used.date.isoformat(),
                                "rate_source": used.source,
                            }
                        )
                payload["currency"] = "CNY"
                converted.append("currency")
        unit = payload.get("unit")
        if unit is not None:
            canonical = UNITS.get(unit.lower())
            if canonical is not None:
                name, factor = canonical
                if name != unit:
                    payload["unit"] = name
                    converted.append("unit")
                if factor != 1.0:
                    exact_factor = _EXACT_FACTORS[factor]
                    for name in shape.quantities:  # defaults are stated in canonical units
                        if payload[name] is not None and name not in filled:
                            scaled = MONEY_CONTEXT.multiply(
                                exact_quantity(payload[name]), exact_factor
                            )
                            exact[name] = scaled
                            payload[name] = float(scaled)
                            converted.append(name)
                    for name in shape.prices:
                        if payload[name] is not None:
                            payload[name] = MONEY_CONTEXT.divide(payload[name], exact_factor)
                            if name not in converted:
                                converted.append(name)

        # 3b. carry forward, in canonical values, per tenant and entity, within the horizon
        correction = event.source["operation"] in CORRECTIONS
        at = event.occurred_at.timestamp()
        if carried:
            entity = tuple(payload[name] for name in shape.entity)
            carry = partition.carry
            for name in carried:
                key = (tenant, type_name, entity, name)
                money = name in shape.prices
                if payload[name] is None:
                    previous = carry.get(key)
                    if previous is not None and at - previous[1] <= horizon:
                        payload[name] = as_money(previous[0]) if money else previous[0]
                        filled.append(name)
                elif not correction:  # money as the exact text the clean event carries
                    kept = decimal_text(payload[name]) if money else payload[name]
                    carry[key] = (kept, at)
                    partition.changed_carry.add(key)

        # 5. metrics (money ones from exact amounts) and outlier flags
        metrics = shape.metrics(payload)
        amounts: dict[str, str] = {}
        for metric, quantity_field, price_field in shape.amounts:
            price = payload[price_field]
            if price is None:
                continue
            if quantity_field is not None:
                quantity = exact.get(quantity_field)
                if quantity is None:
                    quantity = exact_quantity(payload[quantity_field])
                price = MONEY_CONTEXT.multiply(quantity, price)
            amounts[metric] = decimal_text(price)
            metrics[metric] = float(price)
        for name in shape.prices:  # the clean event carries money as exact decimal strings
            if payload.get(name) is not None:
                payload[name] = decimal_text(payload[name])
        outliers: list[str] = []
        for metric, value in list(metrics.items()):
            if not math.isfinite(value):
                del metrics[metric]
            elif not correction:
                window = partition.windows.get((tenant, metric))
                if window is None:
                    window = partition.windows[(tenant, metric)] = RollingWindow()
                if window.observe(value, window_size, min_history, threshold):
                    outliers.append(metric)
                partition.changed_windows.add((tenant, metric))

        occurred_at = event.occurred_at
        if occurred_at.utcoffset() != _ZERO:
            occurred_at = occurred_at.astimezone(UTC)
            converted.append("occurred_at")

        pending[event_id] = now_ms
        encoded = encode(
            {
                "event_id": event.event_id,
                "tenant": tenant,
                "type": type_name,
                "schema_version": event.schema_version,
                "occurred_at": occurred_at,
                "source": event.source,
                "corrects": event.corrects,
                "payload": payload,
                "metrics": metrics,
                "amounts": amounts,
                "conversions": conversions,
                "quality": {"filled": filled, "converted": converted, "outliers": outliers},
            }
        )
        out = clean.get(record.partition)
        if out is None:
            out = clean[record.partition] = []
        out.append(OutRecord(tenant.encode(), encoded))
    return result
