"""Point-in-time features: the same builders serve training (a replay) and scoring (live).

The state keeps, per firm, what its events say (a supplier's deliveries, market prices, sales
per window) indexed by **event time**; a feature for a prediction at time ``t`` reads only
entries with an event time at or before ``t`` (a bisect), so events that arrive later — or
arrive now but happened after ``t`` — never change it (a test injects them and checks). A
replay of the clean topic in any order therefore builds the same training rows as the live
service built when it scored.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np

from services.ml.specs import DEMAND, SUPPLIER_DELAY
from shared.codec import decode

DAY = 86_400.0
HISTORY_PER_SUPPLIER = 200
RECENT_DELIVERIES = 50
MARKET_LOOKBACK_DAYS = 30.0


@dataclass(frozen=True, slots=True)
class MlEvent:
    """What the ml service needs of a clean event."""

    tenant: str
    type: str
    time: float
    """occurred_at, epoch seconds."""
    event_id: str
    schema_version: int
    payload: dict[str, Any]


def parse_event(value: bytes | None) -> MlEvent:
    """A clean record's fields; ``ValueError`` says why it is unusable."""
    if value is None:
        raise ValueError("empty record")
    data = decode(value)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    tenant, kind, version = data.get("tenant"), data.get("type"), data.get("schema_version")
    if not isinstance(tenant, str) or not isinstance(kind, str) or not isinstance(version, int):
        raise ValueError("tenant, type or schema_version missing")
    raw_time, payload = data.get("occurred_at"), data.get("payload")
    if not isinstance(raw_time, str) or not isinstance(payload, dict):
        raise ValueError("occurred_at or payload missing")
    moment = datetime.fromisoformat(raw_time)
    if moment.tzinfo is None:
        raise ValueError("occurred_at has no UTC offset")
    return MlEvent(tenant, kind, moment.timestamp(), str(data.get("event_id")), version, payload)


def _day(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC).timestamp()
    except ValueError:
        return None


def _number(value: Any) -> float:
    if isinstance(value, str):  # money on the clean event: an exact decimal string
        try:
            return float(value)
        except ValueError:
            return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


@dataclass(frozen=True, slots=True)
class Subject:
    """Something to predict: the firm, the triggering event, the raw feature row."""

    tenant: str
    event_id: str
    time: float
    key: str
    """What the label joins on: ``po_id`` (supplier delay), ``sku@window`` (demand)."""
    product: str
    row: np.ndarray
    """Feature values in the spec's order; ``product_code`` is NaN until a model encodes it."""


# --------------------------------------------------------------------------- supplier delay


