"""The storage rows of ``python -m bench``: the storage service against plain aioboto3 and aiokafka.

On the run's broker and two SeaweedFS servers (public and private store) started for these rows
and stopped afterwards; A and B alternate their order from one repeat to the next, after the
warm-up rounds, with fresh data every repeat:

- **S1.archive** (MB/s of record bytes): the archive's write path over clean events in memory
  (``describe`` -> segments -> ``plan_segment``: Parquet + zstd, manifest, placement ->
  ``put_object`` of each object and then its manifest), against plain aioboto3 ``put_object``
  of the same record bytes in as many objects to the same store. Target >= 0.7.
- **S2.upload / S2.download** (MB/s): a file of ``Options.file_mib`` through the partner API of
  ``python -m services.storage``, run as a child process like the services of R2 and R4
  (``POST`` an upload, one streamed ``PATCH`` cut into multipart parts, ``complete`` with its
  sha256 check; ``GET`` streamed back), against plain aioboto3 ``put_object`` / ``get_object``
  of the same bytes in the store the service chose. Target >= 0.7 each.
- **S3.replay** (records/s): :func:`services.storage.replay.replay` of a topic archived just
  before, outside the clock (every object checked against its manifest, then produced per
  partition), against a plain ``AIOKafkaProducer`` with the same settings sending the same
  records to the same partitions (``send`` without awaiting each delivery, then one ``flush``).
  ``replay`` starts and stops its own producer, so the plain side's start and stop (a few ms)
  are inside its clock too. Target >= 0.5.

A row that fails says ``error`` with the reason; the other rows go on. ``python -m bench.storage``
measures only these rows (on a broker of its own unless ``XIETONG_BENCH_KAFKA_BOOTSTRAP``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiokafka.partitioner import DefaultPartitioner

from bench.results import Row, Side, paired
from bench.workload import create_topics, make_events, unique_topic
from shared.codec import encode
from shared.kafka import BatchPublisher, OutRecord, create_producer, started
from shared.settings import XietongSettings

if TYPE_CHECKING:
    from bench.harness import Options, Progress
    from bench.processes import Child
    from services.storage.settings import StorageSettings
    from services.storage.stores import Store

log = logging.getLogger("bench")

GROUPS = {
    "S1": ("S1.archive",),
    "S2": ("S2.upload", "S2.download"),
    "S3": ("S3.replay",),
}
"""What one measurement makes: a group's rows share their repeats (and their failure)."""

FILE_LABELS = {"sensitivity": "confidential", "kind": "drawing"}

Pairs = dict[str, tuple[float, float]]
"""Row key -> (ours, plain) of one repeat, in the row's unit (MB/s, records/s)."""

MB = 1e6


def empty_rows(options: Options) -> dict[str, Row]:
    size = f"{options.file_mib} MiB"
    return {
        "S1.archive": Row(
            "S1.archive",
            "archive write path (describe, segment, Parquet+zstd, manifest, put_object) / "
            "plain put_object of the same bytes, same object count (MB/s)",
            target=">= 0.7",
            events=options.events,
        ),
        "S2.upload": Row(
            "S2.upload",
            f"file upload through the storage API / aioboto3 put_object, {size} (MB/s)",
            target=">= 0.7",
            events=options.events,
        ),
        "S2.download": Row(
            "S2.download",
            f"file download through the storage API / aioboto3 get_object, {size} (MB/s)",
            target=">= 0.7",
            events=options.events,
        ),
        "S3.replay": Row(
            "S3.replay",
            "replay of an archived topic / plain AIOKafkaProducer send + flush (records/s)",
            target=">= 0.5",
            events=options.events,
        ),
    }


# --------------------------------------------------------------------------- the stores


