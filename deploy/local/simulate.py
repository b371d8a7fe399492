"""Simulated partner firms: realistic operational events for demos, tests and benchmarks.

Each :class:`Firm` has an industry, a region, a size and its own price level, so statistics,
benchmarks and clusters have structure to find. :func:`firm_events` yields one firm's events
in event-time order; a small share can be made deliberately bad (``bad_rate``) so the demo
shows refusals and dead letters. Everything is generated from a seed: nothing is downloaded.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

INDUSTRIES = {
    "fasteners": ("BOLT-M8", "NUT-M8", "WASHER-8"),
    "steel": ("HRC-2MM", "REBAR-12", "WIRE-5"),
    "electronics": ("PCB-4L", "MCU-32", "CAP-10UF"),
}
REGIONS = ("east", "south", "north")
USD_CNY = 7.1  # close to the clean service's default rate, so amounts agree after conversion

FEEDBACK = {
    "en": [
        ("Delivery was fast and the quality is excellent.", "customer_feedback"),
        ("The last shipment arrived late and two boxes were damaged.", "customer_feedback"),
        ("Great service, please call me on {phone} about the next order.", "customer_feedback"),
        ("Poor packaging again, the parts were scratched. Contact {phone}.", "customer_feedback"),
        ("Supplier confirms a price increase of 5% from next month.", "supplier_note"),
        ("Shipment will be two weeks late because of the port closure.", "supplier_note"),
        ("Several units failed inspection, rework needed; call {phone}.", "supplier_note"),
        ("Steel prices rose sharply this week on strong demand.", "news"),
    ],
    "zh": [
        ("交货很快，质量很好。", "customer_feedback"),
        ("上一批货晚到了三天，有两箱损坏。", "customer_feedback"),
        ("质量太差，请联系我，电话{phone}。", "customer_feedback"),
        ("非常满意，订单号 PO20261234567 已收到。", "customer_feedback"),
        ("供应商通知下月起价格上涨百分之五。", "supplier_note"),
        ("集装箱被海关扣留，交货延误，联系人手机{phone}。", "supplier_note"),
        ("这批货的不良率偏高，经办人身份证号{id}。", "supplier_note"),
        ("本周钢材价格因需求旺盛大幅上涨。", "news"),
    ],
}
"""Texts the firms write; ``{phone}`` and ``{id}`` become a mobile number and a resident id
(personal data the nlp service must redact; the order number must stay)."""
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def personal_data(text: str, rng: random.Random) -> str:
    """``text`` with its placeholders filled: a mainland mobile, a valid resident id."""
    if "{phone}" in text:
        digits = "1" + rng.choice("3589") + "".join(rng.choices("0123456789", k=9))
        text = text.replace("{phone}", digits)
    if "{id}" in text:
        born = f"{rng.randint(1960, 2000)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
        body = f"110105{born}{rng.randint(0, 999):03d}"
        check = "10X98765432"[sum(int(c) * w for c, w in zip(body, _ID_WEIGHTS, strict=True)) % 11]
        text = text.replace("{id}", body + check)
    return text


@dataclass(frozen=True)
class Firm:
    tenant: str
    name: str
    industry: str
    region: str
    size: float  # scales volumes: 0.5 small .. 3 large
    price_level: float  # scales prices around the industry's

    @property
    def products(self) -> tuple[str, ...]:
        return INDUSTRIES[self.industry]


def make_firms(count: int = 8, seed: int = 7) -> list[Firm]:
    """``count`` firms spread over industries and regions (deterministic for a seed)."""
    rng = random.Random(seed)
    industries = list(INDUSTRIES)
    firms = []
    for i in range(count):
        industry = industries[i % len(industries)]
        firms.append(
            Firm(
                tenant=f"{industry[:5]}-{i:02d}",
                name=f"{industry.title()} Works {i:02d}",
                industry=industry,
                # Five firms of each industry per region before the next region opens: a
                # benchmark needs at least five firms of one industry and region.
                region=REGIONS[(i // (len(industries) * 5)) % len(REGIONS)],
                size=round(rng.uniform(0.5, 3.0), 2),
                price_level=round(rng.uniform(0.8, 1.25), 3),
            )
        )
    return firms


# --------------------------------------------------------------------------- event time across runs


def load_clock(path: Path) -> dict[str, datetime]:
    """Where each simulated firm's event time stood when the last run stopped (tenant -> time);
    empty when there was no run (or the file is unreadable)."""
    try:
        saved = json.loads(path.read_text())
        return {tenant: datetime.fromisoformat(moment) for tenant, moment in saved.items()}
    except (OSError, ValueError, AttributeError):
        return {}


def save_clock(path: Path, clock: Mapping[str, datetime]) -> None:
    """Keep ``clock`` (tenant -> last event time published), written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({t: m.isoformat() for t, m in sorted(clock.items())}, indent=1))
    partial.replace(path)


