"""The one way records enter the network, shared by the HTTP gateway, the CLI and the connectors.

:func:`validate_records` checks a batch of decoded records against their contracts for one
authenticated tenant; :func:`publish_intake` sends the accepted ones to ``events.raw.v1`` (key:
tenant) and the refused ones to ``events.raw.v1.dlq`` with their original content, in one
batch, and returns only when Kafka acknowledged all of them (``acks=all``).

Every way in also bounds the event time (:func:`schemas.events.event_time_error`): a record
whose ``occurred_at`` lies further ahead of the moment it is validated than
``bounds.max_ahead`` (default 1 h), or before ``bounds.earliest`` (default 2000-01-01), is refused
(``field: "occurred_at"``) and dead-lettered like any refused record.

The tenant always comes from the credentials: a record naming another tenant raises
:class:`ForeignTenant` (the gateway answers 403 for the whole request), a record naming none is
stamped with the caller's.

Speed: :func:`validate_json_lines` first checks a record straight from its JSON bytes with
:func:`schemas.fast.fast_event` (msgspec mirrors of the contracts, ~4 us instead of ~12 us),
and an accepted record goes to Kafka as the bytes the partner sent (the raw topic is what was
sent; clean parses it with the contract). Only a record the mirror does not accept (it is
stricter than the contract, never looser) takes the precise path: decoded with orjson, stamped
with tenant and source where missing, validated against ``model_for(type, version)``, and sent
as the contract serialises it; a refusal says what the contract says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from schemas.events import (
    DEFAULT_EVENT_TIME,
    EVENT_MODELS,
    EventEnvelope,
    EventTimeBounds,
    UnknownEventType,
    decode_exact,
    event_time_error,
    model_for,
)
from schemas.fast import fast_event
from schemas.insights import FieldError
from schemas.topics import EVENTS_RAW, dlq
from shared.deadletter import dead_letter, dead_letter_record, field_errors
from shared.kafka import BatchPublisher, OutRecord, Text

SERVICE = "ingest"
EVENT_TIME_REFUSED = "event time out of bounds"
FAST_PATH_MISSES = 8
"""After this many records of one batch failed the fast path, the rest go the precise way at
once (a client that never sends ``tenant`` would otherwise pay for two validations each)."""


def event_adapter(models: dict[tuple[str, int], type[EventEnvelope]]) -> TypeAdapter[Any]:
    """One validator for every contract: a union discriminated on ``type``, then (when a type
    has several versions) on ``schema_version``; it returns the model of the record's pair."""
    by_type: dict[str, list[type[EventEnvelope]]] = {}
    for (type_name, _), model in sorted(models.items()):
        by_type.setdefault(type_name, []).append(model)
    members: list[Any] = [
        versions[0]
        if len(versions) == 1
        else Annotated[Union[tuple(versions)], Field(discriminator="schema_version")]  # noqa: UP007
        for versions in by_type.values()
    ]
    if len(members) == 1:
        return TypeAdapter(members[0])
    union: Any = Annotated[Union[tuple(members)], Field(discriminator="type")]  # noqa: UP007
    return TypeAdapter(union)


EVENT_ADAPTER = event_adapter(EVENT_MODELS)


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

    accepted: list[Text] = field(default_factory=list)
    """The JSON of each accepted record, as it goes to the raw topic."""
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


@dataclass(frozen=True)
class Received:
    """When and by what a batch was received: the reference of the event-time bounds."""

    at: datetime
    source_system: str
    bounds: EventTimeBounds


def _received(source_system: str, bounds: EventTimeBounds, at: datetime | None) -> Received:
    return Received(at or datetime.now(UTC), source_system, bounds)


