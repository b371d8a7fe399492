"""The batch work without a broker: classification, dead letters, and nothing leaks."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson

from schemas.insights import TextInsight, TextSummary
from services.nlp.handlers import Keys, Limits, Models, analyse_batch
from services.nlp.windows import PartitionTexts
from tests.nlp.documents import document

T0 = datetime(2026, 3, 1, tzinfo=UTC)


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: int


def text_event(
    text: str, language: str, kind: str, at: datetime, tenant: str = "acme"
) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "tenant": tenant,
        "type": "text_document",
        "schema_version": 1,
        "occurred_at": at.isoformat(),
        "source": {"system": "sdk"},
        "payload": {"kind": kind, "language": language, "text": text},
    }


def records(events: list[Any]) -> list[Record]:
    return [
        Record("events.clean.v1", 0, i, b"acme", e if isinstance(e, bytes) else orjson.dumps(e), 0)
        for i, e in enumerate(events)
    ]


def run(events: list[Any], models: Models) -> Any:
    windows = {0: PartitionTexts(86400, 0)}
    return analyse_batch(
        records(events),
        models,
        windows,
        Keys(b"n" * 32),
        Limits(2000, 5, 20),
        "events.clean.v1",
        T0,
    ), windows


def test_both_languages_are_classified(small_models: Models) -> None:
    events = [
        text_event(
            "Terrible service, the item broke after two days", "en", "customer_feedback", T0
        ),
        text_event("质量很好，物流很快，非常满意", "zh", "customer_feedback", T0),
        text_event(
            "shipment will be two weeks late, the truck missed the slot", "en", "supplier_note", T0
        ),
        text_event("原材料成本又涨了，报价比上季度高", "zh", "supplier_note", T0),
        text_event("New policy on export licences", "en", "policy", T0),
    ]
    result, _ = run(events, small_models)
    insights = [TextInsight.model_validate_json(r.value) for r in result.insights]
    assert [(i.language, i.task, i.label) for i in insights] == [
        ("en", "sentiment", "negative"),
        ("zh", "sentiment", "positive"),
        ("en", "topic", "delay"),
        ("zh", "topic", "price"),
        ("en", None, None),
    ]
    assert insights[0].sentiment is not None and insights[0].sentiment < 0
    assert insights[1].sentiment is not None and insights[1].sentiment > 0
    assert all(i.key_terms for i in insights[:4])


def test_bad_input_is_dead_lettered_and_the_stream_goes_on(small_models: Models) -> None:
    good = text_event("great quality", "en", "customer_feedback", T0)
    empty = text_event("   ", "en", "customer_feedback", T0)
    big = text_event("x" * 3000, "en", "customer_feedback", T0)
    french = text_event("très bien", "fr", "customer_feedback", T0)
    other = {**good, "type": "sales_order_line"}
    result, _ = run([b"\xff\xfe not json", empty, big, french, other, good], small_models)
    reasons = [orjson.loads(r.value)["reason"] for r in result.dead]
    assert reasons[0] == "undecodable record"
    assert reasons[1] == "empty text"
    assert reasons[2].startswith("text of 3000 bytes exceeds")
    assert reasons[3].startswith("unknown language 'fr'")
    assert orjson.loads(result.dead[0].value)["original_encoding"] == "base64"
    assert len(result.insights) == 1 and result.passed_over == 1


def test_a_window_summary_has_terms_and_class_mix(small_models: Models) -> None:
    events = [
        text_event("the item broke, awful", "en", "customer_feedback", T0 + timedelta(hours=h))
        for h in range(3)
    ]
    events.append(text_event("great", "en", "customer_feedback", T0 + timedelta(days=1, hours=2)))
    result, _ = run(events, small_models)
    [summary] = [TextSummary.model_validate_json(r.value) for r in result.summaries]
    assert summary.documents == 3 and summary.languages == {"en": 3}
    assert summary.top_terms[0].documents == 3
    assert sum(summary.class_mix["sentiment"].values()) == 3


def test_nothing_derived_from_a_document_carries_its_personal_data(small_models: Models) -> None:
    """Property over random documents: no planted value, in any written form or as bare digits,
    appears in any insight or summary the batch produces."""
    rng = random.Random(99)
    docs = [document(rng) for _ in range(300)]
    kinds = ["customer_feedback", "supplier_note", "news"]
    events = [
        text_event(
            d.text + " Mr Brown and 王伟 agree",
            d.language,
            rng.choice(kinds),
            T0 + timedelta(hours=i),
        )
        for i, d in enumerate(docs)
    ]
    result, _ = run(events, small_models)
    out = b"".join(r.value for r in [*result.insights, *result.summaries]).decode()
    assert len(result.insights) == 300 and result.summaries
    for doc in docs:
        for _, value, written in doc.values:
            assert written not in out and value.lower() not in out.lower()
            compact = "".join(c for c in value if c.isdigit())
            assert len(compact) < 7 or compact not in out
    assert "Brown" not in out and "brown" not in out and "王伟" not in out
    names = [
        i
        for r in result.insights
        for i in orjson.loads(r.value)["entities"]
        if i.startswith("NAME:")
    ]
    assert len(set(names)) == 2  # the two names, the same pseudonym in every document of acme
