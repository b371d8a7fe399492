"""The one way records enter the network, shared by the HTTP gateway, the CLI and the connectors.

:func:`validate_records` checks a batch of decoded records against their contracts for one
authenticated tenant; :func:`publish_intake` sends the accepted ones to ``events.raw.v1`` (key:
tenant) and the refused ones to ``events.raw.v1.dlq`` with their original content, in one
batch, and returns only when Kafka acknowledged all of them (``acks=all``).

The tenant always comes from the credentials: a record naming another tenant raises
:class:`ForeignTenant` (the gateway answers 403 for the whole request), a record naming none is
stamped with the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from schemas.events import EventEnvelope, UnknownEventType, model_for
from schemas.insights import FieldError
from schemas.topics import EVENTS_RAW, dlq
from shared.codec import encode
from shared.deadletter import dead_letter, dead_letter_record, field_errors
from shared.kafka import BatchPublisher, OutRecord

SERVICE = "ingest"


class ForeignTenant(PermissionError):
    """A record claims a tenant other than the one the credentials belong to."""

    def __init__(self, index: int, claimed: object, tenant: str) -> None:
        super().__init__(
            f"record {index} is for tenant {claimed!r}, but the key belongs to {tenant!r}"
        )
        self.index = index


@dataclass(frozen=True)
class Refused:
    """A record that was not accepted: its position in the input and why."""

    index: int
    errors: list[FieldError]
    original: bytes | str
    reason: str = "invalid event"


@dataclass
class Intake:
    """The outcome of validating one batch."""

    accepted: list[EventEnvelope] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


@dataclass(frozen=True)
class Incoming:
    """One record as received: its index, its original text and what it decoded to.

    ``data`` is None when the record could not be decoded; ``error`` then says why.
    """

    index: int
    original: bytes | str
    data: Any
    error: str | None = None


def validate_records(
    items: Sequence[Incoming], tenant: str, *, source_system: str = "http"
) -> Intake:
    """Validate every record for ``tenant``; raises :class:`ForeignTenant` on a foreign tenant."""
    result = Intake()
    for item in items:
        if item.error is not None or not isinstance(item.data, dict):
            reason = item.error or "a record must be a JSON object"
            result.refused.append(
                Refused(item.index, [FieldError(field="", reason=reason)], item.original, reason)
            )
            continue
        data = item.data
        claimed = data.get("tenant")
        if claimed is None:
            data = {**data, "tenant": tenant}
        elif claimed != tenant:
            raise ForeignTenant(item.index, claimed, tenant)
        if "source" not in data:
            data = {**data, "source": {"system": source_system}}
        try:
            result.accepted.append(
                model_for(data.get("type"), data.get("schema_version")).model_validate(data)
            )
        except UnknownEventType as error:
            result.refused.append(
                Refused(
                    item.index,
                    [FieldError(field="type", reason=str(error))],
                    item.original,
                    "unknown event type",
                )
            )
        except ValidationError as error:
            result.refused.append(Refused(item.index, field_errors(error), item.original))
    return result


async def publish_intake(
    publisher: BatchPublisher, intake: Intake, tenant: str, *, source_ref: str
) -> None:
    """Accepted -> raw topic, refused -> its dead-letter topic; all acknowledged on return."""
    key = tenant.encode()
    accepted = [OutRecord(key, encode(event)) for event in intake.accepted]
    letters = [
        dead_letter_record(
            dead_letter(
                refused.original,
                refused.reason,
                errors=refused.errors,
                service=SERVICE,
                tenant=tenant,
                source_ref=f"{source_ref}#{refused.index}",
            )
        )
        for refused in intake.refused
    ]
    await publisher.publish_many({EVENTS_RAW: accepted, dlq(EVENTS_RAW): letters})
