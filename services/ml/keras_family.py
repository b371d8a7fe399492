"""The ``keras-mlp`` family: a small Keras network (tensorflow-cpu), imported only on demand.

The network standardises its inputs itself (a ``Normalization`` layer adapted on the training
rows), so it takes the same matrix as a forest. For scoring, the model is **called directly**
(``model(x, training=False)``) on the service's small micro-batches: ``predict()`` builds a
dataset and a loop for every call and is meant for large inputs (the Keras docs say so; a test
checks both give the same numbers). The artifact is the native ``.keras`` archive.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np

DIRECT_CALL_MAX_ROWS = 4096
"""Above this, ``predict()`` (batched internally) is used instead of one direct call."""


class MlpModel:
    family = "keras-mlp"

    def __init__(self, model: Any) -> None:
        self.model = model

    def score(self, matrix: np.ndarray) -> np.ndarray:
        x = np.asarray(matrix, dtype="float32")
        if len(x) == 0:
            return np.zeros(0)
        if len(x) > DIRECT_CALL_MAX_ROWS:
            out = self.model.predict(x, batch_size=1024, verbose=0)
        else:
            out = self.model(x, training=False)
            out = out.numpy() if hasattr(out, "numpy") else np.asarray(out)
        return np.asarray(out, dtype=float).reshape(-1)

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Keras' own ``predict()`` (for the equivalence test and large batches)."""
        x = np.asarray(matrix, dtype="float32")
        return np.asarray(self.model.predict(x, verbose=0), dtype=float).reshape(-1)

    def dump(self) -> bytes:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "model.keras")
            self.model.save(path)
            with open(path, "rb") as file:
                return file.read()


def fit_mlp(
    matrix: np.ndarray, labels: np.ndarray, task: str, params: dict[str, Any], seed: int = 0
) -> MlpModel:
    keras.utils.set_random_seed(seed)
    x = np.asarray(matrix, dtype="float32")
    y = np.asarray(labels, dtype="float32")
    units = int(params.get("units", 32))
    norm = keras.layers.Normalization()
    norm.adapt(x)
    classify = task == "classification"
    model = keras.Sequential(
        [
            keras.Input(shape=(x.shape[1],)),
            norm,
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dense(max(2, units // 2), activation="relu"),
            keras.layers.Dense(1, activation="sigmoid" if classify else None),
        ]
    )
    if not classify:  # regression: learn a standardised target, give back original units
        mean, scale = float(y.mean()), float(y.std()) or 1.0
        model.add(keras.layers.Rescaling(scale, offset=mean))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=float(params.get("learning_rate", 0.01))),
        loss="binary_crossentropy" if classify else "mse",
    )
    model.fit(
        x,
        y,
        epochs=int(params.get("epochs", 20)),
        batch_size=int(params.get("batch_size", 64)),
        verbose=0,
    )
    return MlpModel(model)


def load_mlp(data: bytes) -> MlpModel:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        with open(path, "wb") as file:
            file.write(data)
        return MlpModel(keras.models.load_model(path, compile=False))
