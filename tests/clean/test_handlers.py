"""The cleaning rules, without a broker: fills, conversions, dedupe, metrics, outliers, refusals."""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from schemas.events import CleanEvent
from schemas.insights import DeadLetter
from schemas.reference import FxRate
from services.clean.handlers import (
    REROUTED_HEADER,
    CleanedBatch,
    CleanRules,
    CleanState,
    RollingWindow,
    canonical_unit,
    clean_batch,
    fill_rules,
    robust_z,
)
from shared.codec import decode, encode
from shared.kafka import partition_of
from shared.rates import FxRates, demo_rates
from tests.factories import sales_event

RULES = CleanRules()


def rates_table(rates: dict[str, str] | None = None, day: str = "2000-01-01") -> FxRates:
    """A rates table holding ``rates`` (default: the demo's) for ``day``, all read."""
    table = FxRates()
    chosen = (
        demo_rates()
        if rates is None
        else [
            FxRate(currency=c, date=day, cny_per_unit=r, source="test")  # type: ignore[arg-type]
            for c, r in rates.items()
        ]
    )
    for rate in chosen:
        table.add(rate, 0)
    table.synced_ms = 2**62
    return table


NOW = 1_793_613_600_000  # 2026-11-02T10:00Z in ms: when a test's batches are cleaned


@pytest.fixture
def new_state(tmp_path: Path) -> Iterator[Callable[..., CleanState]]:
    """``new_state(rules, partitions=1)``: a clean state with its stores in a fresh folder."""
    made: list[CleanState] = []

    def make(
        rules: CleanRules = RULES, partitions: int = 1, rates: FxRates | None = None
    ) -> CleanState:
        made.append(
            CleanState(
                rules,
                tmp_path / f"state-{len(made)}",
                partitions=partitions,
                rates=rates if rates is not None else rates_table(),
            )
        )
        return made[-1]

    yield make
    for state in made:
        state.close()


def records(*events: Any, partition: int = 0, start: int = 0) -> list[ConsumerRecord[bytes, bytes]]:
    """Consumed records of raw-topic events (dicts are encoded, bytes kept as they are)."""
    out = []
    for offset, event in enumerate(events, start):
        value = event if isinstance(event, bytes) or event is None else encode(event)
        key = event["tenant"].encode() if isinstance(event, dict) else b"acme"
        out.append(
            ConsumerRecord("events.raw.v1", partition, offset, 0, 0, key, value, None, 0, 0, [])
        )
    return out


def cleaned(result: CleanedBatch) -> list[CleanEvent]:
    return [
        CleanEvent.model_validate_json(record.value)
        for partition in sorted(result.clean)
        for record in result.clean[partition]
    ]


def letters(result: CleanedBatch) -> list[DeadLetter]:
    return [DeadLetter.model_validate_json(record.value) for record in result.dead]


def event(
    type_name: str, payload: dict[str, Any], tenant: str = "acme", **envelope: Any
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "tenant": tenant,
        "type": type_name,
        "schema_version": 1,
        "occurred_at": "2026-11-02T10:00:00+00:00",
        "source": {"system": "test"},
        "payload": payload,
        **envelope,
    }


# --------------------------------------------------------------------------- fill policies


def test_fill_rules_are_read_from_the_contract() -> None:
    rules = {rule.field: (rule.policy, rule.value) for rule in fill_rules("sales_order_line", 1)}
    assert rules == {
        "unit": ("default", "pcs"),
        "unit_price": ("carry_forward", None),
        "currency": ("default", "CNY"),
        "region": ("default", "unknown"),
    }


def test_defaults_fill_missing_fields_and_are_recorded(
    new_state: Callable[..., CleanState],
) -> None:
    bare = sales_event(seq=1)
    for name in ("unit", "currency"):
        del bare["payload"][name]
    (out,) = cleaned(clean_batch(records(bare), new_state(RULES)))
    assert out.payload["unit"] == "pcs" and out.payload["currency"] == "CNY"
    assert out.payload["region"] == "unknown"
    assert sorted(out.quality.filled) == ["currency", "region", "unit"]


