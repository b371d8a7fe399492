"""Drift of the live inputs against the training reference: population stability per feature.

The reference (kept in the artifact) holds, per feature, the decile edges of the training
rows and the share of rows in each bin. Live rows are counted into the same bins over a
window; the population stability index ``sum((live - ref) * ln(live / ref))`` per feature is
0 for the same distribution, above about 0.2 for a shift worth a look, and is what crosses
the threshold (``XIETONG_ML_DRIFT_THRESHOLD``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SMOOTH = 1e-4


def _bin(column: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, column, side="right")


def reference_of(matrix: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Decile edges and bin shares of each column of the training matrix."""
    edges: list[list[float]] = []
    shares: list[list[float]] = []
    for j in range(matrix.shape[1]):
        column = matrix[:, j]
        cuts: np.ndarray = (
            np.unique(np.quantile(column, np.linspace(0.1, 0.9, 9))) if len(column) else np.zeros(0)
        )
        counts = np.bincount(_bin(column, cuts), minlength=len(cuts) + 1)
        edges.append([float(c) for c in cuts])
        shares.append((counts / max(1, counts.sum())).tolist())
    return {"names": names, "edges": edges, "shares": shares, "rows": int(matrix.shape[0])}


def psi(reference: dict[str, Any], matrix: np.ndarray) -> dict[str, float]:
    """Population stability index of each feature of ``matrix`` against ``reference``."""
    out: dict[str, float] = {}
    for j, name in enumerate(reference["names"]):
        edges = np.asarray(reference["edges"][j])
        expected = np.asarray(reference["shares"][j]) + SMOOTH
        counts = np.bincount(_bin(matrix[:, j], edges), minlength=len(edges) + 1)
        live = counts / max(1, counts.sum()) + SMOOTH
        out[name] = float(np.sum((live - expected) * np.log(live / expected)))
    return out


@dataclass
class DriftWindow:
    """Live rows of one model over one event-time window (bounded: a reservoir of rows)."""

    start: float
    rows: list[np.ndarray] = field(default_factory=list)
    seen: int = 0
    cap: int = 5000

    def add(self, matrix: np.ndarray) -> None:
        self.seen += len(matrix)
        room = self.cap - sum(len(r) for r in self.rows)
        if room > 0 and len(matrix):
            self.rows.append(matrix[:room])

    def matrix(self) -> np.ndarray:
        return np.vstack(self.rows) if self.rows else np.empty((0, 0))
