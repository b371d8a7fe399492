"""The two use cases, declared: what each model reads, predicts, how it is trained and refitted.

A spec is data, not code: the feature pipeline (:mod:`.features`), the trainer
(:mod:`.training`) and the scoring loop (:mod:`.app`) read it. Adding a feature means adding it
here and to the builder of its use case; the model card's input schema is built from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from schemas.models import FeatureSpec


@dataclass(frozen=True)
class ModelSpec:
    name: str
    use_case: str
    task: Literal["classification", "regression"]
    target: str
    source_event_types: tuple[str, ...]
    trigger_event_type: str
    """The event whose arrival asks for a prediction."""
    features: tuple[FeatureSpec, ...]
    label: str
    """How the label is found, in words (the card and the README quote it)."""
    label_lead_days: float
    """Longest time from a prediction to its label being known: the gap of the time split."""
    training_window_days: float
    refit_every_seconds: float
    default_family: str = "sklearn-rf"
    params: dict[str, dict[str, int | float | str]] = field(default_factory=dict)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]


def _number(
    name: str, description: str, lo: float | None = None, hi: float | None = None
) -> FeatureSpec:
    return FeatureSpec(name=name, dtype="number", description=description, minimum=lo, maximum=hi)


SUPPLIER_DELAY = ModelSpec(
    name="supplier-delay",
    use_case="Probability that a purchase order's delivery will be late, when it is placed.",
    task="classification",
    target="late_delivery",
    source_event_types=("purchase_order", "supplier_delivery", "market_price"),
    trigger_event_type="purchase_order",
    features=(
        _number(
            "supplier_deliveries",
            "Deliveries of this supplier to the firm seen so far (at most the last 50).",
            0,
            50,
        ),
        _number("supplier_on_time_rate", "Share on time of those, smoothed (n+1)/(N+2).", 0, 1),
        _number("supplier_mean_delay_days", "Mean days late (negative: early) of those.", -60, 120),
        _number("supplier_reject_rate", "Share of delivered quantity rejected.", 0, 1),
        _number("lead_time_days", "Promised date minus the order's date.", 0, 366),
        _number("log_quantity", "ln(1 + quantity ordered).", 0, 30),
        _number(
            "price_vs_market",
            "Unit price over the commodity's mean market price of the "
            "last 30 days (1 when none is known).",
            0,
            1000,
        ),
        _number(
            "has_market_price", "1 when a recent market price of the commodity is known.", 0, 1
        ),
        _number("month_sin", "Season: sin(2 pi month / 12) of the order date.", -1, 1),
        _number("month_cos", "Season: cos(2 pi month / 12) of the order date.", -1, 1),
        _number(
            "product_code",
            "Index of the product among those seen in training, -1 if new.",
            -1,
            None,
        ),
    ),
    label="a later supplier_delivery of the same firm and po_id has delivered_date > promised_date",
    label_lead_days=40.0,
    training_window_days=365.0,
    refit_every_seconds=6 * 3600.0,
    params={
        "sklearn-rf": {"n_estimators": 100, "min_samples_leaf": 5, "max_depth": 12},
        "keras-mlp": {"units": 32, "epochs": 20, "batch_size": 64},
    },
)

DEMAND = ModelSpec(
    name="demand",
    use_case="Next window's sales quantity of a firm and product, from its recent windows.",
    task="regression",
    target="next_window_sales_quantity",
    source_event_types=("sales_order_line",),
    trigger_event_type="sales_order_line",
    features=(
        _number("lag_1", "Quantity sold in the window just closed.", 0, None),
        _number("lag_2", "... the window before.", 0, None),
        _number("lag_3", "... three windows back.", 0, None),
        _number("lag_4", "... four windows back.", 0, None),
        _number("mean_4", "Mean of the four.", 0, None),
        _number("weekday_sin", "sin(2 pi weekday / 7) of the predicted window.", -1, 1),
        _number("weekday_cos", "cos(2 pi weekday / 7) of the predicted window.", -1, 1),
        _number(
            "product_code",
            "Index of the product among those seen in training, -1 if new.",
            -1,
            None,
        ),
    ),
    label="the sum of sales_order_line quantities of the firm and product in the next window",
    label_lead_days=1.0,
    training_window_days=180.0,
    refit_every_seconds=24 * 3600.0,
    params={
        "sklearn-rf": {"n_estimators": 100, "min_samples_leaf": 3, "max_depth": 12},
        "keras-mlp": {"units": 32, "epochs": 30, "batch_size": 64},
    },
)

SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (SUPPLIER_DELAY, DEMAND)}