def test_carry_forward_takes_the_last_value_of_the_same_tenant_entity_and_unit(
    new_state: Callable[..., CleanState],
) -> None:
    state = new_state(RULES)
    priced = sales_event("acme", seq=1, unit_price=4.0)
    other_sku = sales_event("acme", seq=2, unit_price=9.0, product_sku="NUT-M8")
    other_unit = sales_event("acme", seq=3, unit_price=30.0, unit="kg")
    other_tenant = sales_event("bolt", seq=4, unit_price=None)
    carried = sales_event("acme", seq=5, unit_price=None, quantity=3)
    out = cleaned(clean_batch(records(priced, other_sku, other_unit, other_tenant, carried), state))
    by_id = {str(e.event_id): e for e in out}

    assert by_id[other_tenant["event_id"]].payload["unit_price"] is None  # nothing to carry
    assert "sales.amount_cny" not in by_id[other_tenant["event_id"]].metrics
    assert by_id[carried["event_id"]].payload["unit_price"] == "4"
    assert by_id[carried["event_id"]].quality.filled == ["region", "unit_price"]
    assert by_id[carried["event_id"]].metrics["sales.amount_cny"] == 12.0

    # the state survives the batch: the next batch carries the same value
    later = sales_event("acme", seq=6, unit_price=None, quantity=2)
    (again,) = cleaned(clean_batch(records(later, start=5), state))
    assert again.payload["unit_price"] == "4"


def test_a_value_older_than_the_horizon_is_not_carried_forward(
    new_state: Callable[..., CleanState],
) -> None:
    state = new_state(CleanRules(horizon_seconds=86400))
    start = datetime(2026, 11, 1, tzinfo=UTC)
    priced = sales_event(seq=1, unit_price=4.0, occurred_at=start)
    next_day = sales_event(seq=2, unit_price=None, occurred_at=start + timedelta(hours=20))
    a_week_later = sales_event(seq=3, unit_price=None, occurred_at=start + timedelta(days=7))
    _, fresh, stale = cleaned(clean_batch(records(priced, next_day, a_week_later), state))
    assert fresh.payload["unit_price"] == "4"
    assert stale.payload["unit_price"] is None and "unit_price" not in stale.quality.filled


def test_carried_values_are_canonical_whatever_the_currency_of_the_record(
    new_state: Callable[..., CleanState],
) -> None:
    state = new_state(RULES)
    in_dollars = sales_event(seq=1, unit_price=2.0, currency="USD")
    missing_in_euros = sales_event(seq=2, unit_price=None, currency="EUR")
    _, out = cleaned(clean_batch(records(in_dollars, missing_in_euros), state))
    assert out.payload["unit_price"] == "14.2"
    assert out.payload["currency"] == "CNY"


def test_a_missing_field_with_policy_refuse_sends_the_record_to_the_dead_letters(
    new_state: Callable[..., CleanState],
) -> None:
    purchase = event(
        "purchase_order",
        {"po_id": "PO-1", "supplier_id": "S-1", "product_sku": "BOLT-M8", "quantity": 5},
    )
    workforce = event("workforce", {"site_id": "plant-1", "headcount": 40})
    result = clean_batch(records(purchase, workforce), new_state(RULES))
    assert result.clean == {}
    assert result.dead_reasons == {"refused_missing": 2}
    first, second = letters(result)
    assert [error.field for error in first.errors] == ["payload.unit_price"]
    assert [error.field for error in second.errors] == ["payload.hours_worked"]
    assert first.source_offset == 0 and second.source_offset == 1
    assert decode(first.original)["event_id"] == purchase["event_id"]


# --------------------------------------------------------------------------- conversions


@pytest.mark.parametrize(
    ("written", "canonical", "factor"),
    [
        ("kg", "kg", 1),
        ("t", "kg", 1000),
        ("g", "kg", 0.001),
        ("l", "l", 1),
        ("ml", "l", 0.001),
        ("m", "m", 1),
        ("cm", "m", 0.01),
        ("mm", "m", 0.001),
        ("pcs", "pcs", 1),
        ("pc", "pcs", 1),
        ("Piece", "pcs", 1),
        ("T", "kg", 1000),
    ],
)
def test_units_have_a_canonical_form(written: str, canonical: str, factor: float) -> None:
    assert canonical_unit(written) == (canonical, factor)


def test_quantities_and_per_unit_prices_follow_the_unit_and_prices_become_yuan(
    new_state: Callable[..., CleanState],
) -> None:
    sale = sales_event(seq=1, quantity=250, unit="g", unit_price=0.02, currency="EUR")
    state = new_state(rates=rates_table({"EUR": "8.0"}))
    (out,) = cleaned(clean_batch(records(sale), state))
    assert out.payload["quantity"] == 0.25
    assert out.payload["unit"] == "kg"
    assert out.payload["unit_price"] == "160"  # 0.02 EUR/g x 8 x 1000: exact
    assert out.payload["currency"] == "CNY"
    assert out.amounts["sales.amount_cny"] == "40"
    assert out.metrics["sales.amount_cny"] == 40.0
    assert sorted(out.quality.converted) == ["currency", "quantity", "unit", "unit_price"]


