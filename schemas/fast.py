"""Fast mirrors of the event contracts, for the gateway's hot path.

The pydantic models of :mod:`schemas.events` are the contracts: they make the JSON Schema, say
exactly why a record is refused, and are what every service validates against. Validating a
~370-byte event with them costs ~12 us on our 2-core machines; the same check with msgspec costs
~2.5 us. :func:`fast_event` runs that check on a record's JSON bytes, with msgspec ``Struct``
types generated here from the pydantic models (never written by hand, so they cannot drift).

A mirror is at most as permissive as its contract: whatever :func:`fast_event` accepts, the
contract accepts too (a test checks this on mutated records of every type). It refuses more:

- integers past 64 bits and numbers past the float range (orjson, which the contract path
  decodes with, does not read them as the contract expects);
- pydantic's lax conversions where a contract allows them (a Unix time for a date-time, a UUID
  in braces; numbers are strict in the contracts too: no ``"1.5"`` or ``true`` for a number, no
  ``1.0`` for an integer) and values with whitespace around them (the contracts strip it);
- a string value that starts with whitespace: the contracts strip it before ``min_length``
  (``"  "`` is refused), msgspec does not. A byte pattern (:data:`NEEDS_CONTRACT`, ~0.7 us)
  sends such records to the contract instead;
- every version but the latest of an event type (a msgspec tagged union has one struct per tag);
- a money value (:data:`schemas.events.Money`) written as a string with JSON escapes.

Money fields are decoded as their raw JSON text (``msgspec.Raw``) and read exactly by the
contract's own :func:`schemas.events.money_from_json` in the struct's ``__post_init__``: a
number from its digits, a string by the contract's pattern, the same bounds; the mirror's field
then holds a ``Decimal`` (or None). msgspec's own ``Decimal`` type cannot serve: it reads
``"1_000"``, ``" 1"`` or ``"nan"`` from a string and takes no bounds.

A record :func:`fast_event` refuses is simply checked by its pydantic contract, which accepts it
or says why not; the mirrors never produce a refusal of their own.
"""

from __future__ import annotations

import re
import sys
import types
import typing
from datetime import date, datetime
from functools import cache
from typing import Annotated, Any, Literal, Union
from uuid import UUID

import annotated_types
import msgspec
from pydantic import AwareDatetime, BaseModel, BeforeValidator, Strict
from pydantic.fields import FieldInfo

from schemas.events import EVENT_MODELS, TENANT_PATTERN, EventEnvelope, is_money, money_from_json

NEEDS_CONTRACT = re.compile(
    rb':\s*"(?:'
    rb"[\t\n\x0b\x0c\r\x1c-\x1f ]"  # ASCII whitespace str.strip removes
    rb"|\xc2[\x85\xa0]|\xe1\x9a\x80|\xe2\x80[\x80-\x8a\xa8\xa9\xaf]|\xe2\x81\x9f|\xe3\x80\x80"
    rb"|\\[tnrfb]"  # ... and the same as JSON escapes
    rb"|\\u(?:00(?:0[9a-dA-D]|1[c-fC-F]|20|85|[aA]0)|1680|200[0-9aA]|202[89fF]|205[fF]|3000))"
)
"""A string value that starts with whitespace: left to the contract, which strips it first."""

_FLOAT_MAX = sys.float_info.max
_BOUNDS: dict[type, tuple[float, float]] = {
    # orjson, which the contract path and the clean service decode with, reads an integer past
    # 64 bits as a float (or not at all) and refuses an infinite number: keep both out.
    int: (-(2**63), 2**63 - 1),
    float: (-_FLOAT_MAX, _FLOAT_MAX),
}


_BOUND_NAMES: dict[type, str] = {
    annotated_types.MinLen: "min_length",
    annotated_types.MaxLen: "max_length",
    annotated_types.Ge: "ge",
    annotated_types.Gt: "gt",
    annotated_types.Le: "le",
    annotated_types.Lt: "lt",
}


def _constraints(metadata: list[Any]) -> dict[str, Any]:
    """msgspec ``Meta`` arguments of a pydantic field's constraints."""
    meta: dict[str, Any] = {}
    for item in metadata:
        bound = _BOUND_NAMES.get(type(item))
        if bound is not None:
            meta[bound] = getattr(item, bound)  # msgspec's Meta names them as annotated_types
        elif type(item).__name__ == "AllowInfNan":
            pass  # every float mirror is finite (see _BOUNDS)
        elif isinstance(item, BeforeValidator):
            pass  # Quantity's: a Decimal (exactly read number) to float; msgspec reads a float
        elif isinstance(item, Strict):
            pass  # msgspec is strict anyway: no "10" or true for a number, no 1.0 for an integer
        elif getattr(item, "pattern", None) is not None:
            meta["pattern"] = item.pattern
        elif isinstance(item, FieldInfo):
            meta.update(_constraints(item.metadata))
        else:
            raise TypeError(f"no fast mirror for the constraint {item!r}")
    return meta


