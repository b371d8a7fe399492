"""Training: rows from a replay of the clean events, honest evaluation, the artifact and card.

Rows are built by the same point-in-time state the scoring loop uses (:mod:`.features`), from
firms that allow model training only (:func:`shared.control.training_firms`). Evaluation, all on
the same rows:

- ``time``: the last quarter of the rows by event time is the test set; training rows end
  ``label_lead_days`` before it (the gap: a label known only after the test period began would
  otherwise leak it);
- ``time+unseen_firms``: the same periods, with about a fifth of the firms held out of
  training entirely and tested on (what a new partner gets);
- every figure next to a naive baseline on the same rows (the training base rate; the last
  window's value) and next to the same metric on a random 75/25 split (far better there than
  on ``time`` means the random split leaks).

The model that is published is then fitted on every row; it is published only when at least
``k`` firms contributed (:class:`NotEnoughFirms` otherwise).
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import joblib
import numpy as np

from schemas.models import MetricReport
from services.ml import families
from services.ml.drift import reference_of
from services.ml.features import DAY, DemandState, MlEvent, Subject, SupplyState, encode_products
from services.ml.specs import DEMAND, SUPPLIER_DELAY, ModelSpec


class NotEnoughFirms(RuntimeError):
    """Fewer than ``k`` firms contributed rows: the model is not published."""


@dataclass
class Rows:
    subjects: list[Subject]
    labels: np.ndarray
    label_times: np.ndarray

    @property
    def times(self) -> np.ndarray:
        return np.array([s.time for s in self.subjects])

    @property
    def firms(self) -> list[str]:
        return [s.tenant for s in self.subjects]

    def only(self, mask: np.ndarray) -> Rows:
        return Rows(
            [s for s, keep in zip(self.subjects, mask, strict=True) if keep],
            self.labels[mask],
            self.label_times[mask],
        )


def build_rows(spec: ModelSpec, events: Iterable[MlEvent], *, window_seconds: float = DAY) -> Rows:
    """Replay ``events`` in event-time order through the live state; keep labelled subjects."""
    ordered = sorted(events, key=lambda e: e.time)
    subjects: list[Subject] = []
    labels: list[float] = []
    label_times: list[float] = []
    if spec.name == SUPPLIER_DELAY.name:
        supply = SupplyState()
        for event in ordered:
            if event.type == spec.trigger_event_type:
                subjects.append(supply.subject(event))
            else:
                supply.observe(event)
        kept = []
        for subject in subjects:
            found = supply.labels.get((subject.tenant, subject.key))
            if found is not None and found[0] >= subject.time:
                kept.append(subject)
                labels.append(found[1])
                label_times.append(found[0])
        subjects = kept
    elif spec.name == DEMAND.name:
        demand = DemandState(window_seconds)
        pending: list[Subject] = []
        for event in ordered:
            pending += demand.observe(event)
        for subject in pending:
            value = demand.label(subject.tenant, subject.key)
            if value is not None:
                subjects.append(subject)
                labels.append(value)
                label_times.append(subject.time + window_seconds)
    else:
        raise ValueError(f"no row builder for {spec.name}")
    finite = [bool(np.isfinite(s.row[:-1]).all()) for s in subjects]
    rows = Rows(subjects, np.array(labels, dtype=float), np.array(label_times, dtype=float))
    return rows.only(np.array(finite, dtype=bool)) if subjects else rows


# --------------------------------------------------------------------------- evaluation


def _metrics(task: str, truth: np.ndarray, scored: np.ndarray) -> dict[str, float]:
    if task == "classification":
        from sklearn.metrics import brier_score_loss, roc_auc_score

        out = {"brier": float(brier_score_loss(truth, np.clip(scored, 0, 1)))}
        if len(set(truth.tolist())) == 2:
            out["roc_auc"] = float(roc_auc_score(truth, scored))
        return out
    error = scored - truth
    return {"mae": float(np.mean(np.abs(error))), "rmse": float(math.sqrt(np.mean(error**2)))}


def _baseline(task: str, train_labels: np.ndarray, test: Rows) -> np.ndarray:
    if task == "classification":
        return np.full(len(test.labels), float(train_labels.mean()) if len(train_labels) else 0.5)
    return np.array([s.row[0] for s in test.subjects])  # last value: the window just closed


def _fit_and_score(
    spec: ModelSpec, family: str, train: Rows, test: Rows, params: dict[str, Any], seed: int
) -> np.ndarray:
    categories = sorted({s.product for s in train.subjects})
    position = spec.feature_names.index("product_code")
    model = families.fit(
        family,
        encode_products(train.subjects, categories, position),
        train.labels,
        spec.task,
        params,
        seed,
    )
    return model.score(encode_products(test.subjects, categories, position))


def _held_out_firms(firms: list[str]) -> set[str]:
    distinct = sorted(set(firms), key=lambda f: hashlib.sha256(f.encode()).hexdigest())
    return set(distinct[: max(1, len(distinct) // 5)]) if len(distinct) >= 3 else set()


def evaluate(
    spec: ModelSpec, family: str, rows: Rows, params: dict[str, Any], seed: int = 0
) -> list[MetricReport]:
    """The figures of the card (see the module docstring)."""
    times = rows.times
    if len(rows.labels) < 20:
        return []
    test_start = float(np.quantile(times, 0.75))
    gap = spec.label_lead_days * DAY
    # A training row must be labelled before the test period starts (and sit a gap before it).
    train_mask = (times < test_start - gap) & (rows.label_times < test_start)
    test_mask = times >= test_start
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(rows.labels))
    random_test = np.zeros(len(rows.labels), dtype=bool)
    random_test[shuffled[: len(shuffled) // 4]] = True
    random_scores = _metrics(
        spec.task,
        rows.labels[random_test],
        _fit_and_score(spec, family, rows.only(~random_test), rows.only(random_test), params, seed),
    )
    reports: list[MetricReport] = []
    held = _held_out_firms(rows.firms)
    in_held = np.array([f in held for f in rows.firms], dtype=bool)
    splits = {
        "time": (train_mask, test_mask),
        "time+unseen_firms": (train_mask & ~in_held, test_mask & in_held),
    }
    for split, (train_m, test_m) in splits.items():
        train, test = rows.only(train_m), rows.only(test_m)
        if len(train.labels) < 10 or len(test.labels) < 5:
            continue
        scored = _metrics(
            spec.task, test.labels, _fit_and_score(spec, family, train, test, params, seed)
        )
        naive = _metrics(spec.task, test.labels, _baseline(spec.task, train.labels, test))
        for metric, value in scored.items():
            reports.append(
                MetricReport(
                    metric=metric,
                    split=split,
                    value=value,
                    baseline=naive.get(metric),
                    random_split=random_scores.get(metric),
                    rows=len(test.labels),
                )
            )
    return reports


# --------------------------------------------------------------------------- the artifact


@dataclass
class Trained:
    model: families.FittedModel
    categories: list[str]
    reference: dict[str, Any]
    artifact: bytes
    card: dict[str, Any]


def bundle(model: families.FittedModel, categories: list[str], reference: dict[str, Any]) -> bytes:
    """The artifact: the family's own bytes with what scoring needs beside them."""
    buffer = io.BytesIO()
    joblib.dump(
        {
            "family": model.family,
            "model": model.dump(),
            "categories": categories,
            "reference": reference,
        },
        buffer,
    )
    return buffer.getvalue()


