"""ml, nlp and storage through a broker outage, as processes, counted output by output (issue 10).

The three services run as an operator runs them (``python -m services.<name>``) on a private
broker, with a champion model trained and the storage's two S3 stores. Clean events (purchase
orders and texts) are published, and the broker is stopped while they are being worked on. Each
service must stay up, say so on ``/readyz`` within seconds, be ready again once the broker is
back, and carry on by itself: every order gets exactly one prediction, every text exactly one
text insight, every clean record lands exactly once in the archive, and the logs of the outage
stay short (repeats collapsed). Figures go to the terminal (``[crash] ...``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from deploy.local import infra
from schemas.topics import EVENTS_CLEAN, INSIGHTS_PREDICTIONS, INSIGHTS_TEXT
from services.ml.app import train_and_register
from services.ml.settings import MlSettings, load_ml_settings
from services.storage.reader import ArchiveReader
from services.storage.settings import StorageSettings, load_storage_settings
from services.storage.stores import open_stores
from shared.codec import encode
from shared.control import ControlRegistry, ControlWriter
from shared.kafka import BatchPublisher, OutRecord, create_producer, ensure_topics, started
from shared.models import ModelRegistry
from tests.conftest import S3Endpoint
from tests.control_helpers import consent_to_training
from tests.crash.harness import ROOT, Service, eventually, read_all, report
from tests.ml.conftest import supply_envelopes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_SECONDS = 20.0
NAMES = ("ml", "nlp", "storage")


@dataclass
class Downstream:
    """The private broker, the settings to reach it and the stores, and the three services."""

    root: Path
    broker: infra.KafkaInstance
    ml: MlSettings
    storage: StorageSettings
    services: dict[str, Service]
    session: aiohttp.ClientSession

    async def ready(self, name: str) -> int:
        """The ``/readyz`` status of a service right now (0: no answer)."""
        try:
            async with self.session.get(f"{self.services[name].ready_url}/readyz") as response:
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return 0

    async def readiness_is(self, status: int, timeout: float) -> None:
        for name in NAMES:

            async def check(name: str = name) -> bool:
                return await self.ready(name) == status

            await eventually(check, f"{name} /readyz answers {status}", timeout=timeout)

    def check_running(self) -> None:
        for service in self.services.values():
            code = service.process.returncode if service.process is not None else None
            if code is not None:
                raise AssertionError(f"{service.name} exited with {code}:\n{service.tail(40)}")

    def restart_broker(self) -> None:
        """The same ports and the same data folder: what a restarted machine would do."""
        self.broker = infra.start_kafka(
            port=self.broker.port,
            controller_port=self.broker.controller_port,
            data_dir=Path(self.broker.data_dir),
        )

    async def publish(self, events: list[dict[str, Any]]) -> None:
        async with started(create_producer(self.ml)) as producer:
            await BatchPublisher(producer).publish(
                EVENTS_CLEAN, [OutRecord(e["tenant"].encode(), encode(e)) for e in events]
            )


async def train_champion(settings: MlSettings, history: list[dict[str, Any]]) -> None:
    """Five of the six firms consent to training; a small forest becomes the champion."""
    firms = sorted({e["tenant"] for e in history})
    async with (
        ControlWriter(settings) as writer,
        ControlRegistry(settings) as control,
        ModelRegistry(settings) as registry,
    ):
        await consent_to_training(control, writer, firms[:5])
        await train_and_register(
            settings,
            registry,
            control,
            "supplier-delay",
            "sklearn-rf",
            params={"n_estimators": 20, "max_depth": 6},
        )


@asynccontextmanager
async def downstream(public: S3Endpoint, private: S3Endpoint) -> AsyncIterator[Downstream]:
    """A private broker with six firms' supply history and a champion, and ml, nlp and
    storage started on it (unique buckets in the suite's SeaweedFS servers)."""
    root = Path(tempfile.mkdtemp(prefix="xietong-outage-"))
    broker = infra.start_kafka(data_dir=root / "kafka", partitions=3)
    tag = uuid.uuid4().hex[:10]
    common: dict[str, Any] = {
        "kafka_bootstrap_servers": broker.bootstrap_servers,
        "kafka_partitions": 3,
        "s3_endpoint_url": public.endpoint_url,
        "s3_access_key_id": public.access_key_id,
        "s3_secret_access_key": public.secret_access_key,
        "models_bucket": f"models-{tag}",
        "network_secret": "outage-network-secret",
        "state_dir": str(root / "test-state"),
        "log_format": "text",
    }
    ml = load_ml_settings(**common, ml_models=["supplier-delay"])
    storage = load_storage_settings(
        **common,
        storage_private_s3_endpoint_url=private.endpoint_url,
        storage_private_s3_access_key_id=private.access_key_id,
        storage_private_s3_secret_access_key=private.secret_access_key,
        storage_public_bucket=f"archive-{tag}-pub",
        storage_private_bucket=f"archive-{tag}-priv",
    )
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith("XIETONG_")},
        "XIETONG_RUN_DIR": str(root),
        "XIETONG_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "XIETONG_KAFKA_PARTITIONS": "3",
        "XIETONG_NETWORK_SECRET": "outage-network-secret",
        "XIETONG_LOG_FORMAT": "json",
        "XIETONG_KAFKA_UNREADY_AFTER_SECONDS": "5",
        "XIETONG_S3_ENDPOINT_URL": public.endpoint_url,
        "XIETONG_S3_ACCESS_KEY_ID": public.access_key_id,
        "XIETONG_S3_SECRET_ACCESS_KEY": public.secret_access_key,
        "XIETONG_MODELS_BUCKET": ml.models_bucket,
    }
    ports = {name: infra.free_port() for name in NAMES}
    extra = {
        "ml": {"XIETONG_ML_MODELS": '["supplier-delay"]', "XIETONG_ML_REFIT": "false"},
        "nlp": {},
        "storage": {
            "XIETONG_STORAGE_PRIVATE_S3_ENDPOINT_URL": private.endpoint_url,
            "XIETONG_STORAGE_PRIVATE_S3_ACCESS_KEY_ID": private.access_key_id,
            "XIETONG_STORAGE_PRIVATE_S3_SECRET_ACCESS_KEY": private.secret_access_key,
            "XIETONG_STORAGE_PUBLIC_BUCKET": storage.storage_public_bucket,
            "XIETONG_STORAGE_PRIVATE_BUCKET": storage.storage_private_bucket,
            "XIETONG_STORAGE_POLICY_FILE": str(ROOT / "deploy" / "placement-policy.yaml"),
            "XIETONG_STORAGE_DEFAULT_RESIDENCY": "any",
            "XIETONG_STORAGE_SEGMENT_MAX_SECONDS": "1",
            "XIETONG_STORAGE_LATE_MAX_SECONDS": "1",
            "XIETONG_STORAGE_FLUSH_CHECK_SECONDS": "0.2",
        },
    }
    services = {
        name: Service(
            name,
            {
                **base,
                **extra[name],
                f"XIETONG_{name.upper()}_HTTP_PORT": str(ports[name]),
                "XIETONG_STATE_DIR": str(root / "state" / name),
            },
            f"http://127.0.0.1:{ports[name]}",
            root / f"{name}.log",
        )
        for name in NAMES
    }
    net: Downstream | None = None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            net = Downstream(root, broker, ml, storage, services, session)
            await ensure_topics(ml, [EVENTS_CLEAN])
            history = supply_envelopes(firms=6, per_firm=150)
            await net.publish(history)
            await train_champion(ml, history)
            try:
                await asyncio.gather(*(s.start(session) for s in services.values()))
                yield net
            finally:
                for service in services.values():
                    await service.stop()
    finally:
        infra.stop(net.broker if net is not None else broker)  # the restarted one, if it was
        if os.environ.get("XIETONG_KEEP_CRASH_DIR"):
            report(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def orders(tag: str, count: int) -> list[dict[str, Any]]:
    """Fresh purchase orders (new ids) shaped like the history's last ones: each asks for a
    prediction."""
    history = supply_envelopes(firms=6, per_firm=150)
    template = [e for e in history if e["type"] == "purchase_order"][-30:]
    return [
        {
            **order,
            "event_id": str(uuid.uuid4()),
            "payload": {**order["payload"], "po_id": f"{tag}-{i}"},
        }
        for i, order in ((i, template[i % len(template)]) for i in range(count))
    ]


def texts(tag: str, count: int) -> list[dict[str, Any]]:
    lines = [
        ("en", "the parts arrived late and the box was damaged, please call back"),
        ("en", "quality is fine, thanks a lot"),
        ("zh", "质量很好，下次还会买"),
        ("zh", "发货太慢了，请尽快处理"),
    ]
    return [
        {
            "event_id": str(uuid.uuid4()),
            "tenant": f"faste-0{i % 6}",
            "type": "text_document",
            "schema_version": 1,
            "occurred_at": datetime.now(UTC).isoformat(),
            "source": {"system": "sdk"},
            "payload": {
                "kind": "customer_feedback",
                "language": lines[i % 4][0],
                "text": f"{lines[i % 4][1]} ({tag} {i})",
            },
        }
        for i in range(count)
    ]


async def archived(settings: StorageSettings) -> Counter[tuple[int, int]]:
    """How many times each (partition, offset) of the clean topic is in the archive."""
    held: Counter[tuple[int, int]] = Counter()
    async with open_stores(settings) as stores:
        reader = ArchiveReader(stores)
        for found in await reader.all_manifests(f"{EVENTS_CLEAN}/"):
            for record in await reader.records(found):
                held[(found.manifest.partition, record.offset)] += 1
    return held


def ids(records: list[Any], field: str) -> Counter[str]:
    return Counter(str(orjson.loads(r.value)[field]) for r in records if r.value)


async def test_ml_nlp_and_storage_wait_out_a_broker_outage_and_lose_and_repeat_nothing(
    s3_endpoint: S3Endpoint, private_s3_endpoint: S3Endpoint
) -> None:
    async with downstream(s3_endpoint, private_s3_endpoint) as net:
        before_orders, before_texts = orders("before", 300), texts("before", 600)
        await net.publish(before_orders + before_texts)  # still being worked on at the stop
        lines_before = {name: s.log_lines() for name, s in net.services.items()}

        infra.stop(net.broker)
        stopped = asyncio.get_running_loop().time()
        # every service says so on /readyz within seconds, and none of them exits
        await net.readiness_is(503, timeout=OUTAGE_SECONDS)
        net.check_running()
        await asyncio.sleep(
            max(0.0, OUTAGE_SECONDS - (asyncio.get_running_loop().time() - stopped))
        )
        net.check_running()
        outage_lines = {
            name: s.log_lines() - lines_before[name] for name, s in net.services.items()
        }

        net.restart_broker()
        await net.readiness_is(200, timeout=90)  # they carry on by themselves
        after_orders, after_texts = orders("after", 100), texts("after", 100)
        await net.publish(after_orders + after_texts)

        wanted_orders = {o["event_id"] for o in before_orders + after_orders}
        wanted_texts = {t["event_id"] for t in before_texts + after_texts}
        predicted: Counter[str] = Counter()
        analysed: Counter[str] = Counter()
        held: Counter[tuple[int, int]] = Counter()
        clean: set[tuple[int, int]] = set()

        async def everything_out() -> bool:
            nonlocal predicted, analysed, held, clean
            net.check_running()
            predicted = ids(await read_all(net.ml, [INSIGHTS_PREDICTIONS]), "subject_event_id")
            analysed = ids(await read_all(net.ml, [INSIGHTS_TEXT]), "document_event_id")
            clean = {(r.partition, r.offset) for r in await read_all(net.ml, [EVENTS_CLEAN])}
            held = await archived(net.storage)
            return (
                wanted_orders <= predicted.keys()
                and wanted_texts <= analysed.keys()
                and clean <= held.keys()
            )

        try:
            await eventually(everything_out, "every order, text and record came out", 120)
        finally:
            report(
                f"broker outage {OUTAGE_SECONDS:.0f} s with ml, nlp, storage at work: "
                f"predictions {len(wanted_orders & predicted.keys())}/{len(wanted_orders)}, "
                f"text insights {len(wanted_texts & analysed.keys())}/{len(wanted_texts)}, "
                f"archived {len(clean & held.keys())}/{len(clean)}; repeated ids: predictions "
                f"{sum(n - 1 for n in predicted.values())}, text insights "
                f"{sum(n - 1 for n in analysed.values())}, archive "
                f"{sum(n - 1 for n in held.values())}; log lines during the outage {outage_lines}"
            )
        assert all(n == 1 for n in predicted.values()), "a prediction was published twice"
        assert all(n == 1 for n in analysed.values()), "a text insight was published twice"
        assert all(n == 1 for n in held.values()), "a record was archived twice"
        assert all(count < 200 for count in outage_lines.values()), outage_lines

        for service in net.services.values():  # SIGTERM drains, commits and exits cleanly
            assert service.process is not None
            service.process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(service.process.wait(), 60) == 0, service.tail(40)