def test_a_default_is_already_canonical_and_is_not_converted(
    new_state: Callable[..., CleanState],
) -> None:
    stock = event(
        "inventory_level", {"site_id": "w1", "product_sku": "A", "on_hand": 2, "unit": "t"}
    )
    (out,) = cleaned(clean_batch(records(stock), new_state(RULES)))
    assert out.payload["on_hand"] == 2000 and out.payload["reserved"] == 0
    assert "reserved" in out.quality.filled and "reserved" not in out.quality.converted


def test_an_unknown_unit_is_kept_and_nothing_is_converted(
    new_state: Callable[..., CleanState],
) -> None:
    sale = sales_event(seq=1, quantity=3, unit="box")
    (out,) = cleaned(clean_batch(records(sale), new_state(RULES)))
    assert out.payload["unit"] == "box" and out.payload["quantity"] == 3
    assert out.quality.converted == []


def test_an_unknown_currency_is_a_dead_letter(new_state: Callable[..., CleanState]) -> None:
    result = clean_batch(records(sales_event(seq=1, currency="XAU")), new_state(RULES))
    (letter,) = letters(result)
    assert letter.reason == "no XAU rate on or before 2026-11-01"
    assert [error.field for error in letter.errors] == ["payload.currency"]


def test_event_time_is_converted_to_utc(new_state: Callable[..., CleanState]) -> None:
    local = sales_event(seq=1)
    local["occurred_at"] = "2026-11-02T09:30:00-05:00"
    utc = sales_event(seq=2)
    first, second = cleaned(clean_batch(records(local, utc), new_state(RULES)))
    assert first.occurred_at == datetime(2026, 11, 2, 14, 30, tzinfo=UTC)
    assert first.occurred_at.utcoffset() == timedelta(0)
    assert "occurred_at" in first.quality.converted
    assert "occurred_at" not in second.quality.converted


def test_event_times_out_of_bounds_written_straight_to_the_raw_topic_are_dead_letters(
    new_state: Callable[..., CleanState],
) -> None:
    """The bound ingest applies holds for partners who write to events.raw.v1 themselves; it is
    relative to the record's Kafka timestamp, so replaying old records later refuses nothing."""
    sent = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)
    cases = {
        "2026-11-02T12:00:00+00:00": False,  # two hours ahead of its Kafka timestamp
        "9999-12-31T23:59:59-05:00": False,  # has no UTC datetime: converting it would raise
        "1999-12-31T23:59:59+00:00": False,
        "2026-11-02T10:30:00+00:00": True,  # ahead of its timestamp, but within the hour
        "2004-03-01T00:00:00+08:00": True,  # history
    }
    raw = records(*(sales_event(seq=i) | {"occurred_at": t} for i, t in enumerate(cases)))
    stamped = [dataclasses.replace(r, timestamp=int(sent.timestamp() * 1000)) for r in raw]
    result = clean_batch(stamped, new_state(RULES))
    kept = sorted(e.occurred_at for e in cleaned(result))
    assert kept == sorted(
        datetime.fromisoformat(t).astimezone(UTC) for t, ok in cases.items() if ok
    )
    assert len(letters(result)) == 3
    for letter in letters(result):
        assert letter.reason == "event time out of bounds"
        assert [error.field for error in letter.errors] == ["occurred_at"]


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("type_name", "payload", "metrics"),
    [
        (
            "inventory_level",
            {
                "site_id": "w1",
                "product_sku": "A",
                "on_hand": 2,
                "unit": "t",
                "unit_cost": 3000,
                "currency": "USD",
            },
            {"inventory.on_hand": 2000, "inventory.value_cny": 2 * 3000 * 7.10},
        ),
        (
            "inventory_level",
            {"site_id": "w1", "product_sku": "A", "on_hand": 7},
            {"inventory.on_hand": 7},
        ),
        (
            "purchase_order",
            {
                "po_id": "P",
                "supplier_id": "S",
                "product_sku": "A",
                "quantity": 4,
                "unit_price": 2.5,
            },
            {"purchasing.quantity": 4, "purchasing.amount_cny": 10},
        ),
        (
            "supplier_delivery",
            {
                "po_id": "P",
                "supplier_id": "S",
                "product_sku": "A",
                "delivered_quantity": 50,
                "rejected_quantity": 5,
                "promised_date": "2026-11-01",
                "delivered_date": "2026-11-04",
            },
            {"delivery.quantity": 50, "delivery.reject_rate": 0.1, "delivery.delay_days": 3},
        ),
        (
            "supplier_delivery",
            {
                "po_id": "P",
                "supplier_id": "S",
                "product_sku": "A",
                "delivered_quantity": 0,
                "delivered_date": "2026-11-04",
            },
            {"delivery.quantity": 0},
        ),
        (
            "production_output",
            {"line_id": "L1", "product_sku": "A", "quantity": 90, "scrap_quantity": 10},
            {"production.quantity": 90, "production.scrap_rate": 0.1},
        ),
        (
            "workforce",
            {"site_id": "plant", "headcount": 12, "hours_worked": 90, "absence_hours": 10},
            {
                "workforce.headcount": 12,
                "workforce.hours_worked": 90,
                "workforce.absence_rate": 0.1,
            },
        ),
        (
            "market_price",
            {
                "commodity": "steel-hrc",
                "market": "SHFE",
                "price": 500,
                "currency": "USD",
                "unit": "t",
            },
            {"market.price_cny": 500 * 7.10 / 1000},
        ),
        (
            "text_document",
            {"kind": "news", "language": "en", "text": "Steel prices rose."},
            {},
        ),
    ],
)
def test_metrics_of_each_event_type(
    type_name: str,
    payload: dict[str, Any],
    metrics: dict[str, float],
    new_state: Callable[..., CleanState],
) -> None:
    (out,) = cleaned(clean_batch(records(event(type_name, payload)), new_state(RULES)))
    assert out.metrics == pytest.approx(metrics)


