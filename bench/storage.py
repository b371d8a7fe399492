"""``python -m bench.storage``: the storage service against plain aioboto3 and aiokafka, same run.

Starts a fresh Kafka broker (unless ``XIETONG_BENCH_KAFKA_BOOTSTRAP``) and two SeaweedFS
servers (public, private), then measures, A and B alternating per repeat:

- **S1 archive MB/s**: the archive's write path (``describe`` -> segments -> ``plan_segment``:
  Parquet + manifest, placement -> ``put_object`` of object and manifest) over clean events in
  memory, against plain aioboto3 ``put_object`` of the same record bytes in the same number of
  objects to the same store. Target >= 0.7.
- **S2 upload / download MB/s**: a 32 MiB file through the storage API (HTTP ``PATCH`` streamed
  into multipart parts, ``complete`` with its sha256 check; ``GET`` streamed back), against plain
  aioboto3 ``put_object`` / ``get_object`` of the same bytes. Target >= 0.7.
- **S3 replay records/s**: ``services.storage.replay.replay`` of an archived topic (every object
  checked against its manifest, then produced per partition) against a plain ``AIOKafkaProducer``
  sending the same records (``send`` without awaiting each, then ``flush``). Target >= 0.5.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.workload import make_events
from schemas.control import Tenant
from shared.codec import encode
from shared.control import ControlWriter, issue_api_key, new_id
from shared.kafka import BatchPublisher, OutRecord, create_producer, ensure_topics, started


@contextlib.asynccontextmanager
async def infrastructure() -> AsyncIterator[Any]:
    from deploy.local import infra
    from services.storage.settings import load_storage_settings

    temp = Path(tempfile.mkdtemp(prefix="xietong-bench-storage-"))
    started_kafka = None
    bootstrap = os.environ.get("XIETONG_BENCH_KAFKA_BOOTSTRAP")
    if not bootstrap:
        started_kafka = infra.start_kafka(data_dir=temp / "kafka")
        bootstrap = started_kafka.bootstrap_servers
    public = infra.start_seaweedfs(data_dir=temp / "public")
    private = infra.start_seaweedfs(data_dir=temp / "private")
    try:
        suffix = uuid.uuid4().hex[:8]
        yield load_storage_settings(
            kafka_bootstrap_servers=bootstrap,
            kafka_partitions=3,
            log_level="WARNING",
            log_format="text",
            state_dir=str(temp / "state"),
            network_secret="bench-secret",
            s3_endpoint_url=public.endpoint_url,
            s3_access_key_id=public.access_key_id,
            s3_secret_access_key=public.secret_access_key,
            storage_private_s3_endpoint_url=private.endpoint_url,
            storage_private_s3_access_key_id=private.access_key_id,
            storage_private_s3_secret_access_key=private.secret_access_key,
            storage_public_bucket=f"bench-pub-{suffix}",
            storage_private_bucket=f"bench-priv-{suffix}",
            storage_default_residency="any",
            storage_archive=False,
            storage_group_id=f"bench-storage-{suffix}",
        )
    finally:
        infra.stop(public)
        infra.stop(private)
        if started_kafka is not None:
            infra.stop(started_kafka)
        shutil.rmtree(temp, ignore_errors=True)


def clean_values(count: int) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` of clean-event-shaped records (the bench's sales events)."""
    out = []
    for event in make_events(count):
        event = {**event, "metrics": {"sales.amount_cny": 1.0}, "quality": {}}
        out.append((event["tenant"].encode(), encode(event)))
    return out


