"""Contracts of topics internal to one service (listed in the AsyncAPI document all the same,
so an operator knows what every topic on the bus carries)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from schemas.events import Contract, TenantId


class MetricPartial(Contract):
    count: int = Field(ge=0, description="Values of the metric in the window.")
    sum: float = Field(description="Their sum.")


class FirmWindowSummary(Contract):
    """What the cross-firm side of analytics needs of one closed firm window (no raw values)."""

    kind: Literal["window"] = "window"
    tenant: TenantId
    size_s: int = Field(gt=0, description="Window size in seconds.")
    start_ms: int = Field(description="Window start, epoch milliseconds UTC.")
    event_count: int = Field(ge=0)
    metrics: dict[str, MetricPartial] = Field(description="Per metric: count and sum.")
    schema_versions: dict[str, int] = Field(description="Event type -> payload version read.")
    source_topic: str


class PartitionWatermark(Contract):
    """How far a source partition's windows are closed; None marks an idle partition."""

    kind: Literal["watermark"] = "watermark"
    source_topic: str
    partition: int = Field(ge=0)
    partitions: int = Field(ge=1, description="Partitions of the source topic.")
    watermark_ms: int | None = Field(description="Stream time minus grace, epoch ms; None: idle.")
