"""Figures, the printed table and ``results.json``.

A figure is a ratio of our path (numerator) to its raw baseline (denominator), measured in the
same run, A and B interleaved. ``ratio`` is the median of the per-repeat ratios (each repeat's A
and B ran back to back, so slow drift of a shared machine cancels within a repeat); ``spread`` is
half the range of those per-repeat ratios. A row that could not be measured says why
(``status`` ``"not available"`` when the service it measures does not exist yet, ``"error"``
when the measurement failed) and carries no number — never a made-up one.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

Status = Literal["ok", "not available", "error", "info"]

ROW_KEYS = (
    "hop.baseline",
    "hop.orjson",
    "hop.confluent",
    "R1",
    "R2",
    "R3",
    "R4",
    "R4.naive",
    "R4.ceiling",
    "R5.p50",
    "R5.p99",
    "rss.ingest",
    "rss.clean",
    "rss.analytics",
    "ML1",
    "ML1.onerow",
    "ML2",
    "ML3",
    "nlp.docs",
    "nlp.single",
    "nlp.redact",
    "nlp.kafka",
    "S1.archive",
    "S2.upload",
    "S2.download",
    "S3.replay",
)
"""Every row the harness reports, in table order."""

LIBRARIES = (
    "aiokafka",
    "confluent-kafka",
    "orjson",
    "msgspec",
    "aiohttp",
    "pydantic",
    "pandas",
)


@dataclass
class Side:
    """One side of a pair: what ran, in what unit, each repeat's value and their median."""

    label: str
    unit: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass
class Row:
    key: str
    title: str
    target: str | None = None
    status: Status = "ok"
    reason: str | None = None
    numerator: Side | None = None
    denominator: Side | None = None
    ratio_samples: list[float] = field(default_factory=list)
    events: int = 0
    note: str | None = None
    """What the figure is made of, where the time goes (shown under the table)."""

    @property
    def ratio(self) -> float | None:
        return statistics.median(self.ratio_samples) if self.ratio_samples else None

    @property
    def spread(self) -> float | None:
        if not self.ratio_samples:
            return None
        return (max(self.ratio_samples) - min(self.ratio_samples)) / 2

    @property
    def verdict(self) -> str:
        """``pass``/``miss`` against the target; speed never fails the run."""
        if self.target is None or self.ratio is None:
            return ""
        op, bound = self.target.split()
        hit = self.ratio >= float(bound) if op == ">=" else self.ratio <= float(bound)
        return "pass" if hit else "miss"

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "status": self.status,
            "reason": self.reason,
            "numerator": _side_json(self.numerator),
            "denominator": _side_json(self.denominator),
            "ratio": self.ratio,
            "spread": self.spread,
            "ratio_samples": self.ratio_samples,
            "repeats": len(self.ratio_samples)
            or (len(self.numerator.samples) if self.numerator else 0),
            "events": self.events,
            "note": self.note,
            "target": self.target,
            "verdict": self.verdict or None,
        }


def _side_json(side: Side | None) -> dict[str, Any] | None:
    if side is None:
        return None
    return {**asdict(side), "median": side.median}


def paired(row: Row, a: Side, b: Side) -> Row:
    """Fill ``row`` with A, B and the per-repeat ratios A/B."""
    row.numerator, row.denominator = a, b
    row.ratio_samples = [x / y for x, y in zip(a.samples, b.samples, strict=True) if y]
    return row


def environment(broker_version: str, events: int, repeats: int, warmup: int) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        from confluent_kafka import libversion

        versions["librdkafka"] = libversion()[0]
    except ImportError:
        versions["librdkafka"] = None
    return {
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "events": events,
        "repeats": repeats,
        "warmup": warmup,
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}, {_cpu_model()}",
        "python": sys.version.split()[0],
        "libraries": versions,
        "broker": broker_version,
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if unit == "events/s" or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if abs(value) >= 1 or unit != "" else f"{value:.3f}"


def table(rows: list[Row]) -> str:
    """A Markdown table: readable in a terminal and pasteable into the README."""
    lines = [
        "| row | ours | baseline | ratio | spread | target | |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in rows:
        if row.status in ("not available", "error"):
            lines.append(
                f"| {row.key} {row.title} | {row.status}: {row.reason} | | | | "
                f"{row.target or ''} | |"
            )
            continue
        num, den = row.numerator, row.denominator
        ours = f"{_fmt(num.median, num.unit)} {num.unit}" if num else ""
        base = f"{_fmt(den.median, den.unit)} {den.unit}" if den else ""
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else ""
        spread = f"±{row.spread:.2f}" if row.spread is not None else ""
        lines.append(
            f"| {row.key} {row.title} | {ours} | {base} | {ratio} | {spread} | "
            f"{row.target or ''} | {row.verdict} |"
        )
    notes = [f"- {row.key}: {row.note}" for row in rows if row.note and row.status != "error"]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines)


def results_document(env: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    """The run's environment once, and every row carrying what it needs to be read alone."""
    context = {
        "cpu_count": env["cpu_count"],
        "python": env["python"],
        "libraries": env["libraries"],
        "broker": env["broker"],
    }
    return {"environment": env, "rows": [{**row.to_json(), **context} for row in rows]}