@contextlib.asynccontextmanager
async def storage_stage(
    settings: XietongSettings, options: Options, temp: Path, say: Progress
) -> AsyncIterator[StorageSettings]:
    """Two fresh SeaweedFS servers (public, private); the storage settings that name them and
    the run's broker. Both servers are stopped when the block ends."""
    from deploy.local import infra
    from services.storage.settings import load_storage_settings

    say("storage: starting two SeaweedFS servers (public and private store)")
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for name in ("public", "private"):
            server = await asyncio.to_thread(infra.start_seaweedfs, data_dir=temp / name)
            stack.callback(infra.stop, server)
            servers.append(server)
        public, private = servers
        suffix = uuid.uuid4().hex[:8]
        yield load_storage_settings(
            **{
                **settings.model_dump(),
                "kafka_partitions": options.partitions,
                "state_dir": str(temp / "state"),
                "network_secret": "bench-network-secret-of-enough-length",
                "s3_endpoint_url": public.endpoint_url,
                "s3_access_key_id": public.access_key_id,
                "s3_secret_access_key": public.secret_access_key,
                "storage_private_s3_endpoint_url": private.endpoint_url,
                "storage_private_s3_access_key_id": private.access_key_id,
                "storage_private_s3_secret_access_key": private.secret_access_key,
                "storage_public_bucket": f"bench-pub-{suffix}",
                "storage_private_bucket": f"bench-priv-{suffix}",
                "storage_default_residency": "any",
                "storage_archive": False,
                "storage_group_id": f"bench-storage-{suffix}",
            }
        )


@dataclass(frozen=True)
class Service:
    url: str
    key: str
    """A tenant's API key."""
    child: Child


@contextlib.asynccontextmanager
async def storage_service(
    storage: StorageSettings, options: Options, temp: Path, say: Progress
) -> AsyncIterator[Service]:
    """``python -m services.storage`` (no archive loop) as a child process, and a tenant key it
    accepts; stopped when the block ends."""
    from bench.pipeline import start_service
    from schemas.control import Tenant
    from shared.control import ControlWriter, issue_api_key, new_id

    tenant = f"bench{new_id()}"
    async with ControlWriter(storage) as writer:
        await writer.put_tenant(
            Tenant(tenant=tenant, name=tenant, created_at=datetime.now(UTC) - timedelta(seconds=1))
        )
        key, record = issue_api_key(tenant)
        await writer.put_key(record)
    secret = storage.storage_private_s3_secret_access_key
    fields = {
        "s3_endpoint_url": storage.s3_endpoint_url or "",
        "s3_access_key_id": _secret(storage.s3_access_key_id),
        "s3_secret_access_key": _secret(storage.s3_secret_access_key),
        "storage_private_s3_endpoint_url": storage.storage_private_s3_endpoint_url or "",
        "storage_private_s3_access_key_id": _secret(storage.storage_private_s3_access_key_id),
        "storage_private_s3_secret_access_key": _secret(secret),
        "storage_public_bucket": storage.storage_public_bucket,
        "storage_private_bucket": storage.storage_private_bucket,
        "storage_default_residency": storage.storage_default_residency,
        "storage_archive": "false",
        "storage_group_id": storage.storage_group_id,
    }
    say("storage: starting python -m services.storage")
    child, port = start_service("storage", storage, temp / "service", **fields)
    try:
        url = f"http://127.0.0.1:{port}"
        await _until_it_answers(child, url, key, options.timeout)
        yield Service(url, key, child)
    finally:
        child.stop()


def _secret(value: Any) -> str:
    return "" if value is None else str(value.get_secret_value())


async def _until_it_answers(child: Child, url: str, key: str, timeout: float) -> None:
    """Until the service's catalog answers 200 to the key (its registry has read the key)."""
    headers = {"Authorization": f"Bearer {key}"}
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"the storage service exited:\n{child.tail()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{url}/v1/catalog", headers=headers) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.3)
    raise RuntimeError(f"the storage service did not answer in {timeout:.0f}s:\n{child.tail()}")


# --------------------------------------------------------------------------- S1


def clean_values(count: int) -> tuple[list[tuple[bytes, bytes]], int]:
    """``(key, value)`` of clean-event-shaped records (the bench's sales events, fresh ids), and
    how many ``(tenant, date)`` groups, so archive objects, they make."""
    out = []
    groups = set()
    for event in make_events(count):
        event = {**event, "metrics": {"sales.amount_cny": 1.0}, "quality": {}}
        out.append((event["tenant"].encode(), encode(event)))
        groups.add((event["tenant"], event["occurred_at"][:10]))
    return out, len(groups)


