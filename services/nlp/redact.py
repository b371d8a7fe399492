"""Finding personal data in text and replacing it with keyed pseudonyms (pure functions).

What is found, and what decides (checksums and context, not bare patterns):

- ``PHONE`` — mainland mobile numbers ``1[3-9]`` + 9 digits, with or without ``+86`` / ``0086``,
  spaces or hyphens between the groups (``138 1234 5678``, ``+86-138-1234-5678``); the value is
  the 11 digits, so every way of writing one number gives one pseudonym.
- ``ID`` — resident identity numbers: 18 characters, area code, a real birth date
  (1900-2099), the ISO 7064 mod 11-2 check character (``X`` for 10).
- ``CARD`` — bank card numbers: 13-19 digits, a known issuer prefix (UnionPay 62, Visa 4,
  Mastercard 51-55 / 2221-2720, American Express 34/37, JCB 35, Discover 6011/65), Luhn valid.
- ``USCC`` — unified social credit codes: 18 characters of the code's alphabet with the
  GB 32100-2015 mod-31 check character.
- ``EMAIL`` and ``INTL_PHONE`` (``+<country code>`` and 7-15 digits; ``+86`` mobiles are PHONE).
- ``NAME`` — found by the tokeniser, not here (:mod:`services.nlp.tokens`): jieba's person-name
  part-of-speech tags for Chinese, a deny-list of given names and titles for English;
  :func:`redact_names_en` applies the same rule to whole text for the card's examples.

Context: a digit run written right after an order, waybill, tracking, invoice or ISBN label
(``订单号：``, ``order no.``, ``运单号``, ``ISBN``) is that number, not personal data, and a run
glued to letters (``SF1234567890123``, ``PO20231234567``) is a reference, not a phone. A run
of several numbers separated by spaces is split and each part judged, so two phone numbers in a
row are two matches, not one unrecognised run.

Each match is replaced by its pseudonym (:func:`shared.pseudonyms.pseudonym`) under the key of
the document's owner; nothing here keeps the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from shared.pseudonyms import pseudonym

KINDS = ("PHONE", "INTL_PHONE", "ID", "CARD", "USCC", "EMAIL", "NAME")

_DIGIT_RUN = re.compile(r"(?<![0-9A-Za-z])\d(?:[ \-\u00a0]?\d){9,}(?:[Xx](?![0-9A-Za-z]))?")
_USCC_RUN = re.compile(
    r"(?<![0-9A-Za-z])[0-9A-HJ-NP-RTUWXY]{2}\d{6}[0-9A-HJ-NP-RTUWXY]{10}(?![0-9A-Za-z])"
)
_INTL = re.compile(
    r"(?<![0-9A-Za-z+])(?:\+|00)([1-9]\d{0,2})[ \-\u00a0]?(?:\(0?\d{1,4}\)[ \-\u00a0]?)?"
    r"\d{1,5}(?:[ \-\u00a0]?\d{1,5}){0,4}(?![0-9])"
)
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_NOT_DIGIT = re.compile(r"\D")
_SEPARATORS = re.compile(r"[ \-\u00a0]")
_PARTS = re.compile(r"\d+[Xx]?")
_ORDER_CONTEXT = re.compile(
    r"(?:订单|单号|编号|货号|运单|快递|物流|发票|批次|合同|工单|ISBN|ISSN|order|tracking|waybill|"
    r"invoice|shipment|parcel|batch|lot|ref|reference|PO|SKU|serial)"
    r"[\s\w.#:：()（）-]{0,8}$",
    re.IGNORECASE,
)
_CONTEXT_CHARS = 16

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
_USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_USCC_VALUE = {c: i for i, c in enumerate(_USCC_ALPHABET)}
_USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_CARD_PREFIXES = ("62", "4", "51", "52", "53", "54", "55", "34", "37", "35", "6011", "65")
_MOBILE = re.compile(r"1[3-9]\d{9}")


def resident_id_valid(value: str) -> bool:
    """18-character resident id with a plausible birth date and a correct check character."""
    if len(value) != 18 or not value[:17].isdigit() or value[0] == "0":
        return False
    try:
        born = date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    if not 1900 <= born.year <= 2099:
        return False
    total = sum(int(c) * w for c, w in zip(value[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == value[17].upper()


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = ord(c) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_valid(digits: str) -> bool:
    """A bank card number: 13-19 digits, a known issuer prefix, Luhn valid."""
    if not 13 <= len(digits) <= 19:
        return False
    if not digits.startswith(_CARD_PREFIXES) and not 2221 <= int(digits[:4]) <= 2720:
        return False
    return luhn_valid(digits)


def uscc_valid(code: str) -> bool:
    """A unified social credit code with its GB 32100-2015 check character."""
    if len(code) != 18 or not code[2:8].isdigit():
        return False
    try:
        total = sum(_USCC_VALUE[c] * w for c, w in zip(code[:17], _USCC_WEIGHTS, strict=True))
        check = _USCC_VALUE[code[17]]
    except KeyError:
        return False
    return (31 - total % 31) % 31 == check


def classify_number(compact: str) -> tuple[str, str] | None:
    """``(kind, value)`` of a run of digits (maybe ending in X) without separators, or None."""
    n = len(compact)
    if n == 11 and _MOBILE.fullmatch(compact):
        return "PHONE", compact
    if n == 13 and compact.startswith("86") and _MOBILE.fullmatch(compact[2:]):
        return "PHONE", compact[2:]
    if n == 18 and resident_id_valid(compact):
        return "ID", compact.upper()
    if n == 18 and uscc_valid(compact.upper()):
        return "USCC", compact.upper()
    if compact.isdigit() and card_valid(compact):
        return "CARD", compact
    return None


@dataclass(frozen=True, slots=True)
class Match:
    start: int
    end: int
    kind: str
    value: str


def _order_context(text: str, start: int) -> bool:
    return _ORDER_CONTEXT.search(text, max(0, start - _CONTEXT_CHARS), start) is not None


def _digit_matches(text: str, start: int, run: str) -> list[Match]:
    """Matches within one digit run: the whole run, else its space/hyphen-separated parts."""
    found = classify_number(_SEPARATORS.sub("", run))
    if found is not None:
        return [Match(start, start + len(run), *found)]
    parts = [(m.start(), m.end()) for m in _PARTS.finditer(run)]
    if len(parts) < 2:
        return []
    out: list[Match] = []
    i = 0
    while i < len(parts):
        for j in range(len(parts), i, -1):
            a, b = parts[i][0], parts[j - 1][1]
            piece = run[a:b]
            found = classify_number(_SEPARATORS.sub("", piece))
            if found is not None and not _order_context(text, start + a):
                out.append(Match(start + a, start + b, *found))
                i = j
                break
        else:
            i += 1
    return out


def find_matches(text: str) -> list[Match]:
    """Every piece of personal data the patterns and checksums find, in order, not overlapping."""
    matches: list[Match] = []
    if "@" in text:
        matches += [
            Match(m.start(), m.end(), "EMAIL", m.group(0).lower()) for m in _EMAIL.finditer(text)
        ]
    if "+" in text or "00" in text:
        for m in _INTL.finditer(text):
            compact = _NOT_DIGIT.sub("", m.group(0))
            if compact.startswith("00"):
                compact = compact[2:]
            country = m.group(1)
            national = compact[len(country) :]
            if compact.startswith("86") and _MOBILE.fullmatch(compact[2:]):
                matches.append(Match(m.start(), m.end(), "PHONE", compact[2:]))
            elif (
                7 <= len(national) <= 13
                and 8 <= len(compact) <= 15
                and not _order_context(text, m.start())
            ):
                matches.append(Match(m.start(), m.end(), "INTL_PHONE", compact))
    for m in _DIGIT_RUN.finditer(text):
        if _order_context(text, m.start()):
            continue
        matches += _digit_matches(text, m.start(), m.group(0))
    for m in _USCC_RUN.finditer(text):
        code = m.group(0)
        if not code.isdigit() and uscc_valid(code) and not _order_context(text, m.start()):
            matches.append(Match(m.start(), m.end(), "USCC", code))
    if len(matches) < 2:
        return matches
    matches.sort(key=lambda match: (match.start, -match.end))
    kept: list[Match] = []
    end = -1
    for match in matches:
        if match.start >= end:
            kept.append(match)
            end = match.end
    return kept


@dataclass(frozen=True, slots=True)
class Redacted:
    """A text with its personal data taken out.

    ``text`` has each match replaced by its pseudonym (what a card example shows); ``bare`` has
    each replaced by a space (what the tokeniser reads, so no term can carry any of it);
    ``entities`` are the pseudonyms in order of appearance.
    """

    text: str
    bare: str
    entities: tuple[str, ...]


def redact(text: str, key: bytes) -> Redacted:
    """Replace every match of :func:`find_matches` by its pseudonym under ``key``."""
    matches = find_matches(text)
    if not matches:
        return Redacted(text, text, ())
    shown: list[str] = []
    bare: list[str] = []
    entities: list[str] = []
    at = 0
    for match in matches:
        token = pseudonym(key, match.kind, match.value)
        entities.append(token)
        shown += (text[at : match.start], token)
        bare += (text[at : match.start], " ")
        at = match.end
    shown.append(text[at:])
    bare.append(text[at:])
    return Redacted("".join(shown), "".join(bare), tuple(entities))
