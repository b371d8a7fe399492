"""The msgspec mirrors of the contracts (schemas.fast) are never looser than the contracts.

Every field of a valid event of every type is replaced, one at a time, by values the contracts
and msgspec could disagree on (whitespace, lax numbers, infinities, naive times, wrong types ...),
or removed, or joined by an unknown field. Whatever the mirror accepts, the contract must accept
too; and the mirror must accept the valid events themselves, or the fast path is not one.
"""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from deploy.local.simulate import firm_events, make_firms
from schemas.events import PAYLOADS, decode_exact, money_fields, validate_event
from schemas.fast import FAST_EVENTS, NEEDS_CONTRACT, fast_any_event, fast_event

TENANT = "acme"

HAND_MADE = {
    "purchase_order": {
        "po_id": "PO-1",
        "line_no": 2,
        "supplier_id": "S-9",
        "product_sku": "BOLT-M8",
        "quantity": 100,
        "unit": "pcs",
        "unit_price": 0.5,
        "currency": "CNY",
        "promised_date": "2026-12-01",
    },
    "supplier_delivery": {
        "po_id": "PO-1",
        "supplier_id": "S-9",
        "product_sku": "BOLT-M8",
        "delivered_quantity": 90,
        "unit": "pcs",
        "rejected_quantity": 2.5,
        "promised_date": "2026-12-01",
        "delivered_date": "2026-12-03",
    },
}

# Values the two validators might read differently; JSON text, so infinities can be written.
SUSPECTS = [
    "null",
    '""',
    '"  "',
    '" x"',
    '"x "',
    '"\\u3000"',
    '"\\t"',
    '"\\u00a0x"',
    '"\\u3000\\u3000"',
    '"\\ud800"',
    '"\\ud83d\\ude00"',
    '"中"',
    "0",
    "-1",
    "-0.0",
    "1",
    "1.0",
    "1.5",
    '"1"',
    '"10"',
    '"1.5"',
    '"0.10"',
    '"01"',
    '"-1"',
    '"1e5"',
    '"1_000"',
    '"nan"',
    '" 1"',
    '"1."',
    '"0.1234567890123456789"',
    "0.1234567890123456789",
    "0.1234567890123456789000",
    "12345678901234567890.12",
    "123456789012345678901",
    "100000000000000000000",
    "1e-19",
    "1e999",
    "-1e999",
    "1e308",
    "9223372036854775808",
    "true",
    "[]",
    "{}",
    '"ABC"',
    '"abc"',
    '"ABC "',
    '"2026-11-01"',
    '"2026-11-01T08:00:00"',
    '"2026-11-01T08:00:00Z"',
    '"2026-11-01T08:00:00+08:00"',
    '"2026-11-01 08:00:00+08:00"',
    '"2026-11-01T08:00:00.1234567Z"',
    '"2026-11-01t08:00:00z"',
    '"2026-13-01T08:00:00Z"',
    "1700000000",
    '"20261101"',
    '"00000000-0000-0000-0000-000000000000"',
    '"{12345678-1234-5678-1234-567812345678}"',
    '"12345678123456781234567812345678"',
    '"urn:uuid:12345678-1234-5678-1234-567812345678"',
    '"create"',
    '"delete"',
    '"zh"',
    '"news"',
    '"sales_order_line"',
    '"workforce"',
    '"2026-11-01T23:59:60Z"',
    '"2026-11-01T08:00:00+24:00"',
    '"2026-11-01T08:00:00-00:00"',
    '"2026-11-01T08:00Z"',
    '"2026-02-30"',
    '"2026-02-30T08:00:00Z"',
    '"+2026-11-01"',
    '"2026-11-01T08:00:00.Z"',
    '"2026-11-01T08:00:00+0800"',
    '"2026-W44-7"',
    '"12345678-1234-5678-1234-56781234567"',
    '"ABCDEF12-1234-5678-1234-567812345678"',
    "1E2",
    "-0",
    "0.0e0",
    "1e-400",
    "false",
    '"\\u0000"',
    '"a\\u0000"',
    '"CNY\\n"',
    '"cny"',
    '"US$"',
    "18446744073709551616",
    "-9223372036854775809",
    "1" + "0" * 400,
    "1" + "0" * 400 + ".5",
]

