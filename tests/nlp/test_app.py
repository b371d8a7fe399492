"""The nlp service against the real Kafka broker and SeaweedFS (the shared model registry)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import orjson
import pytest

from schemas.insights import TextInsight, TextSummary
from schemas.topics import dlq
from services.nlp.app import NlpStatus, run_nlp
from services.nlp.corpus import generate
from services.nlp.settings import NlpSettings, load_nlp_settings
from services.nlp.training import train_and_register
from shared.kafka import (
    BatchPublisher,
    OutRecord,
    create_producer,
    ensure_topics,
    started,
)
from shared.models import ModelRegistry
from shared.settings import XietongSettings
from tests.kafka_helpers import read_records
from tests.nlp.test_handlers import T0, text_event

pytestmark = pytest.mark.integration


@pytest.fixture
def nlp_settings(
    settings: XietongSettings, s3_settings: XietongSettings, unique_name: Callable[[str], str]
) -> NlpSettings:
    base = settings.model_dump()
    base.update(
        s3_endpoint_url=s3_settings.s3_endpoint_url,
        s3_access_key_id=s3_settings.s3_access_key_id,
        s3_secret_access_key=s3_settings.s3_secret_access_key,
    )
    return load_nlp_settings(
        **base,
        nlp_source_topic=unique_name("events.clean"),
        nlp_insights_topic=unique_name("insights.text"),
        nlp_summary_topic=unique_name("insights.text-summary"),
        nlp_group_id=unique_name("nlp"),
        nlp_bootstrap_models=False,
        nlp_max_text_bytes=2000,
    )


def registry_of(s: NlpSettings, topics: tuple[str, str, str]) -> ModelRegistry:
    return ModelRegistry(s, cards_topic=topics[0], aliases_topic=topics[1], bucket=topics[2])


async def run_until(
    s: NlpSettings, registry: ModelRegistry, done: Callable[[NlpStatus], bool]
) -> NlpStatus:
    stop = asyncio.Event()
    status = NlpStatus()
    task = asyncio.create_task(run_nlp(s, stop, status=status, registry=registry))
    async with asyncio.timeout(120):
        while not done(status):
            if task.done():
                task.result()
            await asyncio.sleep(0.2)
    stop.set()
    await task
    return status


async def test_texts_in_both_languages_become_redacted_insights(
    nlp_settings: NlpSettings, unique_name: Callable[[str], str]
) -> None:
    s = nlp_settings
    topics = (
        unique_name("control.models"),
        unique_name("control.model-aliases"),
        f"models-{uuid.uuid4().hex[:12]}",
    )
    async with registry_of(s, topics) as registry:
        for task in ("sentiment", "topic"):
            for language in ("en", "zh"):
                card, _ = await train_and_register(
                    registry,
                    generate(task, language, 240, seed=1),
                    task,
                    language,
                    s.network_key(),
                    source="generated",
                    by="test",
                )
                assert card.metrics[0].split == "time" and card.metrics[0].random_split is not None
    events: list[Any] = [
        text_event(
            "Terrible, the item broke. Call me on 138 1234 5678", "en", "customer_feedback", T0
        ),
        text_event(
            "质量很好，物流很快，电话13912345670，身份证11010519491231002X",
            "zh",
            "customer_feedback",
            T0 + timedelta(hours=1),
        ),
        text_event(
            "shipment will be two weeks late", "en", "supplier_note", T0 + timedelta(hours=2)
        ),
        text_event(
            "原材料成本又涨了，报价比上季度高", "zh", "supplier_note", T0 + timedelta(hours=3)
        ),
        text_event("great", "en", "customer_feedback", T0 + timedelta(days=2)),
        text_event("", "en", "customer_feedback", T0),
        text_event("bonjour", "fr", "customer_feedback", T0),
    ]
    records = [OutRecord(b"acme", orjson.dumps(e)) for e in events] + [OutRecord(b"acme", b"\xff")]
    await ensure_topics(s, [s.nlp_source_topic])  # the broker creates no topic by itself
    async with started(create_producer(s)) as producer:
        await BatchPublisher(producer).publish(s.nlp_source_topic, records)

    status = await run_until(
        s, registry_of(s, topics), lambda st: st.documents + st.dead_letters >= 8
    )
    assert status.models == {
        "nlp-sentiment-en": 1,
        "nlp-sentiment-zh": 1,
        "nlp-topic-en": 1,
        "nlp-topic-zh": 1,
    }
    insights = [
        TextInsight.model_validate_json(r.value)
        for r in await read_records(s, s.nlp_insights_topic, 5)
    ]
    by_text = {i.language + (i.task or ""): i for i in insights}
    assert {(i.language, i.task) for i in insights} >= {
        ("en", "sentiment"),
        ("zh", "sentiment"),
        ("en", "topic"),
        ("zh", "topic"),
    }
    assert by_text["zhsentiment"].label == "positive" and len(by_text["zhsentiment"].entities) == 2
    raw = b"".join(i.model_dump_json().encode() for i in insights)
    assert b"13912345670" not in raw and b"5678" not in raw and b"11010519491231002X" not in raw
    [summary] = [
        TextSummary.model_validate_json(r.value)
        for r in await read_records(s, s.nlp_summary_topic, 1)
    ]
    assert summary.documents == 4 and summary.languages == {"en": 2, "zh": 2}
    dead = [
        orjson.loads(r.value)["reason"] for r in await read_records(s, dlq(s.nlp_source_topic), 3)
    ]
    assert sorted(r.split(" ")[0] for r in dead) == ["empty", "undecodable", "unknown"]

    # a restart re-reads from the commit point (the open window): no per-document insight twice
    more = text_event("awful service", "en", "customer_feedback", T0 + timedelta(days=2, hours=1))
    async with started(create_producer(s)) as producer:
        await BatchPublisher(producer).publish(
            s.nlp_source_topic, [OutRecord(b"acme", orjson.dumps(more))]
        )
    again = await run_until(s, registry_of(s, topics), lambda st: st.insights >= 1)
    assert again.documents == 2  # the open window's text re-read, then the new one
    ids = [
        TextInsight.model_validate_json(r.value).insight_id
        for r in await read_records(s, s.nlp_insights_topic, 6)
    ]
    assert len(ids) == len(set(ids)) == 6