@dataclass
class SupplyState:
    """Deliveries per (firm, supplier), market prices per commodity, and labels per PO."""

    deliveries: dict[tuple[str, str], list[tuple[float, float, float, float, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    """(firm, supplier) -> sorted (time, delay_days, on_time, delivered, rejected)."""
    market: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    labels: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    """(firm, po_id) -> (time the label became known, 1.0 late / 0.0 on time)."""

    def observe(self, event: MlEvent) -> None:
        p = event.payload
        if event.type == "supplier_delivery":
            delivered, promised = _day(p.get("delivered_date")), _day(p.get("promised_date"))
            if delivered is None or promised is None:
                return
            delay = (delivered - promised) / DAY
            history = self.deliveries[(event.tenant, str(p.get("supplier_id")))]
            entry = (
                event.time,
                delay,
                0.0 if delay > 0 else 1.0,
                _number(p.get("delivered_quantity")),
                _number(p.get("rejected_quantity")) if p.get("rejected_quantity") else 0.0,
            )
            bisect.insort(history, entry)
            if len(history) > HISTORY_PER_SUPPLIER:
                del history[0]
            self.labels[(event.tenant, str(p.get("po_id")))] = (
                event.time,
                1.0 if delay > 0 else 0.0,
            )
        elif event.type == "market_price":
            prices = self.market[str(p.get("commodity", "")).lower()]
            bisect.insort(prices, (event.time, _number(p.get("price"))))
            if len(prices) > 2000:
                del prices[0]

    def subject(self, event: MlEvent) -> Subject:
        """The features of a purchase order as of its own event time."""
        p, t = event.payload, event.time
        history = self.deliveries.get((event.tenant, str(p.get("supplier_id"))), [])
        seen = history[max(0, bisect.bisect_right(history, (t, math.inf)) - RECENT_DELIVERIES) :]
        seen = [h for h in seen if h[0] <= t]
        n = len(seen)
        on_time = sum(h[2] for h in seen)
        delivered = sum(h[3] for h in seen)
        rejected = sum(h[4] for h in seen)
        promised = _day(p.get("promised_date"))
        order_day = math.floor(t / DAY) * DAY
        quantity = _number(p.get("quantity"))
        price = _number(p.get("unit_price"))
        product = str(p.get("product_sku", ""))
        market = self.market_price(product, t)
        month = datetime.fromtimestamp(t, UTC).month
        row = np.array(
            [
                float(n),
                (on_time + 1.0) / (n + 2.0),
                sum(h[1] for h in seen) / n if n else 0.0,
                rejected / delivered if delivered > 0 else 0.0,
                (promised - order_day) / DAY if promised is not None else math.nan,
                math.log1p(quantity) if quantity >= 0 else math.nan,
                price / market if market else 1.0,
                1.0 if market else 0.0,
                math.sin(2 * math.pi * month / 12),
                math.cos(2 * math.pi * month / 12),
                math.nan,
            ]
        )
        return Subject(event.tenant, event.event_id, t, str(p.get("po_id")), product, row)

    def market_price(self, product: str, t: float) -> float | None:
        """Mean market price, over the last 30 days up to ``t``, of the commodity the product
        belongs to: the longest commodity name the product code starts with."""
        sku = product.lower()
        names = [c for c in self.market if c and sku.startswith(c)]
        if not names:
            return None
        prices = self.market[max(names, key=len)]
        end = bisect.bisect_right(prices, (t, math.inf))
        start = bisect.bisect_left(prices, (t - MARKET_LOOKBACK_DAYS * DAY, -math.inf))
        window = [v for _, v in prices[start:end] if math.isfinite(v)]
        return sum(window) / len(window) if window else None


# --------------------------------------------------------------------------- demand


@dataclass
class DemandState:
    """Sales quantity per (firm, product) and event-time window; a firm's windows close when
    one of its events falls in a later window (its own clock, no other firm's)."""

    window_seconds: float = DAY
    sums: dict[tuple[str, str], dict[int, float]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(float))
    )
    current: dict[str, int] = field(default_factory=dict)
    """Firm -> its open window (every earlier one is closed)."""

    def observe(self, event: MlEvent) -> list[Subject]:
        """Count a sale; return the subjects (the next window of each of the firm's products)
        when the event opens a new window of its firm."""
        if event.type != "sales_order_line":
            return []
        window = int(event.time // self.window_seconds)
        opened = self.current.get(event.tenant)
        subjects: list[Subject] = []
        if opened is None or window > opened:
            self.current[event.tenant] = window
            if opened is not None:
                subjects = self._subjects(event, window)
        sku = str(event.payload.get("product_sku", ""))
        if window >= self.current[event.tenant]:  # a late sale of a closed window is not counted
            self.sums[(event.tenant, sku)][window] += max(
                0.0, _number(event.payload.get("quantity"))
            )
        return subjects

    def _subjects(self, event: MlEvent, window: int) -> list[Subject]:
        out = []
        weekday = datetime.fromtimestamp(window * self.window_seconds, UTC).weekday()
        for (tenant, sku), windows in self.sums.items():
            if tenant != event.tenant:
                continue
            lags = [windows.get(window - k, 0.0) for k in (1, 2, 3, 4)]
            for old in [w for w in windows if w < window - 8]:
                del windows[old]
            if not any(lags):
                continue
            row = np.array(
                [
                    *lags,
                    sum(lags) / 4,
                    math.sin(2 * math.pi * weekday / 7),
                    math.cos(2 * math.pi * weekday / 7),
                    math.nan,
                ]
            )
            out.append(Subject(tenant, event.event_id, event.time, f"{sku}@{window}", sku, row))
        return out

    def label(self, tenant: str, key: str) -> float | None:
        """The quantity of a subject's window once that window closed, else None."""
        sku, _, raw = key.rpartition("@")
        window = int(raw)
        if self.current.get(tenant, window) <= window:
            return None
        return self.sums.get((tenant, sku), {}).get(window, 0.0)


assert len(SUPPLIER_DELAY.features) == 11 and len(DEMAND.features) == 8


def encode_products(subjects: list[Subject], categories: list[str], position: int) -> np.ndarray:
    """The subjects' rows as one matrix, ``product_code`` filled from the model's categories."""
    if not subjects:
        return np.empty((0, 0))
    matrix = np.vstack([s.row for s in subjects])
    index = {c: i for i, c in enumerate(categories)}
    matrix[:, position] = [index.get(s.product, -1) for s in subjects]
    return matrix