def resume_start(clock: Mapping[str, datetime], tenant: str, fresh: datetime) -> datetime:
    """Where a firm's event time starts: where its last run stopped, so no event falls behind
    a window analytics already closed for it — or ``fresh`` if that is later (or it never ran)."""
    last = clock.get(tenant)
    return fresh if last is None else max(last, fresh)


def event_moment(event: Mapping[str, Any]) -> datetime:
    """An event's time, UTC (a spoiled record may have lost its offset, never its UTC value)."""
    moment = datetime.fromisoformat(str(event["occurred_at"]))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def envelope(
    firm: Firm, type_name: str, moment: datetime, payload: dict[str, Any], record_id: str
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "tenant": firm.tenant,
        "type": type_name,
        "schema_version": 1,
        "occurred_at": moment.isoformat(),
        "source": {"system": "simulator", "record_id": record_id},
        "payload": payload,
    }


def firm_events(
    firm: Firm,
    *,
    start: datetime | None = None,
    step: timedelta = timedelta(minutes=5),
    seed: int = 1,
    bad_rate: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """An endless, event-time ordered stream of one firm's events."""
    rng = random.Random(f"{firm.tenant}-{seed}")
    moment = start or datetime.now(UTC).replace(microsecond=0)
    base_price = {"fasteners": 0.8, "steel": 4200.0, "electronics": 35.0}[firm.industry]
    on_hand = {sku: 5000 * firm.size for sku in firm.products}
    seq = 0
    while True:
        seq += 1
        moment += step * rng.uniform(0.5, 1.5)
        sku = rng.choice(firm.products)
        hour_factor = 1.3 if 8 <= moment.hour < 18 else 0.6
        roll = rng.random()
        if roll < 0.55:
            quantity = max(1.0, round(rng.lognormvariate(3, 0.6) * firm.size * hour_factor))
            price_cny = base_price * firm.price_level * rng.uniform(0.9, 1.1)
            in_usd = rng.random() < 0.2  # some customers are invoiced in dollars
            on_hand[sku] = max(0.0, on_hand[sku] - quantity)
            event = envelope(
                firm,
                "sales_order_line",
                moment,
                {
                    "order_id": f"SO-{seq:07d}",
                    "customer_id": f"C-{rng.randint(1, 40):03d}",
                    "product_sku": sku,
                    "quantity": quantity,
                    "unit": "pcs" if firm.industry != "steel" else "t",
                    "unit_price": round(price_cny / USD_CNY if in_usd else price_cny, 2),
                    "currency": "USD" if in_usd else "CNY",
                    "region": firm.region,
                },
                f"SO-{seq:07d}/1",
            )
        elif roll < 0.7:
            on_hand[sku] += round(rng.uniform(200, 800) * firm.size)
            event = envelope(
                firm,
                "inventory_level",
                moment,
                {
                    "site_id": f"WH-{firm.region}",
                    "product_sku": sku,
                    "on_hand": round(on_hand[sku], 1),
                    "unit": "pcs" if firm.industry != "steel" else "t",
                    "unit_cost": round(base_price * 0.7, 2),
                    "currency": "CNY",
                },
                f"INV-{seq}",
            )
        elif roll < 0.82:
            produced = round(rng.uniform(300, 900) * firm.size)
            event = envelope(
                firm,
                "production_output",
                moment,
                {
                    "line_id": f"L{rng.randint(1, 3)}",
                    "product_sku": sku,
                    "quantity": produced,
                    "scrap_quantity": round(produced * rng.uniform(0.005, 0.04 / firm.price_level)),
                    "machine_hours": round(rng.uniform(6, 8), 1),
                },
                f"PRD-{seq}",
            )
        elif roll < 0.9:
            headcount = int(40 * firm.size + rng.randint(-3, 3))
            event = envelope(
                firm,
                "workforce",
                moment,
                {
                    "site_id": f"PLANT-{firm.region}",
                    "headcount": headcount,
                    "hours_worked": round(headcount * 8 * rng.uniform(0.9, 1.0), 1),
                    "absence_hours": round(headcount * 8 * rng.uniform(0.01, 0.08), 1),
                },
                f"WF-{seq}",
            )
        elif roll < 0.96:
            event = envelope(
                firm,
                "market_price",
                moment,
                {
                    "commodity": {
                        "fasteners": "steel-wire",
                        "steel": "steel-hrc",
                        "electronics": "copper",
                    }[firm.industry],
                    "market": "SHFE",
                    "price": round(base_price * 1000 * rng.uniform(0.95, 1.05), 2)
                    if firm.industry != "steel"
                    else round(base_price * rng.uniform(0.95, 1.05), 2),
                    "currency": "CNY",
                    "unit": "t",
                },
                f"MKT-{seq}",
            )
        else:
            language = "zh" if rng.random() < 0.5 else "en"
            text, kind = rng.choice(FEEDBACK[language])
            event = envelope(
                firm,
                "text_document",
                moment,
                {
                    "kind": kind,
                    "language": language,
                    "text": personal_data(text, rng),
                },
                f"TXT-{seq}",
            )
        if bad_rate and rng.random() < bad_rate:
            event = spoil(event, rng)
        yield event


def spoil(event: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Make a record invalid the way real exports go wrong."""
    spoiled = {**event, "payload": dict(event["payload"])}
    how = rng.randrange(3)
    if how == 0:
        spoiled["occurred_at"] = spoiled["occurred_at"][:19]  # lost its UTC offset
    elif how == 1:
        first = next(iter(spoiled["payload"]))
        spoiled["payload"][first + "_x"] = spoiled["payload"].pop(first)  # misspelled column
    else:
        spoiled["payload"]["quantity"] = "twelve"
    return spoiled


COMMODITY = {"fasteners": "steel-wire", "steel": "steel-hrc", "electronics": "copper"}
COMMODITY_PRICE = {"steel-wire": 4800.0, "steel-hrc": 4200.0, "copper": 70000.0}


def supply_events(
    firm: Firm,
    *,
    start: datetime | None = None,
    step: timedelta = timedelta(hours=6),
    seed: int = 1,
    suppliers: int = 4,
) -> Iterator[dict[str, Any]]:
    """An endless, event-time ordered stream of one firm's purchase orders, the deliveries
    against them (days later) and market prices of what it buys, with a learnable lateness
    pattern: unreliable suppliers, short lead times, large orders and prices squeezed below
    the market make a delivery late more often (what the ml service's supplier-delay model
    learns)."""
    rng = random.Random(f"{firm.tenant}-supply-{seed}")
    moment = start or datetime.now(UTC).replace(microsecond=0)
    commodity = COMMODITY[firm.industry]
    reliability = {f"SUP-{i:02d}": rng.uniform(0.25, 0.95) for i in range(suppliers)}
    pending: list[tuple[datetime, int, dict[str, Any]]] = []
    market = COMMODITY_PRICE[commodity]
    seq = 0
    while True:
        seq += 1
        moment += step * rng.uniform(0.5, 1.5)
        while pending and pending[0][0] <= moment:
            yield heapq.heappop(pending)[2]
        if rng.random() < 0.2:
            market *= rng.uniform(0.97, 1.03)
            yield envelope(
                firm,
                "market_price",
                moment,
                {
                    "commodity": commodity,
                    "market": "SHFE",
                    "price": round(market, 2),
                    "currency": "CNY",
                    "unit": "t",
                },
                f"MKT-S{seq}",
            )
            continue
        supplier = rng.choice(sorted(reliability))
        lead = rng.randint(3, 30)
        quantity = max(1.0, round(rng.lognormvariate(3, 0.8) * firm.size))
        squeeze = rng.uniform(0.85, 1.15)
        logit = (
            -0.8
            + 5.0 * (0.6 - reliability[supplier])
            + (1.5 if lead < 8 else 0.0)
            + 0.6 * (math.log1p(quantity) - 3.5)
            + 8.0 * (0.97 - squeeze)
        )
        late = rng.random() < 1 / (1 + math.exp(-logit))
        promised = (moment + timedelta(days=lead)).date()
        delivered = promised + timedelta(days=rng.randint(1, 7) if late else -rng.randint(0, 2))
        po_id = f"PO-{seq:07d}"
        sku = f"{commodity}/grade-{rng.randint(1, 3)}"
        yield envelope(
            firm,
            "purchase_order",
            moment,
            {
                "po_id": po_id,
                "supplier_id": supplier,
                "product_sku": sku,
                "quantity": quantity,
                "unit": "t",
                "unit_price": round(market * squeeze, 2),
                "currency": "CNY",
                "promised_date": promised.isoformat(),
            },
            po_id,
        )
        arrival = datetime.combine(delivered, moment.timetz()) + timedelta(hours=rng.uniform(1, 8))
        arrival = max(arrival, moment + timedelta(minutes=1))
        rejected = (
            round(quantity * rng.uniform(0.02, 0.15))
            if rng.random() > reliability[supplier]
            else 0.0
        )
        heapq.heappush(
            pending,
            (
                arrival,
                seq,
                envelope(
                    firm,
                    "supplier_delivery",
                    arrival,
                    {
                        "po_id": po_id,
                        "supplier_id": supplier,
                        "product_sku": sku,
                        "delivered_quantity": quantity,
                        "unit": "t",
                        "rejected_quantity": float(rejected),
                        "promised_date": promised.isoformat(),
                        "delivered_date": delivered.isoformat(),
                    },
                    f"DLV-{po_id}",
                ),
            ),
        )


def with_supply(
    events: Iterator[dict[str, Any]],
    firm: Firm,
    *,
    start: datetime,
    step: timedelta = timedelta(minutes=30),
    seed: int = 1,
) -> Iterator[dict[str, Any]]:
    """``events`` (a firm's stream) merged in event-time order with its purchase orders,
    deliveries and market prices (:func:`supply_events`)."""
    supply = supply_events(firm, start=start, step=step, seed=seed)
    return heapq.merge(events, supply, key=_occurred)


def _occurred(event: dict[str, Any]) -> datetime:
    moment = datetime.fromisoformat(str(event["occurred_at"]))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def supply_history(
    firm: Firm, *, end: datetime, days: float = 120.0, step: timedelta = timedelta(hours=8)
) -> list[dict[str, Any]]:
    """The firm's supply events of the ``days`` before ``end`` (the same suppliers as the live
    stream's: same seed), to back-fill a demo so the ml service has labelled orders to learn."""
    out: list[dict[str, Any]] = []
    for event in supply_events(firm, start=end - timedelta(days=days), step=step):
        if _occurred(event) >= end:
            break
        out.append(event)
    return out
