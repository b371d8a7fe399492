"""What the network may learn of a firm: differentially private figures and keyed ids.

Benchmarks and cluster profiles aggregate a handful of firms, so exact quantiles or means give
firms' figures away (with five firms p25, p50 and p75 *are* three firms' values). What is
published instead is **differentially private** (DP) with the firm as the unit:

    changing any one firm's value to any other value changes the probability of every
    benchmark (all its figures together) by at most a factor ``e**epsilon``.

So no published figure, combined with anything else an attacker knows (every other firm's
value, its own value, other windows' benchmarks, cluster profiles), pins a firm's value down
better than that factor allows. The mechanisms, written out here because diffprivlib 0.6 does
not import with scikit-learn 1.9 and OpenDP cannot draw reproducible noise:

- every value is first **clamped** to its metric's declared range ``[lower, upper]`` (settings,
  never derived from the data); the ranges are public;
- **quantiles**: the exponential mechanism over the gaps between the sorted clamped values
  (Smith 2011, as diffprivlib's ``quantile``), utility ``-|rank - q n|``, sensitivity 1;
- **mean**: Laplace noise of scale ``(upper - lower) / (n epsilon)`` (a firm moves the mean by
  at most ``(upper - lower) / n``; ``n`` firms is public), the result clamped to the range;
- a benchmark's budget ``epsilon`` is split evenly over its six figures (p10..p90 and mean);
  quantiles are then sorted (post-processing costs no budget).

**Reproducible noise.** The noise is drawn from a PRNG seeded by an HMAC, under the network
secret (``XIETONG_NETWORK_SECRET``), of what the figure is (segment, metric, window) and of its
exact inputs. A re-run after a crash on the same inputs publishes the identical figures, so
averaging copies gains nothing; were the inputs ever different (the registry changed between
runs), the draws are unrelated and the two releases compose (``2 epsilon``) instead of
differencing to an exact figure. Without the secret the draws cannot be predicted.

**Insight ids** are keyed too (:func:`keyed_uuid`): an HMAC of what the insight is about, so an
id seen by one tenant (an SSE resume id) says nothing about which insights exist for another.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

QUANTILES: dict[str, float] = {"p10": 0.10, "p25": 0.25, "p50": 0.50, "p75": 0.75, "p90": 0.90}
FIGURES = len(QUANTILES) + 1
"""Figures of a benchmark that share its budget: the five quantiles and the mean."""


def _mac(key: bytes, parts: Sequence[object]) -> bytes:
    message = "\x1f".join(str(part) for part in parts).encode()
    return hmac.new(key, message, hashlib.sha256).digest()


def keyed_uuid(key: bytes, *parts: object) -> uuid.UUID:
    """A UUID (version 8, RFC 9562) from the HMAC-SHA256 of ``parts`` under ``key``:
    the same for the same key and parts, unpredictable without the key."""
    value = int.from_bytes(_mac(key, parts)[:16], "big")
    value &= ~(0xF << 76)  # version bits
    value |= 0x8 << 76
    value &= ~(0x3 << 62)  # variant bits: RFC 4122/9562
    value |= 0x2 << 62
    return uuid.UUID(int=value)


def keyed_rng(key: bytes, *parts: object) -> np.random.Generator:
    """A PRNG seeded (256 bits) by the HMAC of ``parts`` under ``key``."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(_mac(key, parts), "big")))


def inputs_digest(values: Mapping[str, float]) -> str:
    """A digest of which firms gave which values (part of the noise seed), the values to 9
    significant digits: a sum taken in another order is the same input."""
    text = "\n".join(f"{firm}\x1f{float(v):.9g}" for firm, v in sorted(values.items()))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Bounds:
    """The declared range of a metric's per-firm value; values outside are clamped."""

    lower: float
    upper: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lower) and math.isfinite(self.upper)) or (
            self.upper <= self.lower
        ):
            raise ValueError(f"bounds need finite lower < upper, got {self.lower}, {self.upper}")

    @property
    def width(self) -> float:
        return self.upper - self.lower

    def clamp(self, values: Sequence[float]) -> np.ndarray[tuple[int], np.dtype[np.float64]]:
        clamped: np.ndarray[tuple[int], np.dtype[np.float64]] = np.clip(
            np.asarray(values, dtype=float), self.lower, self.upper
        )
        return clamped


def dp_mean(
    values: Sequence[float], bounds: Bounds, epsilon: float, rng: np.random.Generator
) -> float:
    """epsilon-DP mean of ``values`` (one per firm, count public): the clamped mean plus
    Laplace noise of scale ``width / (n epsilon)``, clamped to the range."""
    clamped = bounds.clamp(values)
    scale = bounds.width / (len(clamped) * epsilon)
    noisy = float(clamped.mean()) + float(rng.laplace(0.0, scale))
    return min(max(noisy, bounds.lower), bounds.upper)


def dp_quantile(
    values: Sequence[float], q: float, bounds: Bounds, epsilon: float, rng: np.random.Generator
) -> float:
    """epsilon-DP ``q`` quantile: the exponential mechanism over the ``n + 1`` gaps between the
    sorted clamped values and the bounds, a gap's weight its length times
    ``exp(-epsilon |rank - q n| / 2)``; a point uniform in the chosen gap."""
    clamped = np.sort(bounds.clamp(values))
    n = len(clamped)
    edges = np.concatenate([[bounds.lower], clamped, [bounds.upper]])
    gaps = np.diff(edges)
    utility = -np.abs(np.arange(n + 1) - q * n)
    with np.errstate(divide="ignore"):
        log_weight = np.log(gaps) + epsilon * utility / 2.0
    if not np.isfinite(log_weight).any():  # every gap empty: all values at one bound
        return float(edges[0])
    weight = np.exp(log_weight - log_weight.max())
    gap = int(rng.choice(n + 1, p=weight / weight.sum()))
    return float(rng.uniform(edges[gap], edges[gap + 1]))


@dataclass(frozen=True)
class PrivateFigures:
    firms: int
    quantiles: dict[str, float]
    mean: float


def private_benchmark(
    per_firm_values: Mapping[str, float],
    bounds: Bounds,
    epsilon: float,
    rng: np.random.Generator,
) -> PrivateFigures:
    """The five quantiles and the mean of per-firm values, together epsilon-DP (each figure
    ``epsilon / 6``); quantiles sorted, so p10 <= ... <= p90."""
    values = [float(v) for _, v in sorted(per_firm_values.items())]
    share = epsilon / FIGURES
    drawn = sorted(dp_quantile(values, q, bounds, share, rng) for q in QUANTILES.values())
    return PrivateFigures(
        firms=len(values),
        quantiles=dict(zip(QUANTILES, drawn, strict=True)),
        mean=dp_mean(values, bounds, share, rng),
    )
