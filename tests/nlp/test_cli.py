"""``xietong nlp train`` against the real Kafka and SeaweedFS: a labelled file, labelled events.

The command's registry is the real one on topics and a bucket of this test (the platform's
``control.models.v1`` is shared by every test on the broker and the nlp model names are fixed).
"""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import xietong.nlp as nlp_cli
from schemas.control import Grant
from services.nlp.corpus import generate
from services.nlp.settings import NlpSettings
from shared.codec import encode
from shared.control import ControlRegistry, ControlWriter, new_id
from shared.kafka import BatchPublisher, OutRecord, create_producer, ensure_topics, started
from shared.models import ModelRegistry
from tests.nlp.test_app import nlp_settings  # noqa: F401  (the fixture)
from tests.nlp.test_handlers import text_event
from xietong.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture
def registry_topics(
    monkeypatch: pytest.MonkeyPatch, unique_name: Callable[[str], str]
) -> tuple[str, str, str]:
    topics = (unique_name("models"), unique_name("aliases"), f"m{new_id()}")

    def isolated(settings: Any) -> ModelRegistry:
        return ModelRegistry(
            settings, cards_topic=topics[0], aliases_topic=topics[1], bucket=topics[2]
        )

    monkeypatch.setattr(nlp_cli, "ModelRegistry", isolated)
    return topics


def xietong(settings: NlpSettings, *args: str) -> Result:
    assert settings.s3_access_key_id and settings.s3_secret_access_key
    assert settings.network_secret
    env = {
        "XIETONG_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "XIETONG_S3_ACCESS_KEY_ID": settings.s3_access_key_id.get_secret_value(),
        "XIETONG_S3_SECRET_ACCESS_KEY": settings.s3_secret_access_key.get_secret_value(),
        "XIETONG_NETWORK_SECRET": settings.network_secret.get_secret_value(),
    }
    return CliRunner().invoke(main, ["--kafka", settings.kafka_bootstrap_servers, *args], env=env)


async def champions(settings: NlpSettings, topics: tuple[str, str, str]) -> dict[str, Any]:
    async with ModelRegistry(
        settings, cards_topic=topics[0], aliases_topic=topics[1], bucket=topics[2]
    ) as registry:
        return {
            name: registry.resolve(name, "champion")
            for name in ("nlp-topic-en", "nlp-topic-zh", "nlp-sentiment-en")
        }


def test_a_labelled_file_trains_one_champion_per_language(
    nlp_settings: NlpSettings,  # noqa: F811
    registry_topics: tuple[str, str, str],
    tmp_path: Path,
) -> None:
    path = tmp_path / "notes.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "language"])
        for language in ("en", "zh"):
            for item in generate("topic", language, 160, seed=4):
                writer.writerow([item.text, item.label, language])

    done = xietong(nlp_settings, "nlp", "train", "--task", "topic", "--file", str(path))
    assert done.exit_code == 0, done.output
    assert [line.split()[:3] for line in done.output.splitlines()] == [
        ["nlp-topic-en", "version", "1"],
        ["nlp-topic-zh", "version", "1"],
    ]
    found = asyncio.run(champions(nlp_settings, registry_topics))
    assert found["nlp-topic-en"].version == found["nlp-topic-zh"].version == 1
    assert found["nlp-topic-en"].params["source"] == "file:notes.csv"
    assert found["nlp-sentiment-en"] is None

    wrong = xietong(nlp_settings, "nlp", "train", "--task", "sentiment", "--file", str(path))
    assert wrong.exit_code == 1 and "are not classes of sentiment" in wrong.output
    assert xietong(nlp_settings, "nlp", "train", "--task", "topic").exit_code == 2


async def labelled_events_of(
    settings: NlpSettings, topic: str, consenting: list[str], other: str
) -> None:
    t0 = datetime(2026, 5, 1, tzinfo=UTC)
    out = []
    for n, tenant in enumerate([*consenting, other]):
        for i, item in enumerate(generate("sentiment", "en", 80, seed=n)):
            event = text_event(
                item.text, "en", "customer_feedback", t0 + timedelta(hours=i), tenant
            )
            event["payload"]["label"] = item.label
            out.append(OutRecord(tenant.encode(), encode(event)))
    await ensure_topics(settings, [topic])
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(topic, out)
    async with ControlWriter(settings) as writer, ControlRegistry(settings) as control:
        for firm in consenting:
            await writer.put_grant(
                Grant(
                    grant_id=new_id(),
                    owner=firm,
                    grantee="network",
                    insight_types=["model_training"],
                    created_at=datetime.now(UTC) - timedelta(minutes=1),
                )
            )
        async with asyncio.timeout(20):
            while not all(any(g.owner == f for g in control.grants.values()) for f in consenting):
                await control.wait_changed(control.version, 1)


def test_labelled_events_train_only_on_firms_that_consented(
    nlp_settings: NlpSettings,  # noqa: F811
    registry_topics: tuple[str, str, str],
    unique_name: Callable[[str], str],
) -> None:
    topic = unique_name("events.clean")
    firms = [f"f{new_id()}" for _ in range(3)]
    asyncio.run(labelled_events_of(nlp_settings, topic, firms, f"x{new_id()}"))

    args = ("nlp", "train", "--task", "sentiment", "--events", "--topic", topic)
    refused = xietong(nlp_settings, *args, "--min-firms", "4")
    assert refused.exit_code == 1 and "from 3 firm(s)" in refused.output

    done = xietong(nlp_settings, *args)
    assert done.exit_code == 0, done.output
    card = asyncio.run(champions(nlp_settings, registry_topics))["nlp-sentiment-en"]
    assert card.contributing_firms == 3  # the fourth firm's texts were left out
    assert card.params["source"] == f"events:{topic}"
