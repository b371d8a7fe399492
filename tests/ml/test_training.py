"""Training: consent, the k-firms threshold, honest evaluation, both families through one path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from schemas.control import Grant
from services.ml import families
from services.ml.features import MlEvent
from services.ml.specs import DEMAND, SUPPLIER_DELAY
from services.ml.training import (
    NotEnoughFirms,
    build_rows,
    evaluate,
    train,
    unbundle,
)
from shared.control import MODEL_TRAINING, training_firms

NOW = datetime(2026, 11, 1, tzinfo=UTC)
SMALL_RF = {"n_estimators": 20, "max_depth": 6}


def grant(owner: str, types: list[str], **changes: object) -> Grant:
    return Grant.model_validate(
        {
            "grant_id": f"g{owner}0000",
            "owner": owner,
            "grantee": "network",
            "insight_types": types,
            "created_at": NOW - timedelta(days=1),
            **changes,
        }
    )


def test_only_firms_that_granted_model_training_contribute() -> None:
    grants = [
        grant("acme", [MODEL_TRAINING]),
        grant("bolt", ["statistics"]),
        grant("cast", [MODEL_TRAINING], revoked_at=NOW - timedelta(hours=1)),
        grant("dyna", [MODEL_TRAINING]).model_copy(update={"grantee": "bank"}),
    ]
    firms = {"acme", "bolt", "cast", "dyna", "eddy"}
    assert training_firms(firms, grants, NOW) == {"acme"}


def test_a_model_of_fewer_than_k_firms_is_not_published(supply: list[MlEvent]) -> None:
    rows = build_rows(SUPPLIER_DELAY, supply)
    firms = sorted(set(rows.firms))
    few = rows.only(np.array([f in firms[:3] for f in rows.firms]))
    with pytest.raises(NotEnoughFirms, match="3 firm"):
        train(SUPPLIER_DELAY, "sklearn-rf", few, min_firms=5, params=SMALL_RF)


def test_evaluation_reports_each_figure_with_baseline_and_random_split(
    supply: list[MlEvent],
) -> None:
    rows = build_rows(SUPPLIER_DELAY, supply)
    reports = evaluate(SUPPLIER_DELAY, "sklearn-rf", rows, SMALL_RF)
    by = {(r.split, r.metric): r for r in reports}
    auc = by[("time", "roc_auc")]
    assert auc.baseline == 0.5 and auc.random_split is not None and auc.rows > 50
    assert auc.value > 0.6  # the simulated lateness pattern is learnable
    brier = by[("time", "brier")]
    assert brier.baseline is not None and brier.value < brier.baseline
    assert ("time+unseen_firms", "roc_auc") in by


def test_demand_beats_the_last_value_and_the_random_split_shows_its_leak(
    sales: list[MlEvent],
) -> None:
    rows = build_rows(DEMAND, sales)
    reports = evaluate(DEMAND, "sklearn-rf", rows, SMALL_RF)
    mae = next(r for r in reports if r.split == "time" and r.metric == "mae")
    assert mae.baseline is not None and mae.value < mae.baseline
    assert mae.random_split is not None


@pytest.mark.parametrize("family", ["sklearn-rf", "keras-mlp"])
def test_both_families_go_through_one_path_to_an_artifact(
    family: str, supply: list[MlEvent]
) -> None:
    rows = build_rows(SUPPLIER_DELAY, supply)
    params = SMALL_RF if family == "sklearn-rf" else {"units": 8, "epochs": 2}
    trained = train(SUPPLIER_DELAY, family, rows, min_firms=5, params=params, evaluate_too=False)
    card = trained.card
    assert card["family"] == family and card["contributing_firms"] == 6
    assert card["training_rows"] == len(rows.labels)
    assert [f.name for f in card["features"]] == SUPPLIER_DELAY.feature_names
    model, categories, reference = unbundle(family, trained.artifact)
    assert categories == trained.categories and reference["names"] == SUPPLIER_DELAY.feature_names
    matrix = np.vstack([s.row for s in rows.subjects[:50]])
    matrix[:, -1] = 0
    again = model.score(matrix)
    assert np.allclose(again, trained.model.score(matrix), atol=1e-6)
    assert ((again >= 0) & (again <= 1)).all()
    with pytest.raises(ValueError, match="artifact holds"):
        unbundle("keras-mlp" if family == "sklearn-rf" else "sklearn-rf", trained.artifact)


def test_an_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown model family"):
        families.fit("xgboost", np.zeros((2, 2)), np.zeros(2), "classification", {})