async def archive_pair(settings: Any, stores: Any, count: int) -> tuple[float, float]:
    from services.storage.archive import labeller_of
    from services.storage.handlers import plan_segment
    from services.storage.objects import manifest_key
    from services.storage.placement import Policy
    from services.storage.segments import PartitionSegments, describe

    values = clean_values(count)
    total = sum(len(v) for _, v in values)
    policy = Policy.load(settings.storage_policy_file)
    labeller = labeller_of(settings)
    topic = f"bench.archive.{uuid.uuid4().hex[:8]}"

    started_at = time.perf_counter()
    state = PartitionSegments(topic, 0, max_bytes=10**12, max_seconds=1e9, late_max_seconds=1e9)
    for offset, (key, value) in enumerate(values):
        state.add(describe(offset, 0, key, value), 0.0)
    segments = state.due(0.0, everything=True)
    plans = await asyncio.gather(
        *(asyncio.to_thread(plan_segment, s, policy, labeller, datetime.now(UTC)) for s in segments)
    )
    objects = [o for plan in plans for o in plan.objects]

    async def put(store_name: str, data: bytes, manifest: Any) -> None:
        store = stores[store_name]
        await store.put(manifest.key, data)
        await store.put(manifest_key(manifest.key), encode(manifest))

    await asyncio.gather(*(put(*o) for o in objects))
    ours = total / (time.perf_counter() - started_at)

    # plain put_object of the same bytes in as many objects, to the same store
    chunk = max(1, len(values) // max(1, len(objects)))
    bodies = [b"\n".join(v for _, v in values[i : i + chunk]) for i in range(0, len(values), chunk)]
    store = stores["public"]
    started_at = time.perf_counter()
    await asyncio.gather(*(store.put(f"raw/{topic}/{n}", body) for n, body in enumerate(bodies)))
    raw = total / (time.perf_counter() - started_at)
    return ours, raw


async def transfer_pair(
    settings: Any, stores: Any, url: str, key: str, size: int
) -> tuple[float, float, float, float]:
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as http:
        started_at = time.perf_counter()
        async with http.post(
            url + "/v1/files/uploads",
            headers=headers,
            json={
                "name": "bench.bin",
                "size": size,
                "sha256": digest,
                "labels": {"sensitivity": "confidential", "kind": "drawing"},
            },
        ) as response:
            upload = await response.json()
        upload_id = upload["upload_id"]
        async with http.patch(
            f"{url}/v1/files/uploads/{upload_id}",
            headers={**headers, "Upload-Offset": "0"},
            data=data,
        ) as response:
            assert response.status == 200, await response.text()
        async with http.post(
            f"{url}/v1/files/uploads/{upload_id}/complete", headers=headers
        ) as response:
            stored = await response.json()
            assert response.status == 201, stored
        up = size / (time.perf_counter() - started_at)
        started_at = time.perf_counter()
        hasher = hashlib.sha256()
        async with http.get(f"{url}/v1/files/{stored['file_id']}", headers=headers) as response:
            async for chunk in response.content.iter_chunked(1 << 20):
                hasher.update(chunk)
        down = size / (time.perf_counter() - started_at)
        assert hasher.hexdigest() == digest
    store = stores["private"]
    name = f"raw/{uuid.uuid4().hex}"
    started_at = time.perf_counter()
    await store.put(name, data)
    raw_up = size / (time.perf_counter() - started_at)
    started_at = time.perf_counter()
    got = await store.get(name)
    raw_down = size / (time.perf_counter() - started_at)
    assert len(got) == size
    return up, raw_up, down, raw_down


async def replay_pair(settings: Any, stores: Any, count: int) -> tuple[float, float]:
    from services.storage.placement import Policy
    from services.storage.replay import replay

    source = f"bench.replay-src.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [source], partitions=3)
    values = clean_values(count)
    async with started(create_producer(settings)) as producer:
        await BatchPublisher(producer).publish(source, [OutRecord(k, v) for k, v in values])
    # archive the source once (the archive loop until every record is in an object)
    from services.storage.archive import run_archive

    stop = asyncio.Event()
    archive_settings = settings.model_copy(
        update={"storage_segment_max_seconds": 0.5, "storage_flush_check_seconds": 0.1}
    )
    async with started(create_producer(settings)) as producer:
        task = asyncio.create_task(
            run_archive(
                archive_settings,
                stores,
                Policy.load(settings.storage_policy_file),
                stop,
                topics=[source],
                publisher=BatchPublisher(producer),
            )
        )
        from services.storage.reader import ArchiveReader

        reader = ArchiveReader(stores)
        async with asyncio.timeout(120):
            while (  # noqa: ASYNC110 - polling the object store
                sum(f.manifest.record_count for f in await reader.all_manifests(source)) < count
            ):
                await asyncio.sleep(0.5)
        stop.set()
        await task
    target = f"bench.replay-dst.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [target], partitions=3)  # both sides start with a topic
    started_at = time.perf_counter()
    report = await replay(settings, stores, topic=source, target=target, start=None, end=None)
    ours = report.records / (time.perf_counter() - started_at)
    plain = f"bench.replay-raw.{uuid.uuid4().hex[:8]}"
    await ensure_topics(settings, [plain], partitions=3)
    async with started(
        create_producer(settings, linger_ms=5, max_batch_size=256 * 1024)
    ) as producer:
        started_at = time.perf_counter()
        for k, v in values:
            await producer.send(plain, v, key=k)
        await producer.flush()
        raw = count / (time.perf_counter() - started_at)
    return ours, raw


async def main(repeats: int, events: int, file_mb: int) -> dict[str, Any]:
    from services.storage.app import create_app
    from services.storage.stores import open_stores

    async with infrastructure() as settings:
        tenant = f"bench{new_id()}"
        async with ControlWriter(settings) as writer:
            await writer.put_tenant(
                Tenant(
                    tenant=tenant, name=tenant, created_at=datetime.now(UTC) - timedelta(seconds=1)
                )
            )
            key, record = issue_api_key(tenant)
            await writer.put_key(record)
        app = create_app(settings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        from deploy.local.infra import free_port

        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        samples: dict[str, list[float]] = {
            k: []
            for k in (
                "archive",
                "archive.raw",
                "up",
                "up.raw",
                "down",
                "down.raw",
                "replay",
                "replay.raw",
            )
        }
        try:
            async with asyncio.timeout(60):
                while True:
                    async with (
                        aiohttp.ClientSession() as http,
                        http.get(
                            url + "/v1/catalog", headers={"Authorization": f"Bearer {key}"}
                        ) as response,
                    ):
                        if response.status == 200:
                            break
                    await asyncio.sleep(0.5)
            async with open_stores(settings) as stores:
                for round_no in range(repeats + 1):
                    a, b = await archive_pair(settings, stores, events)
                    up, raw_up, down, raw_down = await transfer_pair(
                        settings, stores, url, key, file_mb * 1024 * 1024
                    )
                    r, rr = await replay_pair(settings, stores, events)
                    print(
                        f"round {round_no}{' (warm-up)' if round_no == 0 else ''}: "
                        f"archive {a / 1e6:.1f} / {b / 1e6:.1f} MB/s, "
                        f"upload {up / 1e6:.1f} / {raw_up / 1e6:.1f}, "
                        f"download {down / 1e6:.1f} / {raw_down / 1e6:.1f}, "
                        f"replay {r:,.0f} / {rr:,.0f} rec/s",
                        flush=True,
                    )
                    if round_no:
                        for name, value in zip(
                            samples, (a, b, up, raw_up, down, raw_down, r, rr), strict=True
                        ):
                            samples[name].append(value)
        finally:
            await runner.cleanup()

    def ratio(name: str) -> float:
        return statistics.median(
            x / y for x, y in zip(samples[name], samples[f"{name}.raw"], strict=True)
        )

    result = {n: ratio(n) for n in ("archive", "up", "down", "replay")}
    print(
        f"S1 archive / put_object  {result['archive']:.2f} (target >= 0.7)\n"
        f"S2 upload / put_object   {result['up']:.2f} (target >= 0.7)\n"
        f"S2 download / get_object {result['down']:.2f} (target >= 0.7)\n"
        f"S3 replay / aiokafka     {result['replay']:.2f} (target >= 0.5)"
    )
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--file-mb", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.repeats, args.events, args.file_mb))