INVALID_UTF8 = [b'"\xffx"', b'"x\xed\xa0\x80"', b'"\xc0\xaf"', b'"\xe4\xb8"']
"""String values msgspec refuses with UnicodeDecodeError (not its own DecodeError)."""


def valid_events() -> list[dict[str, Any]]:
    """One event of every type, each with every optional field it has in the simulator."""
    seen: dict[str, dict[str, Any]] = {}
    for firm in make_firms(6):
        for event in itertools.islice(firm_events(firm), 300):
            seen.setdefault(event["type"], event)
    template = next(iter(seen.values()))
    for type_name, payload in HAND_MADE.items():
        seen[type_name] = {**template, "type": type_name, "payload": payload}
    events = [
        {**event, "tenant": TENANT, "event_id": str(uuid.uuid4()), "corrects": None}
        for event in seen.values()
    ]
    assert {event["type"] for event in events} == {name for name, _ in PAYLOADS}
    return events


def paths(value: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*prefix, key)
            yield from paths(child, (*prefix, key))


MARK = "\x00suspect\x00"


def with_value(event: dict[str, Any], path: tuple[str, ...], text: str | bytes | None) -> bytes:
    """The event's JSON with the value at ``path`` replaced by the JSON ``text`` (or removed)."""
    copy = json.loads(json.dumps(event))
    target = copy
    for key in path[:-1]:
        target = target[key]
    if text is None:
        del target[path[-1]]
        return orjson.dumps(copy)
    target[path[-1]] = MARK
    return orjson.dumps(copy).replace(
        orjson.dumps(MARK), text if isinstance(text, bytes) else text.encode()
    )


def contract_accepts(line: bytes) -> bool:
    """As every service reads a record for its contract: numbers exactly (``decode_exact``)."""
    try:
        event = validate_event(decode_exact(line))
    except (ValidationError, ValueError, LookupError):
        return False
    return event.tenant == TENANT


def mutations() -> Iterator[tuple[str, bytes]]:
    for event in valid_events():
        for path in paths(event):
            name = f"{event['type']}:{'.'.join(path)}"
            yield f"{name} removed", with_value(event, path, None)
            for text in SUSPECTS:
                yield f"{name}={text}", with_value(event, path, text)
            for raw in INVALID_UTF8:
                yield f"{name}={raw!r}", with_value(event, path, raw)
        yield f"{event['type']} extra field", orjson.dumps({**event, "extra": 1})
        yield (
            f"{event['type']} extra payload field",
            orjson.dumps({**event, "payload": {**event["payload"], "extra": 1}}),
        )
        yield f"{event['type']} spaced", json.dumps(event, ensure_ascii=False).encode()
        line = orjson.dumps(event)
        for name in ("type", "tenant", "schema_version", "event_id"):  # JSON keeps the last
            for other in ('"workforce"', '"rival"', "2", '"x"', "null"):
                yield (
                    f"{event['type']} {name} twice={other}",
                    (line[:-1] + b',"' + name.encode() + b'":' + other.encode() + b"}"),
                )
                yield (
                    f"{event['type']} {name} first={other}",
                    (b'{"' + name.encode() + b'":' + other.encode() + b"," + line[1:]),
                )
        yield f"{event['type']} ascii", json.dumps(event).encode()


def test_the_mirror_accepts_every_valid_event_as_sent() -> None:
    for event in valid_events():
        for line in (orjson.dumps(event), json.dumps(event, separators=(",", ":")).encode()):
            assert fast_event(line, TENANT) is not None, line


def test_whatever_the_mirror_accepts_the_contract_accepts() -> None:
    looser = []
    checked = accepted = 0
    for name, line in mutations():
        checked += 1
        if fast_event(line, TENANT) is not None:
            accepted += 1
            if not contract_accepts(line):
                looser.append(name)
    assert not looser, f"the mirror accepts what the contract refuses: {looser[:20]}"
    assert checked > 2000 and accepted > 300  # the corpus exercises both outcomes