def _mirror(annotation: Any, metadata: list[Any]) -> Any:
    """The msgspec type of a pydantic field's annotation and constraints."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extras = typing.get_args(annotation)
        return _mirror(base, [*metadata, *extras])
    if origin in (Union, types.UnionType):
        members = [_mirror(arg, metadata) for arg in typing.get_args(annotation)]
        return Union[tuple(members)]  # noqa: UP007 - a runtime union of runtime types
    if origin is Literal:
        return annotation
    if annotation is type(None):
        return annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return _struct(annotation)
    if annotation is AwareDatetime:
        return Annotated[datetime, msgspec.Meta(tz=True)]
    if annotation in (str, int, float, bool, UUID, date, datetime):
        meta = _constraints(metadata)
        if annotation in _BOUNDS:
            low, high = _BOUNDS[annotation]
            meta["ge"] = max(meta.get("ge", low), low)
            meta["le"] = min(meta.get("le", high), high)
        return Annotated[annotation, msgspec.Meta(**meta)] if meta else annotation
    raise TypeError(f"no fast mirror for the type {annotation!r}")


def _fields(
    model: type[BaseModel], skip: tuple[str, ...] = (), kinds: dict[str, Any] | None = None
) -> list[tuple[Any, ...]]:
    """``msgspec.defstruct`` fields of a model, required ones first (as Python needs);
    ``kinds`` replaces the mirror of the fields it names; money fields are raw JSON text."""
    required, optional = [], []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        kind = (kinds or {}).get(name)
        if kind is None:
            kind = msgspec.Raw if is_money(info) else _mirror(info.annotation, list(info.metadata))
        if info.is_required():
            required.append((name, kind))
        elif info.default_factory is not None:
            factory = info.default_factory
            optional.append((name, kind, msgspec.field(default_factory=factory)))  # type: ignore[arg-type]
        else:
            optional.append((name, kind, info.default))
    return [*required, *optional]


def _money_reader(model: type[BaseModel]) -> dict[str, Any]:
    """A ``__post_init__`` that reads the model's money fields exactly, or no namespace."""
    fields = [
        (name, info.is_required()) for name, info in model.model_fields.items() if is_money(info)
    ]
    if not fields:
        return {}

    def read_money(self: Any) -> None:
        for name, required in fields:
            raw = getattr(self, name)
            if raw is not None:
                value = money_from_json(bytes(raw))  # ValueError: msgspec refuses the record
                if value is None and required:
                    raise ValueError(f"{name} is required")
                setattr(self, name, value)

    return {"__post_init__": read_money}


@cache
def _struct(model: type[BaseModel]) -> type[msgspec.Struct]:
    return msgspec.defstruct(
        f"Fast{model.__name__}",
        _fields(model),
        forbid_unknown_fields=True,
        gc=False,
        namespace=_money_reader(model),
    )


def _event_struct(type_name: str, model: type[EventEnvelope]) -> type[msgspec.Struct]:
    """An event's mirror, tagged by ``type`` (the field msgspec picks the struct by).

    ``tenant`` is a plain string: :func:`fast_event` compares it with the caller's tenant, which
    meets the tenant pattern (tenants are registered through their contract), so a second
    pattern match would only cost time."""
    return msgspec.defstruct(
        f"Fast{model.__name__}",
        _fields(model, skip=("type",), kinds={"tenant": str}),
        tag_field="type",
        tag=type_name,
        forbid_unknown_fields=True,
        gc=False,
    )


def _latest_models() -> dict[str, type[EventEnvelope]]:
    latest: dict[str, tuple[int, type[EventEnvelope]]] = {}
    for (type_name, version), model in EVENT_MODELS.items():
        if type_name not in latest or version > latest[type_name][0]:
            latest[type_name] = (version, model)
    return {type_name: model for type_name, (_, model) in latest.items()}


FAST_EVENTS: dict[str, type[msgspec.Struct]] = {
    type_name: _event_struct(type_name, model) for type_name, model in _latest_models().items()
}
"""Event type -> the mirror of its latest version."""

_DECODER: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
    Union[tuple(FAST_EVENTS.values())]  # noqa: UP007
    if len(FAST_EVENTS) > 1
    else next(iter(FAST_EVENTS.values()))
)
_decode = _DECODER.decode


def fast_event(line: bytes | memoryview, tenant: str) -> Any | None:
    """The record's mirror if its JSON certainly meets its contract and names ``tenant`` (a
    registered tenant id); else None: ask the contract.

    The result has the contract's attribute names (``event_id``, ``source.system`` ...).
    """
    if NEEDS_CONTRACT.search(line) is not None:
        return None
    try:
        event = _decode(line)
    except (ValueError, RecursionError):  # msgspec's DecodeError, invalid UTF-8 in a string
        return None
    return event if event.tenant == tenant else None


_TENANT = re.compile(TENANT_PATTERN)
EVENT_TYPE_OF: dict[type[msgspec.Struct], str] = {
    struct: type_name for type_name, struct in FAST_EVENTS.items()
}
"""Mirror struct -> its event type (the tag, which is no attribute of the struct)."""


def fast_any_event(line: bytes | memoryview) -> Any | None:
    """The record's mirror if its JSON certainly meets its contract, whatever its tenant (the
    tenant pattern checked); else None: ask the contract. For readers of the raw topic."""
    if NEEDS_CONTRACT.search(line) is not None:
        return None
    try:
        event = _decode(line)
    except (ValueError, RecursionError):
        return None
    return event if _TENANT.fullmatch(event.tenant) is not None else None