# --------------------------------------------------------------------------- dedupe


def test_an_event_id_is_cleaned_once_within_and_across_batches(
    new_state: Callable[..., CleanState],
) -> None:
    state = new_state(RULES)
    a, b = sales_event(seq=1), sales_event(seq=2)
    first = clean_batch(records(a, b, a), state)
    assert first.clean_count == 2 and first.duplicates == 1
    second = clean_batch(records(b, sales_event(seq=3), start=3), state)
    assert second.clean_count == 1 and second.duplicates == 1


def test_a_refused_record_sent_again_fixed_is_not_a_duplicate(
    new_state: Callable[..., CleanState],
) -> None:
    state = new_state(RULES)
    bad = sales_event(seq=1, currency="XAU")
    assert clean_batch(records(bad), state).dead_reasons == {"no_rate": 1}
    fixed = {**bad, "payload": {**bad["payload"], "currency": "USD"}}
    assert clean_batch(records(fixed, start=1), state).clean_count == 1


DAY_MS = 86_400_000


def test_an_id_is_remembered_for_the_horizon_after_it_was_cleaned_whatever_its_event_time(
    new_state: Callable[..., CleanState],
) -> None:
    state = new_state(CleanRules(horizon_seconds=7 * 86400))
    long_ago = sales_event(seq=1, occurred_at=datetime(2021, 3, 1, tzinfo=UTC))
    assert clean_batch(records(long_ago), state, NOW).clean_count == 1
    assert clean_batch(records(long_ago, start=1), state, NOW + 6 * DAY_MS).duplicates == 1
    assert clean_batch(records(long_ago, start=2), state, NOW + 8 * DAY_MS).clean_count == 1


def test_one_tenants_event_dated_years_ahead_forgets_no_ids_of_another(
    new_state: Callable[..., CleanState],
) -> None:
    """Partners writing to the raw topic themselves set occurred_at as they like: a 2036 date
    used to move the partition's watermark and forget every tenant's ids at once."""
    state = new_state(CleanRules(horizon_seconds=3600))
    acme = sales_event("acme", seq=1)
    clean_batch(records(acme), state, NOW)
    from_the_future = sales_event("bolt", seq=2, occurred_at=datetime(2036, 1, 1, tzinfo=UTC))
    clean_batch(records(from_the_future, start=1), state, NOW + 1000)
    again = clean_batch(records(acme, start=2), state, NOW + 2000)
    assert again.duplicates == 1 and again.clean_count == 0


def test_an_id_cleaned_a_day_ago_is_a_duplicate_after_many_later_ids_in_bounded_memory(
    new_state: Callable[..., CleanState],
) -> None:
    """40 000 ids (about 2 MB on disk) through a store given 1 MB: each batch's ids go to disk
    when it is flushed, and the store's write buffers and cache stay near that budget (RocksDB's
    cache may overshoot it a little) however many ids there are."""
    rules = CleanRules(memory_mb=1)
    state = new_state(rules)
    first = sales_event(seq=0)
    clean_batch(records(first), state, NOW)
    state.flush(0, None, NOW)
    later = NOW + DAY_MS
    offset = 1
    for _ in range(40):
        batch = [sales_event(seq=offset + i) for i in range(1000)]
        assert clean_batch(records(*batch, start=offset), state, later).clean_count == 1000
        state.flush(0, None, later)
        offset += 1000
        assert state.partition(0).pending == {}
        assert state.partition(0).store.memory_in_use() <= 1.25 * (1 << 20)
    again = clean_batch(records(first, start=offset), state, later)
    assert again.duplicates == 1 and again.clean_count == 0