def test_the_mirror_refuses_another_tenant_even_when_valid() -> None:
    event = valid_events()[0]
    assert fast_event(orjson.dumps(event), "rival") is None


@pytest.mark.parametrize(
    "text",
    [': " x"', ':"\\u3000"', ': "\\t"', ':"\\u00A0"', ':"\\n"', ':"\u2003"'],
)
def test_a_value_starting_with_whitespace_goes_to_the_contract(text: str) -> None:
    assert NEEDS_CONTRACT.search(text.encode()) is not None


def test_every_event_type_has_a_mirror() -> None:
    assert set(FAST_EVENTS) == {name for name, _ in PAYLOADS}


MONEY_FIELDS = frozenset(name for model in PAYLOADS.values() for name in money_fields(model))

INTEGER_FIELDS = frozenset(
    name
    for model in PAYLOADS.values()
    for name, info in model.model_fields.items()
    if info.annotation is int
)


def numeric_paths(event: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """Paths of the event's number and integer values (booleans are not numbers)."""
    for path in paths(event):
        value: Any = event
        for key in path:
            value = value[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path


def test_numbers_are_strict_in_the_contract_and_its_mirror() -> None:
    """The JSON Schema says number (or integer): "10", true and false are none, on either path;
    a whole number is a number, 7.0 is not an integer."""
    checked = 0
    for event in valid_events():
        for path in numeric_paths(event):
            if path[-1] in MONEY_FIELDS:
                continue  # a decimal string is money: test_money_is_a_number_or_..._string
            for text in ('"10"', '"1.5"', "true", "false", "[]"):
                line = with_value(event, path, text)
                assert not contract_accepts(line), (event["type"], path, text)
                assert fast_event(line, TENANT) is None, (event["type"], path, text)
                checked += 1
            if path[-1] == "schema_version":
                continue
            whole = with_value(event, path, "7")
            assert contract_accepts(whole) and fast_event(whole, TENANT) is not None, path
            if path[-1] in INTEGER_FIELDS:
                assert not contract_accepts(with_value(event, path, "7.0")), path
    assert checked > 80


def money_paths(event: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    return (("payload", name) for name in event["payload"] if name in MONEY_FIELDS)


def test_money_is_a_number_or_a_decimal_string_read_exactly() -> None:
    """The same answer on both paths, and the value is the decimal the text says."""
    checked = 0
    for event in valid_events():
        for path in money_paths(event):
            for text, expected in (
                ("0.1", "0.1"),
                ('"0.10"', "0.10"),
                ("12345678901234567890.123456789", "12345678901234567890.123456789"),
                ('"99999999999999999999.999999999999999999"', None),
                ("1e2", "1E+2"),
            ):
                line = with_value(event, path, text)
                expected = expected or text.strip('"')
                fast = fast_any_event(line)
                assert fast is not None, (path, text)
                assert getattr(fast.payload, path[-1]) == Decimal(expected)
                assert str(getattr(fast.payload, path[-1])) == str(Decimal(expected))
                contract = validate_event(decode_exact(line))
                assert getattr(contract.payload, path[-1]) == Decimal(expected)
                checked += 1
            for text in ('"1e5"', '"1_000"', '" 1"', '"-1"', '"nan"', "-1", "1e20", '"0.1\\n"'):
                line = with_value(event, path, text)
                assert not contract_accepts(line), (path, text)
                assert fast_event(line, TENANT) is None, (path, text)
    assert checked >= 20


def test_the_tenant_pattern_is_checked_without_a_caller() -> None:
    event = valid_events()[0]
    assert fast_any_event(orjson.dumps(event)) is not None
    assert fast_any_event(orjson.dumps({**event, "tenant": "Acme"})) is None
    assert fast_any_event(orjson.dumps({**event, "tenant": "acme\n"})) is None
