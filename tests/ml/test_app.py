"""The ml service against the real Kafka broker and SeaweedFS: training both families, the
registry, alias moves while scoring, the shadow topic, dead letters, a corrupt artifact and the
model-card API."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import TopicPartition

from schemas.control import Tenant
from schemas.insights import Prediction
from schemas.topics import INSIGHT_TOPICS
from services.ml.app import (
    ModelServer,
    http_app,
    replay_state,
    run_scoring,
    train_and_register,
)
from services.ml.handlers import Scorer
from services.ml.settings import MlSettings
from services.ml.training import NotEnoughFirms
from shared.codec import decode, encode
from shared.control import ControlRegistry, ControlWriter, issue_api_key, new_id
from shared.kafka import (
    BatchPublisher,
    OutRecord,
    create_consumer,
    create_producer,
    ensure_topics,
    started,
)
from shared.models import ModelRegistry
from shared.s3 import s3_client
from tests.control_helpers import consent_to_training
from tests.ml.conftest import supply_envelopes

pytestmark = pytest.mark.integration
NOW = datetime.now(UTC)


@pytest.fixture
def open_registry(
    ml_settings: MlSettings, unique_name: Callable[[str], str]
) -> Callable[[], ModelRegistry]:
    topics = unique_name("control.models"), unique_name("control.model-aliases")
    return lambda: ModelRegistry(ml_settings, cards_topic=topics[0], aliases_topic=topics[1])


def renamed(envelopes: list[dict[str, Any]], suffix: str) -> list[dict[str, Any]]:
    return [{**e, "tenant": f"{e['tenant']}-{suffix}"} for e in envelopes]


async def produce(settings: MlSettings, envelopes: list[dict[str, Any]]) -> None:
    # The broker creates no topic by itself (auto-creation would give it the wrong shape).
    await ensure_topics(settings, [settings.ml_source_topic])
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(
            settings.ml_source_topic,
            [OutRecord(e["tenant"].encode(), encode(e)) for e in envelopes],
        )


class Reader:
    """Reads a topic from its start, keeping everything seen."""

    def __init__(self, settings: MlSettings, topic: str) -> None:
        self.consumer = create_consumer(settings, None, topic)
        self.records: list[dict[str, Any]] = []

    async def until(self, done: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        async with asyncio.timeout(60):
            while not done(self.records):
                batch = await self.consumer.getmany(timeout_ms=200)
                self.records += [decode(r.value) for rs in batch.values() for r in rs]
        return self.records


@contextlib.asynccontextmanager
async def readers(settings: MlSettings, *topics: str) -> AsyncIterator[list[Reader]]:
    opened = [Reader(settings, t) for t in topics]
    for reader in opened:
        await reader.consumer.start()
    try:
        yield opened
    finally:
        for reader in opened:
            await reader.consumer.stop()


def new_orders(template: list[dict[str, Any]], tag: str) -> list[dict[str, Any]]:
    """Fresh purchase orders (new ids) shaped like ``template``'s last ones."""
    orders = [e for e in template if e["type"] == "purchase_order"][-5:]
    return [
        {**o, "event_id": str(uuid.uuid4()), "payload": {**o["payload"], "po_id": f"{tag}-{i}"}}
        for i, o in enumerate(orders)
    ]


def versions_of(records: list[dict[str, Any]], subjects: list[dict[str, Any]]) -> set[str]:
    ids = {s["event_id"] for s in subjects}
    return {r["model_version"] for r in records if r["subject_event_id"] in ids}


def scored(subjects: list[dict[str, Any]]) -> Callable[[list[dict[str, Any]]], bool]:
    ids = {s["event_id"] for s in subjects}
    return lambda records: ids <= {r["subject_event_id"] for r in records}