async def archive_pair(
    storage: StorageSettings, stores: dict[str, Store], count: int, round_no: int
) -> Pairs:
    """S1 for one repeat: ours and plain, in the order of the round."""
    from services.storage.archive import labeller_of
    from services.storage.handlers import plan_segment
    from services.storage.objects import Manifest, manifest_key
    from services.storage.placement import Policy
    from services.storage.segments import PartitionSegments, describe

    values, groups = clean_values(count)
    total = sum(len(v) for _, v in values)
    policy = Policy.load(storage.storage_policy_file)
    labeller = labeller_of(storage)
    topic = f"bench.archive.{uuid.uuid4().hex[:8]}"
    first = describe(0, 0, *values[0])  # the plain side writes where the archive does
    placed = policy.decide(labeller.labels(first.tenant, first.kind, first.visibility)).store

    async def ours() -> float:
        began = time.perf_counter()
        state = PartitionSegments(topic, 0, max_bytes=10**12, max_seconds=1e9, late_max_seconds=1e9)
        for offset, (key, value) in enumerate(values):
            state.add(describe(offset, 0, key, value), 0.0)
        segments = state.due(0.0, everything=True)
        written_at = datetime.now(UTC)
        plans = await asyncio.gather(
            *(asyncio.to_thread(plan_segment, s, policy, labeller, written_at) for s in segments)
        )
        objects = [o for plan in plans for o in plan.objects]

        async def put(store_name: str, data: bytes, manifest: Manifest) -> None:
            store = stores[store_name]
            await store.put(manifest.key, data)
            await store.put(manifest_key(manifest.key), encode(manifest))

        await asyncio.gather(*(put(*o) for o in objects))
        seconds = time.perf_counter() - began
        if len(objects) != groups or {o[0] for o in objects} != {placed}:
            raise RuntimeError(f"{len(objects)} archive objects, {groups} in {placed} expected")
        return total / seconds / MB

    async def plain() -> float:
        # the same bytes in as many objects as the archive writes (one per tenant and date)
        per = -(-len(values) // groups)
        bodies = [b"\n".join(v for _, v in values[i : i + per]) for i in range(0, len(values), per)]
        store, prefix = stores[placed], f"raw/{topic}"
        began = time.perf_counter()
        await asyncio.gather(*(store.put(f"{prefix}/{n}", body) for n, body in enumerate(bodies)))
        return total / (time.perf_counter() - began) / MB

    return {"S1.archive": await in_turn(round_no, ours, plain)}


# --------------------------------------------------------------------------- S2


@dataclass
class FilePlacement:
    store: str | None = None
    """The store the service put the file in (learnt on the first upload)."""


async def transfer_pair(
    stores: dict[str, Store], service: Service, size: int, placed: FilePlacement, round_no: int
) -> Pairs:
    """S2 for one repeat: upload then download, ours and plain in turn (ours first on even
    rounds, so the first round learns the store the service picks)."""
    data = os.urandom(size)
    digest = hashlib.sha256(data).hexdigest()
    headers = {"Authorization": f"Bearer {service.key}"}
    url = service.url
    rates: dict[str, float] = {}
    async with aiohttp.ClientSession() as http:

        async def ours() -> None:
            began = time.perf_counter()
            async with http.post(
                f"{url}/v1/files/uploads",
                headers=headers,
                json={"name": "bench.bin", "size": size, "sha256": digest, "labels": FILE_LABELS},
            ) as response:
                upload = await response.json()
                if response.status != 201:
                    raise RuntimeError(f"upload refused: {response.status} {upload}")
            async with http.patch(
                f"{url}/v1/files/uploads/{upload['upload_id']}",
                headers={**headers, "Upload-Offset": "0"},
                data=data,
            ) as response:
                if response.status != 200:
                    raise RuntimeError(f"PATCH: {response.status} {await response.text()}")
            async with http.post(
                f"{url}/v1/files/uploads/{upload['upload_id']}/complete", headers=headers
            ) as response:
                stored = await response.json()
                if response.status != 201:
                    raise RuntimeError(f"complete: {response.status} {stored}")
            rates["up"] = size / (time.perf_counter() - began) / MB
            placed.store = stored["store"]
            began = time.perf_counter()
            hasher = hashlib.sha256()
            async with http.get(f"{url}/v1/files/{stored['file_id']}", headers=headers) as got:
                if got.status != 200:
                    raise RuntimeError(f"GET: {got.status} {await got.text()}")
                async for chunk in got.content.iter_chunked(1 << 20):
                    hasher.update(chunk)
            rates["down"] = size / (time.perf_counter() - began) / MB
            if hasher.hexdigest() != digest:
                raise RuntimeError("the file read back differs from the one uploaded")

        async def plain() -> None:
            if placed.store is None:
                raise RuntimeError("the service's store is not known yet")
            store, name = stores[placed.store], f"raw/{uuid.uuid4().hex}"
            began = time.perf_counter()
            await store.put(name, data)
            rates["raw_up"] = size / (time.perf_counter() - began) / MB
            began = time.perf_counter()
            got = await store.get(name)
            rates["raw_down"] = size / (time.perf_counter() - began) / MB
            if len(got) != size:
                raise RuntimeError(f"get_object returned {len(got)} bytes of {size}")
            await store.delete(name)

        for side in (ours, plain) if round_no % 2 == 0 else (plain, ours):
            await side()
    return {
        "S2.upload": (rates["up"], rates["raw_up"]),
        "S2.download": (rates["down"], rates["raw_down"]),
    }


# --------------------------------------------------------------------------- S3


async def archived_topic(
    storage: StorageSettings, stores: dict[str, Store], count: int, timeout: float
) -> tuple[str, list[tuple[bytes, bytes]]]:
    """A fresh topic of ``count`` clean events, archived by the archive loop until every record
    is in an object (outside the clock)."""
    from services.storage.archive import run_archive
    from services.storage.placement import Policy
    from services.storage.reader import ArchiveReader

    source = unique_topic("storage-replay-src")
    await create_topics(storage, [source], partitions=storage.kafka_partitions, append_time=False)
    values, _ = clean_values(count)
    archive_settings = storage.model_copy(
        update={"storage_segment_max_seconds": 0.5, "storage_flush_check_seconds": 0.1}
    )
    stop = asyncio.Event()
    async with started(create_producer(storage)) as producer:
        publisher = BatchPublisher(producer)
        await publisher.publish(source, [OutRecord(k, v) for k, v in values])
        task = asyncio.create_task(
            run_archive(
                archive_settings,
                stores,
                Policy.load(storage.storage_policy_file),
                stop,
                topics=[source],
                group_id=f"bench-archive-{uuid.uuid4().hex[:8]}",
                publisher=publisher,
            )
        )
        reader = ArchiveReader(stores)
        try:
            async with asyncio.timeout(timeout):
                while (  # polling the object store: no event says "archived"
                    sum(f.manifest.record_count for f in await reader.all_manifests(source)) < count
                ):
                    if task.done():
                        raise RuntimeError(f"the archive loop ended: {task.exception()!r}")
                    await asyncio.sleep(0.3)
        finally:
            stop.set()
            await task
    return source, values


async def replay_pair(
    storage: StorageSettings, stores: dict[str, Store], count: int, timeout: float, round_no: int
) -> Pairs:
    """S3 for one repeat: ours and plain, each into a fresh topic of the same partitions."""
    from services.storage.replay import replay

    source, values = await archived_topic(storage, stores, count, timeout)
    targets = unique_topic("storage-replay-ours"), unique_topic("storage-replay-plain")
    await create_topics(storage, targets, partitions=storage.kafka_partitions, append_time=False)

    async def ours() -> float:
        began = time.perf_counter()
        report = await replay(
            storage, stores, topic=source, target=targets[0], start=None, end=None
        )
        seconds = time.perf_counter() - began
        if report.records != count:
            raise RuntimeError(f"replay sent {report.records} records of {count}")
        return count / seconds

    # Replay knows each record's partition; so does the plain side (no key hashing in its clock).
    numbers = list(range(storage.kafka_partitions))
    partitioner = DefaultPartitioner()
    partitions = [partitioner(key, numbers, numbers) for key, _ in values]

    async def plain() -> float:
        began = time.perf_counter()
        async with started(create_producer(storage)) as producer:
            for (key, value), partition in zip(values, partitions, strict=True):
                # queued, delivery not awaited: all of them are awaited by flush()
                await producer.send(targets[1], value, key=key, partition=partition)
            await producer.flush()
        return count / (time.perf_counter() - began)

    return {"S3.replay": await in_turn(round_no, ours, plain)}


# --------------------------------------------------------------------------- the rows


async def in_turn(
    round_no: int, ours: Callable[[], Awaitable[float]], plain: Callable[[], Awaitable[float]]
) -> tuple[float, float]:
    """``(ours, plain)``, ours run first on even rounds and second on odd ones."""
    if round_no % 2 == 0:
        first = await ours()
        return first, await plain()
    second = await plain()
    return await ours(), second


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


async def storage_rows(settings: XietongSettings, options: Options, say: Progress) -> list[Row]:
    """S1.archive, S2.upload, S2.download, S3.replay; a group that fails says so, the others go
    on. The SeaweedFS servers and the service are stopped whatever happens."""
    rows = empty_rows(options)
    samples: dict[str, tuple[list[float], list[float]]] = {key: ([], []) for key in rows}
    failed: dict[str, str] = {}
    temp = Path(tempfile.mkdtemp(prefix="xietong-bench-storage-"))
    measured = False
    try:
        from services.storage.stores import open_stores

        async with contextlib.AsyncExitStack() as stack:
            storage = await stack.enter_async_context(storage_stage(settings, options, temp, say))
            stores = await stack.enter_async_context(open_stores(storage))
            measures: dict[str, Callable[[int], Awaitable[Pairs]]] = {
                "S1": lambda n: archive_pair(storage, stores, options.events, n),
                "S3": lambda n: replay_pair(storage, stores, options.events, options.timeout, n),
            }
            try:
                service = await stack.enter_async_context(
                    storage_service(storage, options, temp, say)
                )
            except Exception as error:
                log.exception("the storage service did not start")
                failed["S2"] = _reason(error)
            else:
                placed, size = FilePlacement(), options.file_mib * 1024 * 1024
                measures["S2"] = lambda n: transfer_pair(stores, service, size, placed, n)
            for round_no in range(options.warmup + options.repeats):
                kept = round_no >= options.warmup
                for group in GROUPS:
                    measure = measures.get(group)
                    if measure is None or group in failed:
                        continue
                    try:
                        pairs = await measure(round_no)
                    except Exception as error:  # one broken row must not sink the others
                        log.exception("%s failed", group)
                        failed[group] = _reason(error)
                        continue
                    figures = ", ".join(
                        f"{key} {a:,.1f} / {b:,.1f}" for key, (a, b) in pairs.items()
                    )
                    say(f"storage round {round_no}{'' if kept else ' (warm-up)'}: {figures}")
                    if kept:
                        for key, (a, b) in pairs.items():
                            samples[key][0].append(a)
                            samples[key][1].append(b)
            measured = True
    except Exception as error:  # the stores did not start (or did not stop)
        if measured:
            log.exception("stopping the storage rows' servers failed")
        else:
            log.exception("the storage rows failed")
            for group in GROUPS:
                failed.setdefault(group, _reason(error))
    finally:
        shutil.rmtree(temp, ignore_errors=True)

    sides = {
        "S1.archive": ("archive write path", "aioboto3 put_object", "MB/s"),
        "S2.upload": ("POST + PATCH + complete", "aioboto3 put_object", "MB/s"),
        "S2.download": ("GET, streamed", "aioboto3 get_object", "MB/s"),
        "S3.replay": ("replay()", "AIOKafkaProducer send + flush", "records/s"),
    }
    for group, keys in GROUPS.items():
        for key in keys:
            row = rows[key]
            if group in failed:
                row.status, row.reason = "error", failed[group]
                continue
            ours_label, plain_label, unit = sides[key]
            ours, plain = samples[key]
            paired(row, Side(ours_label, unit, ours), Side(plain_label, unit, plain))
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    from bench.harness import Options, Progress, measure
    from bench.results import table

    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__)
    parser.add_argument("--events", type=int, help="records archived and replayed (30000)")
    parser.add_argument("--file-mib", type=int, help="size of the uploaded file (32 MiB)")
    parser.add_argument("--repeats", type=int, help="measured repeats (5)")
    parser.add_argument("--warmup", type=int, help="warm-up rounds thrown away (1)")
    parser.add_argument("--quick", action="store_true", help="as python -m bench --quick")
    args = parser.parse_args(argv)
    options = (Options.quick() if args.quick else Options()).overridden(
        events=args.events, file_mib=args.file_mib, repeats=args.repeats, warmup=args.warmup
    )
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows, _ = measure(options, storage_rows, Progress())
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