def test_ids_written_to_disk_outlive_the_state_that_wrote_them(tmp_path: Path) -> None:
    state = CleanState(RULES, tmp_path / "clean", partitions=1)
    a = sales_event(seq=1)
    clean_batch(records(a), state, NOW)
    state.flush(0, None, NOW)
    state.close()
    reopened = CleanState(RULES, tmp_path / "clean", partitions=1)
    try:
        assert clean_batch(records(a, start=1), reopened, NOW + 1000).duplicates == 1
    finally:
        reopened.close()


def test_the_checkpoint_moves_only_while_every_record_since_it_is_ours(
    new_state: Callable[..., CleanState],
) -> None:
    """A worker that lost its partition unnoticed may still write to the clean partition: the
    windows and carry values on disk must then wait for a restore that reads its records."""
    partition = new_state(RULES).partition(0)
    partition.next_offset = 10
    assert partition.advance([(10, 5), (15, 3)]) == 18
    assert partition.advance([]) is None and partition.next_offset == 18
    assert partition.advance([(20, 2)]) is None  # 18 and 19 are someone else's
    assert partition.advance([(22, 1)]) is None and partition.next_offset is None


def test_partitions_have_their_own_state(new_state: Callable[..., CleanState]) -> None:
    state = new_state(RULES, partitions=2)
    a = sales_event("bolt", seq=1)  # bolt's partition of two is 1
    clean_batch(records(a, partition=1), state, NOW)
    assert clean_batch(records(a, partition=1, start=1), state, NOW).duplicates == 1
    assert state.partition(0).pending == {}
    state.wipe(1)
    assert clean_batch(records(a, partition=1, start=2), state, NOW).clean_count == 1


# --------------------------------------------------------------------------- re-routing


def test_a_record_off_its_tenants_partition_is_rerouted_there_not_cleaned(
    new_state: Callable[..., CleanState],
) -> None:
    """Partners writing to the raw topic themselves may use librdkafka's crc32 partitioner or
    another key: each tenant's records are cleaned on the partition murmur2 of its id picks."""
    state = new_state(RULES, partitions=3)
    home = partition_of(b"acme", 3)
    elsewhere = (home + 1) % 3
    event = sales_event("acme", seq=1)
    raw = records(event, partition=elsewhere, start=7)[0]
    raw = dataclasses.replace(raw, headers=[("trace", b"t-1")])
    misplaced = clean_batch([raw], state, NOW)
    assert misplaced.clean_count == 0 and misplaced.duplicates == 0
    (moved,) = misplaced.rerouted[home]
    assert moved.key == b"acme" and moved.value == raw.value
    assert list(moved.headers) == [
        ("trace", b"t-1"),
        (REROUTED_HEADER, f"events.raw.v1/{elsewhere}/7".encode()),
    ]

    wrong_key = dataclasses.replace(records(event, partition=home)[0], key=b"ACME")
    assert [r.key for r in clean_batch([wrong_key], state, NOW).rerouted[home]] == [b"acme"]

    arrived = clean_batch(records(event, partition=home, start=8), state, NOW)
    assert arrived.clean_count == 1 and not arrived.rerouted
    assert clean_batch(records(event, partition=home, start=9), state, NOW).duplicates == 1


def test_records_that_cannot_be_routed_are_dead_letters_where_they_arrived(
    new_state: Callable[..., CleanState],
) -> None:
    state = new_state(RULES, partitions=3)
    result = clean_batch(records(b"{not json", None, partition=2), state, NOW)
    assert not result.rerouted and len(result.dead) == 2


# --------------------------------------------------------------------------- outliers


def test_the_rolling_window_agrees_with_the_modified_z_score_formula() -> None:
    rng = random.Random(7)
    for case in range(300):
        size = rng.randint(20, 60)
        style = case % 3
        if style == 0:
            history = [rng.gauss(100, 15) for _ in range(size)]
        elif style == 1:  # many ties: MAD often 0
            history = [float(rng.choice([0, 0, 0, 1, 2])) for _ in range(size)]
        else:  # integers: ties and even-sized windows straddling the bound
            history = [float(rng.randint(0, 10)) for _ in range(size)]
        window = RollingWindow()
        for value in history:
            window.push(value, 1000)
        for probe in [rng.uniform(-50, 250) for _ in range(10)] + [
            rng.randint(0, 12) for _ in range(5)
        ]:
            expected = abs(robust_z(probe, history)) > 3.5
            assert window.is_outlier(probe, 20, 3.5) == expected, (history, probe)