def unbundle(family: str, data: bytes) -> tuple[families.FittedModel, list[str], dict[str, Any]]:
    content = joblib.load(io.BytesIO(data))
    if content.get("family") != family:
        raise ValueError(f"artifact holds a {content.get('family')!r} model, card says {family!r}")
    return families.load(family, content["model"]), content["categories"], content["reference"]


def train(
    spec: ModelSpec,
    family: str,
    rows: Rows,
    *,
    min_firms: int,
    params: dict[str, Any] | None = None,
    evaluate_too: bool = True,
    seed: int = 0,
) -> Trained:
    """Evaluate, fit on every row, and build the artifact and card fields."""
    firms = set(rows.firms)
    if len(firms) < min_firms:
        raise NotEnoughFirms(
            f"{spec.name}: {len(firms)} firm(s) contributed rows, {min_firms} needed"
        )
    chosen = {**spec.params.get(family, {}), **(params or {})}
    reports = evaluate(spec, family, rows, chosen, seed) if evaluate_too else []
    categories = sorted({s.product for s in rows.subjects})
    position = spec.feature_names.index("product_code")
    matrix = encode_products(rows.subjects, categories, position)
    model = families.fit(family, matrix, rows.labels, spec.task, chosen, seed)
    reference = reference_of(matrix, spec.feature_names)
    artifact = bundle(model, categories, reference)
    times = rows.times
    card = {
        "name": spec.name,
        "use_case": spec.use_case,
        "task": spec.task,
        "target": spec.target,
        "family": family,
        "serialization": "joblib" if family == "sklearn-rf" else "joblib+keras",
        "params": chosen,
        "features": [
            f.model_copy(update={"categories": categories}) if f.name == "product_code" else f
            for f in spec.features
        ],
        "source_event_types": list(spec.source_event_types),
        "training_window_start": datetime.fromtimestamp(float(times.min()), UTC),
        "training_window_end": datetime.fromtimestamp(float(times.max()), UTC),
        "training_rows": len(rows.labels),
        "contributing_firms": len(firms),
        "metrics": reports,
    }
    return Trained(model, categories, reference, artifact, card)
