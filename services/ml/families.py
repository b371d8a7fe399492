"""Model families behind one interface: fit on a matrix, serialise to bytes, score a batch.

``sklearn-rf`` (RandomForestClassifier / Regressor) lives here; ``keras-mlp`` lives in
:mod:`.keras_family`, imported only when a Keras model is fitted or loaded, so processes that
never touch one never import tensorflow. Every family scores a whole batch at once and
returns one number per row: the probability of the positive class (classification) or the
value (regression). Serving runs with ``n_jobs=1``: with more jobs, scikit-learn's per-call
thread pool costs more than small batches gain (one-row scoring measured 5x slower).
"""

from __future__ import annotations

import io
from typing import Any, Protocol

import joblib
import numpy as np


class FittedModel(Protocol):
    family: str

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """One float per row."""
        ...

    def dump(self) -> bytes: ...


class ForestModel:
    """A fitted scikit-learn random forest."""

    family = "sklearn-rf"

    def __init__(self, estimator: Any, task: str) -> None:
        self.estimator = estimator
        self.task = task
        estimator.n_jobs = 1  # serving: see the module docstring

    def score(self, matrix: np.ndarray) -> np.ndarray:
        if self.task == "classification":
            proba = self.estimator.predict_proba(matrix)
            classes = list(self.estimator.classes_)
            if 1.0 in classes:
                return np.asarray(proba[:, classes.index(1.0)], dtype=float)
            return np.zeros(len(matrix))
        return np.asarray(self.estimator.predict(matrix), dtype=float)

    def dump(self) -> bytes:
        buffer = io.BytesIO()
        joblib.dump({"task": self.task, "estimator": self.estimator}, buffer)
        return buffer.getvalue()


def fit_forest(
    matrix: np.ndarray, labels: np.ndarray, task: str, params: dict[str, Any], seed: int = 0
) -> ForestModel:
    from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor

    kind = RandomForestClassifier if task == "classification" else RandomForestRegressor
    estimator = kind(random_state=seed, n_jobs=1, **params)
    estimator.fit(matrix, labels)
    return ForestModel(estimator, task)


SERIALIZATION = {"sklearn-rf": "joblib", "keras-mlp": "keras"}
FAMILIES = tuple(SERIALIZATION)


def fit(
    family: str,
    matrix: np.ndarray,
    labels: np.ndarray,
    task: str,
    params: dict[str, Any],
    seed: int = 0,
) -> FittedModel:
    """Fit a model of ``family`` on ``matrix`` (rows x features) and ``labels``."""
    if family == "sklearn-rf":
        return fit_forest(matrix, labels, task, params, seed)
    if family == "keras-mlp":
        from services.ml import keras_family

        return keras_family.fit_mlp(matrix, labels, task, params, seed)
    raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")


def load(family: str, data: bytes) -> FittedModel:
    """A model from its artifact's bytes (already verified against the card's sha256)."""
    if family == "sklearn-rf":
        bundle = joblib.load(io.BytesIO(data))
        return ForestModel(bundle["estimator"], bundle["task"])
    if family == "keras-mlp":
        from services.ml import keras_family

        return keras_family.load_mlp(data)
    raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
