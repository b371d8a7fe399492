"""Point-in-time features: later events never change a feature already built."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from services.ml.features import DAY, DemandState, MlEvent, SupplyState
from services.ml.specs import DEMAND, SUPPLIER_DELAY
from services.ml.training import build_rows


def po(t: float, **payload: object) -> MlEvent:
    body = {
        "po_id": "PO-1",
        "supplier_id": "S1",
        "product_sku": "copper/grade-1",
        "quantity": 10.0,
        "unit_price": 100.0,
        "promised_date": "2026-03-20",
        **payload,
    }
    return MlEvent("acme", "purchase_order", t, "e-po", 1, body)


def delivery(t: float, po_id: str, late: bool) -> MlEvent:
    body = {
        "po_id": po_id,
        "supplier_id": "S1",
        "product_sku": "copper/grade-1",
        "delivered_quantity": 10.0,
        "rejected_quantity": 1.0,
        "promised_date": "2026-03-01",
        "delivered_date": "2026-03-05" if late else "2026-02-28",
    }
    return MlEvent("acme", "supplier_delivery", t, f"e-{po_id}", 1, body)


def price(t: float, value: float) -> MlEvent:
    return MlEvent("acme", "market_price", t, "e-m", 1, {"commodity": "copper", "price": value})


T = 1_773_000_000.0  # 2026-03-08


def test_features_use_only_events_at_or_before_the_prediction_time() -> None:
    state = SupplyState()
    for i, late in enumerate([True, False, False]):
        state.observe(delivery(T - (10 - i) * DAY, f"PO-{i}", late))
    state.observe(price(T - DAY, 50.0))
    before = state.subject(po(T)).row
    assert before[0] == 3 and math.isclose(before[1], 3 / 5)  # (2 on time + 1) / (3 + 2)
    assert math.isclose(before[6], 2.0) and before[7] == 1.0  # 100 against a market of 50

    # Later events — some of them arriving out of order, before the PO is scored again.
    for i in range(5):
        state.observe(delivery(T + (i + 1) * 3600, f"PO-late-{i}", True))
    state.observe(price(T + 60, 500.0))
    state.observe(price(T + 5 * DAY, 1.0))
    after = state.subject(po(T)).row
    assert np.array_equal(before, after, equal_nan=True)
    # ... while a PO placed after them does see them
    assert state.subject(po(T + 6 * DAY)).row[0] == 8


def test_a_missing_promised_date_leaves_lead_time_undefined() -> None:
    row = SupplyState().subject(po(T, promised_date=None)).row
    assert math.isnan(row[SUPPLIER_DELAY.feature_names.index("lead_time_days")])


def test_demand_lags_come_from_closed_windows_of_the_same_firm() -> None:
    state = DemandState(DAY)

    def sale(day: int, qty: float, tenant: str = "acme") -> MlEvent:
        body = {"product_sku": "P1", "quantity": qty}
        return MlEvent(tenant, "sales_order_line", T + day * DAY, f"s{day}", 1, body)

    for day, qty in [(0, 5), (0, 5), (1, 7), (2, 3)]:
        assert state.observe(sale(day, qty)) == [] or day > 0
    state.observe(sale(9, 1, tenant="rival"))  # another firm's clock closes nothing of acme's
    subjects = state.observe(sale(3, 4))
    assert len(subjects) == 1 and list(subjects[0].row[:4]) == [3, 7, 10, 0]
    assert state.label("acme", subjects[0].key) is None  # its window is still open
    state.observe(sale(4, 1))
    assert state.label("acme", subjects[0].key) == 4


def test_training_rows_do_not_depend_on_the_order_events_arrive_in(supply: list[MlEvent]) -> None:
    rows = build_rows(SUPPLIER_DELAY, supply)
    shuffled = build_rows(SUPPLIER_DELAY, list(reversed(supply)))
    assert len(rows.labels) > 500 and 0.15 < rows.labels.mean() < 0.7
    assert np.array_equal(
        np.vstack([s.row for s in rows.subjects]),
        np.vstack([s.row for s in shuffled.subjects]),
        equal_nan=True,
    )
    # a label is never known before its order
    assert (rows.label_times >= rows.times).all()


def test_demand_rows_have_labels_from_the_next_window(sales: list[MlEvent]) -> None:
    rows = build_rows(DEMAND, sales)
    assert len(rows.labels) > 100
    assert not any(math.isnan(v) for v in rows.labels)
    assert replace(rows.subjects[0]).tenant
