"""Scoring without a broker: a batch in, predictions, shadow predictions, dead letters out."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import pytest

from schemas.insights import ModelDrift, Prediction
from schemas.models import ModelCard
from services.ml.features import MlEvent
from services.ml.handlers import (
    PREDICTION_NAMESPACE,
    Scorer,
    Served,
    check_inputs,
    load_served,
    stable_id,
)
from services.ml.specs import SUPPLIER_DELAY
from services.ml.training import build_rows, train
from shared.codec import decode, encode
from shared.models import sha256_of


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


def served(events: list[MlEvent], version: int, *, trees: int = 10, seed: int = 0) -> Served:
    rows = build_rows(SUPPLIER_DELAY, events)
    trained = train(
        SUPPLIER_DELAY,
        "sklearn-rf",
        rows,
        min_firms=5,
        params={"n_estimators": trees, "max_depth": 5},
        evaluate_too=False,
        seed=seed,
    )
    card = ModelCard.model_validate(
        {
            **trained.card,
            "version": version,
            "artifact_bucket": "models",
            "artifact_key": f"k{version}",
            "sha256": sha256_of(trained.artifact),
            "size_bytes": len(trained.artifact),
            "created_at": datetime.now(UTC),
            "created_by": "test",
        }
    )
    return load_served(card, trained.artifact)


@pytest.fixture(scope="module")
def champion(supply: list[MlEvent]) -> Served:
    return served(supply, 1)


def batch_of(events: list[MlEvent]) -> list[tuple[Any, MlEvent]]:
    return [
        (Record("events.clean.v1", 0, i, e.tenant.encode(), b"{}", 0), e)
        for i, e in enumerate(events)
    ]


def test_the_input_check_is_one_pass_over_the_batch_and_says_why(champion: Served) -> None:
    matrix = np.tile(np.array([3, 0.5, 1, 0, 10, 2, 1, 1, 0, 1, 0.0]), (4, 1))
    matrix[1, 4] = math.nan
    matrix[2, 4] = -5  # promised before the order
    ok, reasons = check_inputs(matrix, champion)
    assert ok.tolist() == [True, False, False, True]
    assert reasons[0] == "lead_time_days is not a finite number"
    assert reasons[1].startswith("lead_time_days=-5 outside [0, 366]")


def test_a_batch_scores_its_orders_and_dead_letters_what_does_not_fit(
    supply: list[MlEvent], champion: Served
) -> None:
    scorer = Scorer(source="events.clean.v1")
    scorer.champions["supplier-delay"] = champion
    orders = [e for e in supply if e.type == "purchase_order"][-30:]
    broken = MlEvent(
        orders[0].tenant,
        "purchase_order",
        orders[0].time,
        "bad",
        1,
        {**orders[0].payload, "promised_date": None},
    )
    out = scorer.score_batch(batch_of([*orders, broken]))
    assert len(out.predictions) == 30 and out.shadow == []
    assert len(out.dead_letters) == 1
    assert "input schema of supplier-delay v1: lead_time_days" in out.dead_letters[0].reason
    for tenant, record in out.predictions:
        prediction = Prediction.model_validate(decode(encode(record)))
        assert prediction.tenant == tenant and prediction.model_version == "1"
        assert prediction.model_sha256 == champion.card.sha256
        assert prediction.label in ("late", "on_time") and prediction.probability is not None
    # the same subject scored again gets the same id (idempotent re-publication)
    again = Scorer(source="events.clean.v1", champions={"supplier-delay": champion})
    ids = {r["insight_id"] for _, r in again.score_batch(batch_of(orders)).predictions}
    assert ids == {r["insight_id"] for _, r in out.predictions}


def test_the_challenger_scores_the_same_rows_into_the_shadow_only(
    supply: list[MlEvent], champion: Served
) -> None:
    challenger = served(supply, 2, trees=5, seed=3)
    scorer = Scorer(source="events.clean.v1")
    scorer.champions["supplier-delay"] = champion
    scorer.challengers["supplier-delay"] = challenger
    orders = [e for e in supply if e.type == "purchase_order"][-20:]
    out = scorer.score_batch(batch_of(orders))
    assert {r["model_version"] for _, r in out.predictions} == {"1"}
    assert {r["model_version"] for _, r in out.shadow} == {"2"}
    assert [r["subject_event_id"] for _, r in out.shadow] == [
        r["subject_event_id"] for _, r in out.predictions
    ]


def test_drift_is_reported_for_the_operator_when_inputs_shift(
    supply: list[MlEvent], champion: Served
) -> None:
    scorer = Scorer(source="events.clean.v1", drift_min_rows=20, drift_window_seconds=86_400)
    scorer.champions["supplier-delay"] = champion
    orders = [e for e in supply if e.type == "purchase_order"]
    day = orders[-1].time + 10 * 86_400
    promised = datetime.fromtimestamp(day + 12 * 86_400, UTC).date().isoformat()
    shifted = [
        MlEvent(
            o.tenant,
            o.type,
            day + i,
            f"x{i}",
            1,
            {**o.payload, "quantity": 5e5, "promised_date": promised},
        )
        for i, o in enumerate(orders[:60])
    ]
    assert scorer.score_batch(batch_of(shifted)).drift == []  # the window is still open
    closing = MlEvent(orders[0].tenant, "purchase_order", day + 86_400, "y", 1, shifted[0].payload)
    reports = scorer.score_batch(batch_of([closing])).drift
    assert len(reports) == 1
    drift = ModelDrift.model_validate(decode(encode(reports[0])))
    assert drift.tenant == "network" and "log_quantity" in drift.drifted
    assert drift.psi["log_quantity"] > drift.threshold


def test_the_fast_prediction_id_is_uuid5() -> None:
    for name in ["a", "supplier-delay/1/0f1e/PO-1", "日本/x" * 20]:
        assert stable_id(name) == str(uuid.uuid5(PREDICTION_NAMESPACE, name))