def test_the_window_keeps_only_the_most_recent_values() -> None:
    window = RollingWindow()
    for value in range(10):
        window.push(float(value), 4)
    assert list(window.arrival) == [6.0, 7.0, 8.0, 9.0]
    assert window.ordered == [6.0, 7.0, 8.0, 9.0]


def test_outliers_are_flagged_per_tenant_and_metric_only_after_enough_history(
    new_state: Callable[..., CleanState],
) -> None:
    rng = random.Random(3)
    state = new_state(RULES)
    early_spike = sales_event("acme", seq=0, quantity=10_000)
    normal = [sales_event("acme", seq=i, quantity=rng.uniform(9, 11)) for i in range(1, 40)]
    spike = sales_event("acme", seq=40, quantity=1_000)
    other_tenant = [sales_event("bolt", seq=i, quantity=1_000) for i in range(41, 45)]
    out = {
        str(e.event_id): e
        for e in cleaned(clean_batch(records(early_spike, *normal, spike, *other_tenant), state))
    }
    assert out[early_spike["event_id"]].quality.outliers == []  # no history yet
    assert out[spike["event_id"]].quality.outliers == ["sales.quantity", "sales.amount_cny"]
    assert all(not out[e["event_id"]].quality.outliers for e in other_tenant)
    flagged = sum(bool(out[e["event_id"]].quality.outliers) for e in normal)
    assert flagged == 0  # uniform values stay within the bound
    assert len(out) == 45


# --------------------------------------------------------------------------- corrections


def test_corrections_pass_through_but_feed_no_rolling_state(
    new_state: Callable[..., CleanState],
) -> None:
    state = new_state(RULES)
    original = sales_event(seq=1, unit_price=5.0)
    correction = sales_event(seq=1, unit_price=50.0, quantity=1_000_000)
    correction["source"]["operation"] = "update"
    correction["corrects"] = original["event_id"]
    clean_batch(records(original), state)
    (out,) = cleaned(clean_batch(records(correction, start=1), state))
    assert str(out.corrects) == original["event_id"] and out.source.operation == "update"
    assert out.metrics["sales.quantity"] == 1_000_000 and out.quality.outliers == []
    windows = state.partition(0).windows
    assert list(windows[("acme", "sales.quantity")].arrival) == [10.0]
    later = sales_event(seq=2, unit_price=None)
    (carried,) = cleaned(clean_batch(records(later, start=2), state))
    assert carried.payload["unit_price"] == "5"  # the correction's price did not become the last


# --------------------------------------------------------------------------- dead letters


def test_undecodable_and_invalid_records_become_dead_letters_with_their_reason(
    new_state: Callable[..., CleanState],
) -> None:
    bad_payload = sales_event(seq=1, quantity=-3)
    unknown = {**sales_event(seq=2), "type": "telepathy"}
    result = clean_batch(
        records(b"\xff\xfe", b"[1, 2]", None, bad_payload, unknown, sales_event(seq=3)),
        new_state(RULES),
    )
    assert result.clean_count == 1
    assert result.dead_reasons == {"undecodable": 3, "invalid": 2}
    found = letters(result)
    assert [letter.source_offset for letter in found] == [0, 1, 2, 3, 4]
    assert found[0].original_encoding == "base64"
    assert found[1].reason == "an event must be a JSON object"
    assert found[3].reason == "invalid event"
    assert [error.field for error in found[3].errors] == ["payload.quantity"]
    assert "telepathy" in found[4].reason


# --------------------------------------------------------------------------- restore


def test_state_rebuilt_from_the_clean_output_cleans_the_next_batch_identically(
    new_state: Callable[..., CleanState],
) -> None:
    rng = random.Random(11)
    tenants = ["acme", "bolt", "delta"]
    history = [
        sales_event(
            rng.choice(tenants),
            seq=i,
            quantity=rng.lognormvariate(3, 0.4),
            unit_price=None if i % 5 == 0 else rng.uniform(1, 3),
            product_sku=rng.choice(["A", "B"]),
        )
        for i in range(400)
    ]
    live = new_state(RULES)
    first = clean_batch(records(*history), live, NOW)

    rebuilt = new_state(RULES)
    for record in first.clean[0]:
        rebuilt.remember(0, decode(record.value), NOW)

    follow_up = [
        sales_event(
            rng.choice(tenants),
            seq=500 + i,
            quantity=rng.lognormvariate(3, 1.2),
            unit_price=None,
            product_sku=rng.choice(["A", "B"]),
        )
        for i in range(100)
    ] + history[:20]
    from_live = clean_batch(records(*follow_up, start=400), live, NOW)
    from_rebuilt = clean_batch(records(*follow_up, start=400), rebuilt, NOW)
    assert from_live.duplicates == from_rebuilt.duplicates == 20
    assert [r.value for r in from_live.clean[0]] == [r.value for r in from_rebuilt.clean[0]]
    assert any(e.quality.outliers for e in cleaned(from_live))  # the comparison covers flags too
    assert any("unit_price" in e.quality.filled for e in cleaned(from_live))


