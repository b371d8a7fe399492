"""The redaction suite: planted personal data is always found, look-alikes are left alone."""

from __future__ import annotations

import random

from services.nlp.redact import (
    card_valid,
    find_matches,
    redact,
    resident_id_valid,
    uscc_valid,
)
from shared.pseudonyms import owner_key, pseudonym
from tests.nlp.documents import document, order_number

KEY = b"k" * 32


def test_checksums() -> None:
    assert resident_id_valid("11010519491231002X")
    assert not resident_id_valid("110105194912310021")  # wrong check character
    assert not resident_id_valid("110105194913310020")  # month 13
    assert card_valid("6222021234567894") is card_valid("6222021234567894")
    assert card_valid("4111111111111111")
    assert not card_valid("4111111111111112")  # Luhn
    assert not card_valid("9111111111111111")  # no issuer starts with 9
    assert uscc_valid("91350100M000100Y43")
    assert not uscc_valid("91350100M000100Y44")


def test_every_form_of_one_mobile_number_gives_one_pseudonym() -> None:
    forms = [
        "13812345678",
        "138 1234 5678",
        "138-1234-5678",
        "+86 13812345678",
        "+86-138-1234-5678",
        "0086 13812345678",
        "+8613812345678",
    ]
    tokens = {redact(f"电话{form}谢谢", KEY).entities for form in forms}
    assert tokens == {(pseudonym(KEY, "PHONE", "13812345678"),)}


def test_same_value_same_pseudonym_per_owner_and_different_across_owners() -> None:
    a, b = owner_key(b"secret", "acme"), owner_key(b"secret", "globex")
    text = "call 13812345678"
    assert redact(text, a).entities == redact("电话 138-1234-5678", a).entities
    assert redact(text, a).entities != redact(text, b).entities


def test_two_numbers_in_a_row_are_two_matches() -> None:
    found = find_matches("Tel: 13812345678 13987654321")
    assert [m.kind for m in found] == ["PHONE", "PHONE"]


def test_planted_personal_data_is_never_missed() -> None:
    rng = random.Random(20261201)
    misses = []
    for _ in range(2000):
        doc = document(rng)
        out = redact(doc.text, KEY)
        for kind, value, written in doc.values:
            if written in out.text or value in out.text or written in out.bare:
                misses.append((kind, written, doc.text))
            if pseudonym(KEY, kind, value) not in out.entities:
                misses.append((kind, value, out.entities))
    assert misses == []


def test_order_tracking_and_isbn_numbers_are_not_redacted() -> None:
    rng = random.Random(7)
    texts = [order_number(rng) for _ in range(3000)]
    redacted = [t for t in texts if find_matches(t)]
    assert len(redacted) <= 0.01 * len(texts), redacted[:10]


def test_a_wrong_check_digit_is_not_an_id() -> None:
    assert find_matches("编号110105194912310021") == []
