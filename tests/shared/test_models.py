"""The model registry (shared.models) against the real Kafka broker and SeaweedFS."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from schemas.models import ModelAlias, ModelCard
from shared.codec import encode
from shared.kafka import create_producer, started
from shared.models import ArtifactError, ModelRegistry, sha256_of
from shared.s3 import s3_client
from shared.settings import XietongSettings


def card_fields(name: str, family: str = "sklearn-rf") -> dict[str, Any]:
    return {
        "name": name,
        "use_case": "test model",
        "task": "classification",
        "target": "late",
        "family": family,
        "serialization": "joblib",
        "features": [{"name": "x", "dtype": "number"}],
        "training_rows": 10,
        "contributing_firms": 5,
    }


def test_a_view_that_never_loaded_is_not_current() -> None:
    from shared.settings import load_settings

    registry = ModelRegistry(load_settings())
    assert registry.problem() is not None
    assert registry.resolve("any", "champion") is None


@pytest.fixture
def both(
    settings: XietongSettings, s3_settings: XietongSettings, unique_name: Callable[[str], str]
) -> dict[str, Any]:
    merged = settings.model_copy(
        update={
            "s3_endpoint_url": s3_settings.s3_endpoint_url,
            "s3_access_key_id": s3_settings.s3_access_key_id,
            "s3_secret_access_key": s3_settings.s3_secret_access_key,
        }
    )
    return {
        "settings": merged,
        "cards_topic": unique_name("control.models"),
        "aliases_topic": unique_name("control.model-aliases"),
        "bucket": f"models-{uuid.uuid4().hex[:12]}",
    }


def open_registry(both: dict[str, Any]) -> ModelRegistry:
    return ModelRegistry(
        both["settings"],
        cards_topic=both["cards_topic"],
        aliases_topic=both["aliases_topic"],
        bucket=both["bucket"],
    )


@pytest.mark.integration
async def test_versions_aliases_promote_and_rollback_seen_by_another_replica(
    both: dict[str, Any],
) -> None:
    async with open_registry(both) as writer, open_registry(both) as reader:
        one = await writer.register(b"model one", card_fields("delay"), by="test")
        two = await writer.register(b"model two", card_fields("delay", "keras-mlp"), by="test")
        other = await writer.register(b"nlp", card_fields("texts", "tfidf-logreg"), by="nlp")
        assert (one.version, two.version, other.version) == (1, 2, 1)
        assert one.sha256 == sha256_of(b"model one") and one.size_bytes == 9
        await writer.set_alias("delay", "champion", 1, by="test", reason="first")
        await writer.set_alias("delay", "champion", 2, by="test", reason="promote")
        await writer.set_alias("delay", "challenger", 1, by="test")
        assert writer.resolve("delay", "champion") == two
        with pytest.raises(KeyError):
            await writer.set_alias("delay", "champion", 9, by="test")

        await reader.current()
        assert reader.resolve("delay", "champion") == two
        assert reader.aliases_of("delay") == {"challenger": 1, "champion": 2}
        assert [c.version for c in reader.versions("delay")] == [1, 2]
        assert await reader.fetch(reader.resolve("delay", "champion")) == b"model two"  # type: ignore[arg-type]

        seen = reader.version
        back = await writer.rollback("delay", "champion", by="test")
        assert (back.version, back.history) == (1, [])
        await reader.wait_changed(seen, 5)
        await reader.current()
        assert reader.resolve("delay", "champion") == one
        with pytest.raises(KeyError):
            await writer.rollback("delay", "champion", by="test")

    # A restarted view rebuilds the same state from the compacted topics.
    async with open_registry(both) as again:
        assert again.resolve("delay", "champion") == one
        assert again.resolve("texts", "champion") is None
        assert again.problem() is None


@pytest.mark.integration
async def test_a_corrupt_or_missing_artifact_is_refused(both: dict[str, Any]) -> None:
    async with open_registry(both) as registry:
        card = await registry.register(b"the real bytes", card_fields("delay"), by="test")
        async with s3_client(both["settings"]) as s3:
            await s3.put_object(Bucket=card.artifact_bucket, Key=card.artifact_key, Body=b"evil")
            with pytest.raises(ArtifactError, match="corrupt"):
                await registry.fetch(card)
            await s3.delete_object(Bucket=card.artifact_bucket, Key=card.artifact_key)
            with pytest.raises(ArtifactError, match="unreadable"):
                await registry.fetch(card)


@pytest.mark.integration
async def test_unreadable_and_mis_keyed_records_are_skipped(both: dict[str, Any]) -> None:
    async with open_registry(both) as registry:
        good = await registry.register(b"ok", card_fields("delay"), by="test")
        forged = ModelAlias(
            name="delay", alias="champion", version=1, set_at=datetime.now(UTC), set_by="x"
        )
        async with started(create_producer(both["settings"])) as producer:
            # (a keyless record the broker itself refuses on a compacted topic)
            await producer.send_and_wait(both["aliases_topic"], b"not json", key=b"delay/champion")
            await producer.send_and_wait(
                both["aliases_topic"], encode(forged), key=b"delay/challenger"
            )
            bad_card = good.model_copy(update={"version": 7})
            await producer.send_and_wait(both["cards_topic"], encode(bad_card), key=b"delay/1")
        await registry.current()
        assert registry.aliases_of("delay") == {}
        assert registry.card("delay", 1) == good and registry.card("delay", 7) is None
        # the tail survived them: a good write still applies
        await registry.set_alias("delay", "champion", 1, by="test")
        assert registry.resolve("delay", "champion") == good
        assert registry.problem() is None


@pytest.mark.integration
async def test_waiting_for_a_change_can_be_cancelled_at_any_moment(both: dict[str, Any]) -> None:
    async with open_registry(both) as registry:
        waiters = [
            asyncio.create_task(registry.wait_changed(registry.version, 30)) for _ in range(20)
        ]
        await asyncio.sleep(0.05)
        for task in waiters[::2]:
            task.cancel()
        card = await registry.register(b"x", card_fields("delay"), by="test")
        done = await asyncio.gather(*waiters[1::2])
        assert all(v > 0 for v in done)
        assert isinstance(registry.card("delay", 1), ModelCard) and card.version == 1