def test_a_rebuilt_state_ages_carried_values_as_the_live_one_does(
    new_state: Callable[..., CleanState],
) -> None:
    rules = CleanRules(horizon_seconds=86400)
    start = datetime(2026, 11, 1, tzinfo=UTC)
    priced = sales_event(seq=1, unit_price=4.0, occurred_at=start)
    filled = sales_event(seq=2, unit_price=None, occurred_at=start + timedelta(hours=20))
    live = new_state(rules)
    first = clean_batch(records(priced, filled), live, NOW)
    rebuilt = new_state(rules)
    for record in first.clean[0]:
        rebuilt.remember(0, decode(record.value), NOW)

    too_late = sales_event(seq=3, unit_price=None, occurred_at=start + timedelta(hours=30))
    (from_live,) = cleaned(clean_batch(records(too_late, start=2), live, NOW))
    (from_rebuilt,) = cleaned(clean_batch(records(too_late, start=2), rebuilt, NOW))
    assert from_live.payload["unit_price"] is None  # 30 h after the last real price
    assert from_rebuilt == from_live


def test_a_state_reopened_from_its_checkpoint_cleans_the_next_batch_as_the_live_one(
    tmp_path: Path,
) -> None:
    """The windows and carry values written with a checkpoint are those the live state holds."""
    rng = random.Random(5)
    tenants = ["acme", "bolt", "delta"]

    def sale(seq: int, spread: float) -> dict[str, Any]:
        return sales_event(
            rng.choice(tenants),
            seq=seq,
            quantity=rng.lognormvariate(3, spread),
            unit_price=None if seq % 4 == 0 else rng.uniform(1, 3),
            product_sku=rng.choice(["A", "B"]),
        )

    history = [sale(i, 0.4) for i in range(300)]
    live = CleanState(RULES, tmp_path / "live", partitions=1)
    written = CleanState(RULES, tmp_path / "written", partitions=1)
    try:
        for start in range(0, 300, 100):  # three batches, each flushed with its checkpoint
            clean_batch(records(*history[start : start + 100], start=start), live, NOW)
            clean_batch(records(*history[start : start + 100], start=start), written, NOW)
            written.flush(0, start + 100, NOW)
        written.close()
        reopened = CleanState(RULES, tmp_path / "written", partitions=1)
        assert reopened.partition(0).store.checkpoint == 300
        follow_up = [sale(400 + i, 1.2) for i in range(100)] + history[:20]
        from_live = clean_batch(records(*follow_up, start=300), live, NOW + 1000)
        from_disk = clean_batch(records(*follow_up, start=300), reopened, NOW + 1000)
        assert from_live.duplicates == from_disk.duplicates == 20
        assert [r.value for r in from_live.clean[0]] == [r.value for r in from_disk.clean[0]]
        assert any(e.quality.outliers for e in cleaned(from_live))
        assert any("unit_price" in e.quality.filled for e in cleaned(from_live))
        reopened.close()
    finally:
        live.close()


# --------------------------------------------------------------------------- money stays exact


def test_a_price_of_0_1_times_3_is_exactly_0_3_yuan(new_state: Callable[..., CleanState]) -> None:
    """0.1 x 3 in floats is 0.30000000000000004; the clean event says 0.3."""
    sale = sales_event(seq=1, quantity=3, unit_price=0.1)
    (out,) = cleaned(clean_batch(records(sale), new_state()))
    assert out.payload["unit_price"] == "0.1"
    assert out.amounts["sales.amount_cny"] == "0.3"
    assert out.metrics["sales.amount_cny"] == 0.3


def test_a_long_decimal_is_read_and_kept_exactly(new_state: Callable[..., CleanState]) -> None:
    sale = sales_event(seq=1, quantity=2, unit_price=1.0)
    text = encode(sale).replace(b'"unit_price":1.0', b'"unit_price":12345678901234567890.123456789')
    as_string = encode(sales_event(seq=2, quantity=2, unit_price="0.10"))
    first, second = cleaned(clean_batch(records(text, as_string), new_state()))
    assert first.payload["unit_price"] == "12345678901234567890.123456789"
    assert first.amounts["sales.amount_cny"] == "24691357802469135780.246913578"
    assert second.payload["unit_price"] == "0.1" and second.amounts["sales.amount_cny"] == "0.2"


