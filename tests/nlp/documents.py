"""Random documents with personal data planted in them, and look-alikes that must stay."""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from services.nlp.redact import card_valid, luhn_valid, resident_id_valid, uscc_valid

ZH_FILLER = [
    "质量很好",
    "发货太慢了",
    "价格有点贵",
    "客服回复及时",
    "包装破损",
    "下次还会买",
    "请尽快处理",
]
EN_FILLER = [
    "the parts arrived late",
    "quality is fine",
    "price went up",
    "thanks a lot",
    "please call back",
    "the box was damaged",
]


def mobile(rng: random.Random) -> tuple[str, str]:
    digits = "1" + rng.choice("3456789") + "".join(rng.choices(string.digits, k=9))
    form = rng.randrange(6)
    if form == 0:
        return digits, digits
    if form == 1:
        return digits, f"{digits[:3]} {digits[3:7]} {digits[7:]}"
    if form == 2:
        return digits, f"{digits[:3]}-{digits[3:7]}-{digits[7:]}"
    if form == 3:
        return digits, f"+86 {digits}"
    if form == 4:
        return digits, f"+86-{digits[:3]}-{digits[3:7]}-{digits[7:]}"
    return digits, f"0086{digits}"


def resident_id(rng: random.Random) -> tuple[str, str]:
    from services.nlp.redact import _ID_CHECK, _ID_WEIGHTS

    while True:
        body = (
            f"{rng.randint(110000, 659999)}{rng.randint(1940, 2010)}"
            f"{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}{rng.randint(0, 999):03d}"
        )
        total = sum(int(c) * w for c, w in zip(body, _ID_WEIGHTS, strict=True))
        value = body + _ID_CHECK[total % 11]
        if resident_id_valid(value):
            return value, value if rng.random() < 0.8 else value.lower()


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choices(string.digits, k=length - len(prefix) - 1))
    for d in string.digits:
        if luhn_valid(body + d):
            return body + d
    raise AssertionError


def card(rng: random.Random) -> tuple[str, str]:
    prefix, length = rng.choice([("62", 16), ("62", 19), ("4", 16), ("53", 16), ("37", 15)])
    digits = luhn_complete(prefix, length, rng)
    assert card_valid(digits)
    if rng.random() < 0.5 and length == 16:
        return digits, " ".join(digits[i : i + 4] for i in range(0, 16, 4))
    return digits, digits


def uscc(rng: random.Random) -> tuple[str, str]:
    from services.nlp.redact import _USCC_ALPHABET, _USCC_VALUE, _USCC_WEIGHTS

    body = (
        rng.choice("9156")
        + rng.choice("123")
        + "".join(rng.choices(string.digits, k=6))
        + "".join(rng.choices(_USCC_ALPHABET, k=9))
    )
    total = sum(_USCC_VALUE[c] * w for c, w in zip(body, _USCC_WEIGHTS, strict=True))
    value = body + _USCC_ALPHABET[(31 - total % 31) % 31]
    assert uscc_valid(value)
    return value, value


def email(rng: random.Random) -> tuple[str, str]:
    user = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9)))
    value = (
        f"{user}.{rng.randint(1, 99)}@{rng.choice(['qq.com', 'example.cn', 'mail.example.com'])}"
    )
    return value, value


def intl(rng: random.Random) -> tuple[str, str]:
    country, number = rng.choice(
        [
            ("44", "20 7946 0958"),
            ("1", "415 555 0132"),
            ("49", "30 1234 5678"),
            ("81", "3-1234-5678"),
        ]
    )
    written = f"+{country} {number}"
    return "".join(c for c in written if c.isdigit()), written


PLANTERS = {
    "PHONE": mobile,
    "ID": resident_id,
    "CARD": card,
    "USCC": uscc,
    "EMAIL": email,
    "INTL_PHONE": intl,
}


@dataclass
class Planted:
    text: str
    language: str
    values: list[tuple[str, str, str]]  # kind, value, as written


def document(rng: random.Random) -> Planted:
    language = rng.choice(["en", "zh"])
    filler = ZH_FILLER if language == "zh" else EN_FILLER
    sep = "，" if language == "zh" else ", "
    parts: list[str] = []
    values = []
    for _ in range(rng.randint(1, 4)):
        parts.append(rng.choice(filler))
        kind = rng.choice(list(PLANTERS))
        value, written = PLANTERS[kind](rng)
        label = {
            "zh": ["电话", "联系", "身份证", "卡号", "", "请打"],
            "en": ["call", "contact", "id", "card", "", "reach me at"],
        }[language]
        parts.append(f"{rng.choice(label)} {written}".strip())
        values.append((kind, value, written))
    return Planted(sep.join(parts), language, values)


def order_number(rng: random.Random) -> str:
    """A text with an order, tracking or ISBN number that is no personal data."""
    digits = "".join(rng.choices(string.digits, k=rng.choice([11, 12, 16, 18, 19])))
    return rng.choice(
        [
            f"订单号：{digits}",
            f"订单号 {digits} 已发货",
            f"order no. {digits} shipped",
            f"Order #{digits}",
            f"运单号{digits}",
            f"tracking number {digits}",
            f"SF{digits}",
            f"ISBN 978-7-{rng.randint(100, 999)}-{rng.randint(10000, 99999)}-{rng.randint(0, 9)}",
            f"invoice {digits}",
            f"PO{digits}",
        ]
    )
