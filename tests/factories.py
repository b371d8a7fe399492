"""Builders of valid test events (plain dicts, as a partner would send them)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any


def sales_event(
    tenant: str = "acme",
    *,
    seq: int = 0,
    quantity: float = 10.0,
    unit_price: float | None = 12.5,
    occurred_at: datetime | None = None,
    **payload: Any,
) -> dict[str, Any]:
    moment = occurred_at or datetime(2026, 11, 1, 8, 0, tzinfo=UTC) + timedelta(minutes=seq)
    body: dict[str, Any] = {
        "order_id": f"SO-{seq:06d}",
        "line_no": 1,
        "customer_id": "C-042",
        "product_sku": "BOLT-M8",
        "quantity": quantity,
        "unit": "pcs",
        "unit_price": unit_price,
        "currency": "CNY",
        **payload,
    }
    return {
        "event_id": str(uuid.uuid4()),
        "tenant": tenant,
        "type": "sales_order_line",
        "schema_version": 1,
        "occurred_at": moment.isoformat(),
        "source": {"system": "test", "record_id": f"SO-{seq:06d}/1"},
        "payload": body,
    }
