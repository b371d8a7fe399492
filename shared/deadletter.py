"""Dead letters: a refused record with its original bytes, the reason and where it came from.

Per-record problems never stop a service and never vanish: the record goes to ``<topic>.dlq``
(see :func:`schemas.topics.dlq`) and processing continues.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal, Protocol

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from schemas.events import EventEnvelope, UnknownEventType, validate_event
from schemas.insights import DeadLetter, FieldError
from shared.codec import DecodeError, decode, encode
from shared.kafka import OutRecord


def field_errors(error: ValidationError) -> list[FieldError]:
    """Pydantic errors as ``(dotted field, reason)`` pairs a partner can act on."""
    return [
        FieldError(field=".".join(str(part) for part in item["loc"]), reason=item["msg"])
        for item in error.errors(include_url=False, include_input=False)
    ]


def dead_letter(
    original: bytes | str,
    reason: str,
    *,
    service: str,
    errors: Sequence[FieldError] = (),
    tenant: str | None = None,
    source_topic: str | None = None,
    source_partition: int | None = None,
    source_offset: int | None = None,
    source_ref: str | None = None,
) -> DeadLetter:
    """Build the dead-letter record; binary input is kept as base64, text as it was."""
    encoding: Literal["utf-8", "base64"] = "utf-8"
    if isinstance(original, str):
        text = original
    else:
        try:
            text = original.decode("utf-8")
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(original).decode("ascii"), "base64"
    return DeadLetter(
        original=text,
        original_encoding=encoding,
        reason=reason,
        errors=list(errors),
        tenant=tenant,
        source_topic=source_topic,
        source_partition=source_partition,
        source_offset=source_offset,
        source_ref=source_ref,
        service=service,
        failed_at=datetime.now(UTC),
    )


def dead_letter_record(letter: DeadLetter) -> OutRecord:
    """The Kafka record of a dead letter: keyed by tenant, reason also in a header."""
    return OutRecord(
        key=letter.tenant.encode() if letter.tenant else None,
        value=encode(letter),
        headers=(
            ("xietong-reason", letter.reason[:200].encode()),
            ("xietong-service", letter.service.encode()),
        ),
    )


def split_valid_events(
    records: Sequence[ConsumerRecord[bytes, bytes]], *, service: str
) -> tuple[list[tuple[ConsumerRecord[bytes, bytes], EventEnvelope]], list[DeadLetter]]:
    """Decode and validate consumed records: the "ok" stream and the dead-letter stream."""
    good: list[tuple[ConsumerRecord[bytes, bytes], EventEnvelope]] = []
    bad: list[DeadLetter] = []
    for record in records:
        try:
            data = decode(record.value or b"")
            if not isinstance(data, dict):
                raise TypeError("an event must be a JSON object")
            good.append((record, validate_event(data)))
        except ValidationError as error:
            bad.append(
                record_dead_letter(
                    record, "invalid event", service=service, errors=field_errors(error)
                )
            )
        except (DecodeError, TypeError, UnknownEventType) as error:
            bad.append(record_dead_letter(record, str(error), service=service))
    return good, bad


class ConsumedRecord(Protocol):
    """What a dead letter needs of a consumed Kafka record (aiokafka's ConsumerRecord has it)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def timestamp(self) -> int: ...


def record_dead_letter(
    record: ConsumedRecord,
    reason: str,
    *,
    service: str,
    errors: Sequence[FieldError] = (),
    tenant: str | None = None,
) -> DeadLetter:
    """The dead letter of a consumed record: its bytes and coordinates; tenant from its key."""
    if tenant is None and record.key:
        tenant = record.key.decode("utf-8", "replace")
    return dead_letter(
        record.value or b"",
        reason,
        errors=errors,
        service=service,
        tenant=tenant,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
    )