async def test_train_register_score_promote_rollback_and_a_corrupt_artifact(
    ml_settings: MlSettings, open_registry: Callable[[], ModelRegistry]
) -> None:
    settings = ml_settings
    suffix = new_id()[:6]
    history = renamed(supply_envelopes(firms=6, per_firm=250), suffix)
    firms = sorted({e["tenant"] for e in history})
    await produce(settings, history)
    small_rf = {"n_estimators": 20, "max_depth": 6}
    async with (
        ControlWriter(settings) as writer,
        ControlRegistry(settings) as control,
        open_registry() as registry,
    ):
        # four firms allow training: fewer than k=5, nothing is published
        await consent_to_training(control, writer, firms[:4])
        with pytest.raises(NotEnoughFirms):
            await train_and_register(
                settings, registry, control, "supplier-delay", "sklearn-rf", params=small_rf
            )
        await consent_to_training(control, writer, firms[4:5])  # the sixth never consents
        forest = await train_and_register(
            settings, registry, control, "supplier-delay", "sklearn-rf", params=small_rf
        )
        mlp = await train_and_register(
            settings,
            registry,
            control,
            "supplier-delay",
            "keras-mlp",
            params={"units": 8, "epochs": 2},
        )
        assert (forest.version, mlp.version) == (1, 2)
        assert forest.contributing_firms == mlp.contributing_firms == 5
        assert registry.aliases_of("supplier-delay") == {"champion": 1, "challenger": 2}
        assert {m.split for m in forest.metrics} >= {"time"}

        server = ModelServer(registry, Scorer(source=settings.ml_source_topic))
        stop, ready = asyncio.Event(), asyncio.Event()
        loop = asyncio.create_task(run_scoring(settings, stop, server, ready=ready))
        try:
            async with asyncio.timeout(60):
                while not ready.is_set():
                    assert not loop.done(), loop.exception()
                    await asyncio.sleep(0.1)
            async with readers(
                settings,
                settings.ml_predictions_topic,
                settings.ml_shadow_topic,
                settings.ml_dead_letter_topic,
            ) as (predictions, shadow, dead):
                first = new_orders(history, "A")
                broken = {**first[0], "event_id": str(uuid.uuid4())}
                broken["payload"] = {**broken["payload"], "promised_date": None}
                await produce(settings, [*first, broken])
                await predictions.until(scored(first))
                await shadow.until(scored(first))
                assert versions_of(predictions.records, first) == {"1"}
                assert versions_of(shadow.records, first) == {"2"}
                letters = await dead.until(lambda rs: len(rs) >= 1)
                assert "lead_time_days is not a finite number" in letters[0]["reason"]
                assert letters[0]["source_topic"] == settings.ml_source_topic
                for record in predictions.records:
                    prediction = Prediction.model_validate(record)
                    assert prediction.tenant in firms  # owned by the firm it is about
                    assert prediction.model_sha256 == forest.sha256
                # no shadow output reaches the insight topic, and no grant can reach the shadow
                assert {r["model_version"] for r in predictions.records} == {"1"}
                assert settings.ml_shadow_topic not in INSIGHT_TOPICS.values()

                # promote: the challenger serves from the next batch on, no restart
                await registry.set_alias("supplier-delay", "champion", 2, by="test")
                second = new_orders(history, "B")
                await produce(settings, second)
                await predictions.until(scored(second))
                assert versions_of(predictions.records, second) == {"2"}

                # rollback: visible in the predictions' model_version
                await registry.rollback("supplier-delay", "champion", by="test")
                third = new_orders(history, "C")
                await produce(settings, third)
                await predictions.until(scored(third))
                assert versions_of(predictions.records, third) == {"1"}

                # a corrupt artifact: the previous version keeps serving and readiness says so
                bad = await registry.register(b"x", forest.model_dump(), by="test")
                async with s3_client(settings) as s3:
                    await s3.put_object(
                        Bucket=bad.artifact_bucket, Key=bad.artifact_key, Body=b"tampered"
                    )
                await registry.set_alias("supplier-delay", "champion", bad.version, by="test")
                fourth = new_orders(history, "D")
                await produce(settings, fourth)
                await predictions.until(scored(fourth))
                assert versions_of(predictions.records, fourth) == {"1"}
                problem = server.problem()
                assert problem is not None and "v3 not loaded" in problem
                assert "corrupt" in problem and "v1 keeps serving" in problem
        finally:
            stop.set()
            await asyncio.wait_for(loop, 30)


async def test_model_cards_are_served_to_tenants_with_a_key(
    ml_settings: MlSettings, open_registry: Callable[[], ModelRegistry]
) -> None:
    settings = ml_settings
    tenant = f"t{new_id()}"
    plaintext, key = issue_api_key(tenant)
    card = {
        "name": "supplier-delay",
        "use_case": "test",
        "task": "classification",
        "target": "late",
        "family": "sklearn-rf",
        "serialization": "joblib",
        "features": [{"name": "x", "dtype": "number"}],
        "training_rows": 10,
        "contributing_firms": 5,
    }
    async with (
        ControlWriter(settings) as writer,
        ControlRegistry(settings) as control,
        open_registry() as registry,
    ):
        await writer.put_tenant(Tenant(tenant=tenant, name="Acme", created_at=NOW))
        await writer.put_key(key)
        public = await registry.register(b"a", card, by="test")
        private = await registry.register(
            b"b", {**card, "owner": f"o{new_id()}", "visibility": "private"}, by="test"
        )
        await registry.set_alias("supplier-delay", "champion", public.version, by="test")
        async with asyncio.timeout(20):
            while control.authenticate(plaintext) is None:
                await control.wait_changed(control.version, 1)
        server = ModelServer(registry, Scorer(source="x"))
        async with TestClient(TestServer(http_app(control, registry, server))) as client:
            assert (await client.get("/v1/models")).status == 401
            wrong = {"Authorization": "Bearer xt_nope_nope"}
            assert (await client.get("/v1/models", headers=wrong)).status == 401
            answer = await client.get(
                "/v1/models", headers={"Authorization": f"Bearer {plaintext}"}
            )
            assert answer.status == 200
            cards = (await answer.json())["models"]
            assert [(c["version"], c["aliases"]) for c in cards] == [(1, ["champion"])]
            assert private.version not in [c["version"] for c in cards]
            assert (await client.get("/healthz")).status == 200


async def test_a_restarted_scorer_rebuilds_its_feature_state_from_the_clean_topic(
    ml_settings: MlSettings, open_registry: Callable[[], ModelRegistry]
) -> None:
    settings = ml_settings
    history = renamed(supply_envelopes(firms=2, per_firm=120), new_id()[:6])
    await produce(settings, history)
    async with open_registry() as registry:
        first = ModelServer(registry, Scorer(source=settings.ml_source_topic))
        stop, ready = asyncio.Event(), asyncio.Event()
        loop = asyncio.create_task(run_scoring(settings, stop, first, ready=ready))
        consumer = create_consumer(settings, settings.ml_group_id)
        async with started(consumer):
            partitions = [TopicPartition(settings.ml_source_topic, p) for p in range(3)]
            async with asyncio.timeout(60):
                while sum([await consumer.committed(tp) or 0 for tp in partitions]) < len(history):
                    assert not loop.done(), loop.exception()
                    await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(loop, 30)

        second = Scorer(source=settings.ml_source_topic)
        assert await replay_state(settings, second) == len(history)
        assert second.supply.deliveries == first.scorer.supply.deliveries
        assert second.supply.labels == first.scorer.supply.labels
        assert len(second.supply.labels) > 50
