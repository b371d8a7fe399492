"""The Keras MLP: called directly on small batches, the same numbers as predict()."""

from __future__ import annotations

import numpy as np

from services.ml.keras_family import fit_mlp, load_mlp


def test_direct_call_and_predict_give_the_same_output_and_survive_a_round_trip() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(float)
    model = fit_mlp(x, y, "classification", {"units": 8, "epochs": 2, "batch_size": 32})
    for rows in (1, 7, 100):
        assert np.allclose(model.score(x[:rows]), model.predict(x[:rows]), atol=1e-5)
    again = load_mlp(model.dump())
    assert np.allclose(again.score(x[:50]), model.score(x[:50]), atol=1e-6)


def test_a_regression_network_answers_in_the_target_units() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 3))
    y = 500 + 100 * x[:, 0]
    model = fit_mlp(x, y, "regression", {"units": 16, "epochs": 3})
    assert 300 < float(np.mean(model.score(x))) < 700
