"""The archive's work on a flushed segment, as plain functions: label each group, place it,
build its object and manifest — or say why it cannot be stored (a dead letter)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from operator import attrgetter

from schemas.insights import INSIGHT_MODELS
from services.storage.objects import Manifest, build_object
from services.storage.placement import PlacementError, Policy
from services.storage.segments import ArchivedRecord, Segment

SERVICE = "storage"
_LABELLED = attrgetter("tenant", "kind", "visibility")
"""What a record's labels depend on."""


@dataclass(frozen=True)
class Labeller:
    """The labels of archived data: sensitivity by type, residency by tenant."""

    sensitivity: Mapping[str, str]
    residency: Mapping[str, str]
    default_residency: str

    def labels(self, tenant: str, kind: str, visibility: str = "private") -> dict[str, str]:
        if kind in self.sensitivity:
            sensitivity = self.sensitivity[kind]
        elif kind in INSIGHT_MODELS:
            sensitivity = "public" if visibility == "public" else "confidential"
        else:
            sensitivity = "internal"
        return {
            "sensitivity": sensitivity,
            "residency": self.residency.get(tenant, self.default_residency),
            "tenant": tenant,
            "kind": kind,
        }

    def labels_of_group(self, triples: Iterable[tuple[str, str, str]]) -> dict[str, str]:
        """One object's labels: the most sensitive of its records' (it holds them all), from
        the distinct ``(tenant, kind, visibility)`` of its records in the order of their first
        record (records that share them share labels: the most sensitive found first is the
        same as over every record)."""
        order = {"public": 0, "internal": 1, "confidential": 2, "personal": 3}
        triples = list(triples)
        found = [self.labels(*triple) for triple in triples]
        most = max(found, key=lambda labels: order.get(labels["sensitivity"], 3))
        kinds = sorted({kind for _, kind, _ in triples})
        return {**most, "kind": kinds[0] if len(kinds) == 1 else most["kind"]}


@dataclass
class Planned:
    """What to do with one flushed segment."""

    objects: list[tuple[str, bytes, Manifest]] = field(default_factory=list)
    """``(store, parquet bytes, manifest)``."""
    refused: list[tuple[list[ArchivedRecord], str]] = field(default_factory=list)
    """Groups no store may receive, with the reason (to the dead-letter topic)."""


def plan_segment(
    segment: Segment, policy: Policy, labeller: Labeller, written_at: datetime
) -> Planned:
    """Every ``(tenant, date)`` group of ``segment`` as an object in the store its labels say.

    A group whose kinds differ in sensitivity is split by kind first, so one personal record
    does not carry a whole group's other kinds to the private store (or the reverse)."""
    planned = Planned()
    for (_tenant, _date), records in segment.groups().items():
        for part, triples in _split_by_placement(records, labeller):
            labels = labeller.labels_of_group(triples)
            subject = f"{segment.topic}/{part[0].tenant}/{part[0].date}/{part[0].offset}"
            try:
                decision = policy.decide(labels, subject=subject)
            except PlacementError as error:
                planned.refused.append((part, str(error)))
                continue
            data, manifest = build_object(
                segment.topic,
                segment.partition,
                segment.lane.value,
                part,
                labels=decision.labels,
                store=decision.store,
                rule=decision.rule,
                written_at=written_at,
            )
            planned.objects.append((decision.store, data, manifest))
    return planned


def _split_by_placement(
    records: list[ArchivedRecord], labeller: Labeller
) -> list[tuple[list[ArchivedRecord], dict[tuple[str, str, str], None]]]:
    """Records of one group split by sensitivity, each part with its distinct ``(tenant, kind,
    visibility)`` in order; each part keeps offset order and is named by its own first offset
    (deterministic, so a re-flush names them the same)."""
    # records that share what labels depend on share labels: label each such triple once
    triples = dict.fromkeys(map(_LABELLED, records))
    sensitivity_of = {triple: labeller.labels(*triple)["sensitivity"] for triple in triples}
    if len(set(sensitivity_of.values())) == 1:
        return [(records, triples)]
    parts: dict[str, list[ArchivedRecord]] = {}
    for record in records:
        sensitivity = sensitivity_of[(record.tenant, record.kind, record.visibility)]
        parts.setdefault(sensitivity, []).append(record)
    return [
        (part, dict.fromkeys(map(_LABELLED, part)))
        for part in sorted(parts.values(), key=lambda part: part[0].offset)
    ]