def validate_records(
    items: Sequence[Incoming],
    tenant: str,
    *,
    source_system: str = "http",
    bounds: EventTimeBounds = DEFAULT_EVENT_TIME,
    received_at: datetime | None = None,
) -> Intake:
    """Validate every record for ``tenant``, received at ``received_at`` (default: now);
    raises :class:`ForeignTenant` on a foreign tenant."""
    result = Intake()
    received = _received(source_system, bounds, received_at)
    for item in items:
        if item.error is not None or not isinstance(item.data, dict):
            reason = item.error or "a record must be a JSON object"
            result.refused.append(
                Refused(item.index, [FieldError(field="", reason=reason)], item.original, reason)
            )
            continue
        _validate_dict(item.index, item.data, item.original, tenant, received, result)
    return result


def validate_json_lines(
    lines: Sequence[tuple[int, Text]],
    tenant: str,
    *,
    source_system: str = "http",
    bounds: EventTimeBounds = DEFAULT_EVENT_TIME,
    received_at: datetime | None = None,
) -> Intake:
    """Validate records given as ``(index, JSON bytes)`` (NDJSON lines) for ``tenant``.

    Each is validated straight from its bytes; one that fails is decoded and takes the precise
    path of :func:`validate_records`, so refusals and :class:`ForeignTenant` are the same. A
    refused record keeps its line as ``original``.
    """
    result = Intake()
    accepted = result.accepted
    received = _received(source_system, bounds, received_at)
    misses = 0
    for index, line in lines:
        if misses < FAST_PATH_MISSES:
            fast = fast_event(line, tenant)
            if fast is not None and event_time_error(fast.occurred_at, received.at, bounds) is None:
                accepted.append(line)
                continue
            misses += 1
        original = bytes(line)  # a refusal keeps it; the body it may be a view into goes
        try:
            data = decode_exact(original)  # money exactly as sent, never through a float
        except ValueError as error:
            reason = f"invalid JSON: {error}"
            result.refused.append(
                Refused(index, [FieldError(field="", reason=reason)], original, reason)
            )
            continue
        if not isinstance(data, dict):
            reason = "a record must be a JSON object"
            result.refused.append(
                Refused(index, [FieldError(field="", reason=reason)], original, reason)
            )
            continue
        _validate_dict(index, data, original, tenant, received, result)
    return result


def _validate_dict(
    index: int,
    data: dict[str, Any],
    original: bytes | str,
    tenant: str,
    received: Received,
    result: Intake,
) -> None:
    """The precise path for one decoded record: stamp, validate, bound its time, refuse with
    reasons."""
    claimed = data.get("tenant")
    if claimed is None:
        data = {**data, "tenant": tenant}
    elif claimed != tenant:
        raise ForeignTenant(index, claimed, tenant)
    if "source" not in data:
        data = {**data, "source": {"system": received.source_system}}
    try:
        event = EVENT_ADAPTER.validate_python(data)
    except ValidationError:
        pass  # the union's errors name the union's tags: ask the pair's model for the reasons
    else:
        _accept_in_time(index, event, original, received, result)
        return
    try:
        event = model_for(data.get("type"), data.get("schema_version")).model_validate(data)
    except UnknownEventType as error:
        result.refused.append(
            Refused(
                index, [FieldError(field="type", reason=str(error))], original, "unknown event type"
            )
        )
    except ValidationError as error:
        result.refused.append(Refused(index, field_errors(error), original))
    else:
        _accept_in_time(index, event, original, received, result)


def _accept_in_time(
    index: int, event: EventEnvelope, original: bytes | str, received: Received, result: Intake
) -> None:
    problem = event_time_error(event.occurred_at, received.at, received.bounds)
    if problem is None:
        result.accepted.append(_json_of(event))
    else:
        error = FieldError(field="occurred_at", reason=problem)
        result.refused.append(Refused(index, [error], original, EVENT_TIME_REFUSED))


def _json_of(event: EventEnvelope) -> bytes:
    # Each model serialises itself in Rust: no dict, no second pass.
    return type(event).__pydantic_serializer__.to_json(event)


async def publish_intake(
    publisher: BatchPublisher, intake: Intake, tenant: str, *, source_ref: str
) -> None:
    """Accepted -> raw topic, refused -> its dead-letter topic; all acknowledged on return."""
    key = tenant.encode()
    accepted = [OutRecord(key, value) for value in intake.accepted]
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