def test_the_contract_path_reads_money_exactly_too(new_state: Callable[..., CleanState]) -> None:
    """A record the mirrors leave to the contract (a string with a leading blank) is read
    exactly as well."""
    sale = sales_event(seq=1, quantity=1, unit_price=1.0, region=" east")
    text = encode(sale).replace(b'"unit_price":1.0', b'"unit_price":1234567890123456789.12345')
    (out,) = cleaned(clean_batch(records(text), new_state()))
    assert out.payload["region"] == "east"  # the contract stripped it: it took that path
    assert out.payload["unit_price"] == "1234567890123456789.12345"


def test_an_event_uses_the_rate_of_its_date_and_records_it(
    new_state: Callable[..., CleanState],
) -> None:
    table = rates_table({"EUR": "7.6", "USD": "7.1"}, day="2026-11-28")
    table.add(FxRate(currency="EUR", date="2026-11-29", cny_per_unit="7.6512", source="PBOC"), 0)  # type: ignore[arg-type]
    table.add(FxRate(currency="EUR", date="2026-11-30", cny_per_unit="7.7012", source="PBOC"), 0)  # type: ignore[arg-type]
    on_29 = sales_event(seq=1, quantity=3, unit_price=0.1, currency="EUR")
    on_29["occurred_at"] = "2026-11-29T23:30:00-01:00"  # 2026-11-30 in UTC
    on_29_utc = sales_event(seq=2, quantity=3, unit_price=0.1, currency="EUR")
    on_29_utc["occurred_at"] = "2026-11-29T23:30:00+00:00"
    on_30 = sales_event(seq=3, quantity=3, unit_price=0.1, currency="EUR")
    on_30["occurred_at"] = "2026-11-30T08:00:00+08:00"  # 2026-11-30 00:00 UTC
    later = sales_event(seq=4, quantity=3, unit_price=0.1, currency="EUR")
    later["occurred_at"] = "2026-12-24T08:00:00+00:00"  # no newer rate: the latest before
    a, b, c, d = cleaned(
        clean_batch(records(on_29, on_29_utc, on_30, later), new_state(rates=table))
    )
    assert [e.conversions[0].rate_date.isoformat() for e in (a, b, c, d)] == [
        "2026-11-30",
        "2026-11-29",
        "2026-11-30",
        "2026-11-30",
    ]
    assert b.conversions[0].model_dump(mode="json") == {
        "field": "unit_price",
        "from_currency": "EUR",
        "original": "0.1",
        "rate": "7.6512",
        "rate_date": "2026-11-29",
        "rate_source": "PBOC",
    }
    assert b.payload["unit_price"] == "0.76512" and b.amounts["sales.amount_cny"] == "2.29536"
    assert c.payload["unit_price"] == "0.77012" and c.amounts["sales.amount_cny"] == "2.31036"


def test_no_rate_on_or_before_the_date_is_a_dead_letter(
    new_state: Callable[..., CleanState],
) -> None:
    table = rates_table({"EUR": "7.7012"}, day="2026-11-30")
    early = sales_event(seq=1, currency="EUR")
    early["occurred_at"] = "2026-11-29T10:00:00+00:00"
    result = clean_batch(records(early), new_state(rates=table))
    (letter,) = letters(result)
    assert letter.reason == "no EUR rate on or before 2026-11-29"
    assert [(e.field, e.reason) for e in letter.errors] == [
        ("payload.currency", "no EUR rate on or before 2026-11-29")
    ]
    assert result.dead_reasons == {"no_rate": 1} and result.clean_count == 0


def test_a_rate_published_after_the_record_does_not_apply_to_it(
    new_state: Callable[..., CleanState],
) -> None:
    """Rates count as of the raw record's Kafka timestamp: cleaning the same record later, with
    a rate published meanwhile for its date, converts it the same way."""
    base = int(datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp() * 1000)
    table = rates_table({"EUR": "7.6"}, day="2026-11-28")
    late = FxRate(currency="EUR", date="2026-11-30", cny_per_unit="7.7012", source="late")  # type: ignore[arg-type]
    table.add(late, base + 5_000)  # published between the two records
    sale = sales_event(seq=1, quantity=1, unit_price=1, currency="EUR")
    sale["occurred_at"] = "2026-11-30T10:00:00+00:00"
    (before,) = [dataclasses.replace(r, timestamp=base + 4_000) for r in records(sale)]
    (after,) = [dataclasses.replace(r, timestamp=base + 6_000) for r in records(sale, start=1)]
    after = dataclasses.replace(after, value=encode({**sale, "event_id": str(uuid.uuid4())}))
    first, second = cleaned(clean_batch([before, after], new_state(rates=table)))
    assert (
        first.conversions[0].rate == "7.6"
        and first.conversions[0].rate_date.isoformat() == "2026-11-28"
    )
    assert second.conversions[0].rate == "7.7012"
