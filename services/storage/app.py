"""The storage service: the network's memory, in a public cloud, a private cloud, or both.

Consumes ``events.clean.v1`` and every insight topic (``insights.*.v1``) in the consumer group
``storage`` and archives them as Parquet with a manifest per object
(:mod:`services.storage.archive`), in the store the placement policy picks
(:mod:`services.storage.placement`); the control topics, to authenticate partners
(:class:`~shared.control.ControlRegistry`).

Produces: dead letters to ``<topic>.dlq`` (records that cannot be archived, with their bytes and
the reason), and objects in two S3 stores — ``public`` (the platform's S3 endpoint) and
``private`` (the network's own, another endpoint).

Delivery semantics: the archive is **exactly once** — each record lands in exactly one object
whatever crashes, rebalances and time-based flushes happen (objects named by offsets, commits
carry what a restart must skip; see :mod:`services.storage.segments`); dead letters are
at-least-once. Files are stored once their checksum matched; an upload is resumable from the
last byte that arrived.

Serves partners on ``XIETONG_STORAGE_HTTP_PORT`` (8085), each route but the health ones and a
signed link needing a tenant key: ``/v1/insights/history`` (:mod:`~services.storage.history`),
``/v1/files...`` (:mod:`~services.storage.files`), ``/v1/links`` (:mod:`~services.storage.links`),
``/v1/catalog`` (:mod:`~services.storage.catalog`); ``/healthz``, ``/readyz``, ``/metrics``.

A broker not there at start is waited for (the port opens once it answers); one that goes away
later is waited out by the archive loop (:mod:`services.storage.archive`), ``/readyz`` says so
within ``kafka_unready_after_seconds`` and the history answers 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiokafka.admin import AIOKafkaAdminClient

from schemas.topics import dlq
from services.storage.archive import ArchiveStatus, run_archive
from services.storage.catalog import CATALOG_KEY, get_catalog
from services.storage.files import FILES_KEY, FileStore, file_errors, setup_file_routes
from services.storage.handlers import SERVICE
from services.storage.history import HISTORY_KEY, History, insight_history
from services.storage.links import LINK_PREFIX, setup_link_routes
from services.storage.placement import Policy
from services.storage.reader import ArchiveReader
from services.storage.settings import StorageSettings
from services.storage.stores import open_stores
from shared.control import ControlRegistry
from shared.httpauth import REGISTRY_KEY, require_api_key
from shared.kafka import KafkaHealth, connection_config, ensure_topics, publishing, retrying
from shared.observability import add_health_routes

log = logging.getLogger(__name__)

SETTINGS_KEY = web.AppKey("settings", StorageSettings)
STATUS_KEY = web.AppKey("archive_status", ArchiveStatus)
STOP_KEY = web.AppKey("stop", asyncio.Event)
"""The process's stop (SIGTERM): a start still waiting for the broker gives up on it."""


async def storage_clients(app: web.Application) -> AsyncIterator[None]:
    """Own the stores, the registry, the producer, the archive loop and the upload sweeper."""
    settings = app[SETTINGS_KEY]
    status = app[STATUS_KEY]
    policy = Policy.load(settings.storage_policy_file)
    topics = list(settings.storage_topics)
    health = status.health = status.health or KafkaHealth.of(
        settings, loops=settings.storage_archive
    )
    stop = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(health.watching(settings))
        await retrying(  # a broker not there yet is waited for
            lambda: ensure_topics(settings, [*topics, *(dlq(t) for t in topics)]),
            what="creating the storage topics",
            health=health,
            stop=app.get(STOP_KEY),
        )
        stores = await stack.enter_async_context(open_stores(settings))
        registry = await stack.enter_async_context(ControlRegistry(settings))
        publisher = await stack.enter_async_context(publishing(settings))
        admin = AIOKafkaAdminClient(**connection_config(settings))
        await admin.start()
        stack.push_async_callback(admin.close)
        reader = ArchiveReader(stores)
        files = FileStore(settings, stores, policy)
        app[REGISTRY_KEY] = registry
        app[FILES_KEY] = files
        app[CATALOG_KEY] = reader
        app[HISTORY_KEY] = History(settings, reader, admin, settings.storage_group_id)
        tasks: list[asyncio.Task[Any]] = [
            asyncio.create_task(_sweep(files, stop), name="storage-upload-sweep")
        ]
        if settings.storage_archive:
            tasks.append(
                asyncio.create_task(
                    run_archive(
                        settings,
                        stores,
                        policy,
                        stop,
                        status=status,
                        publisher=publisher,
                    ),
                    name="storage-archive",
                )
            )
            tasks[-1].add_done_callback(lambda task: _report(task, status))
        else:
            status.started = True
        try:
            yield
        finally:
            stop.set()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    try:
                        async with asyncio.timeout(60):
                            await task
                    except TimeoutError:
                        task.cancel()
                    except Exception:
                        log.exception("storage task ended with an error")


def _report(task: asyncio.Task[Any], status: ArchiveStatus) -> None:
    if not task.cancelled() and task.exception() is not None:
        status.failure = f"the archive stopped: {task.exception()!r}"
        log.error("the archive stopped", exc_info=task.exception())


async def _sweep(files: FileStore, stop: asyncio.Event) -> None:
    interval = min(60.0, files.settings.storage_upload_expiry_seconds / 4)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
        if stop.is_set():
            return
        try:
            await files.expire()
        except Exception:  # the sweep retries next time; uploads are never lost by it failing
            log.exception("expiring abandoned uploads failed")


def create_app(
    settings: StorageSettings,
    status: ArchiveStatus | None = None,
    *,
    stop: asyncio.Event | None = None,
) -> web.Application:
    app = web.Application(
        middlewares=[file_errors, require_api_key(public_prefixes=[LINK_PREFIX])],
        client_max_size=1024**2,
    )
    app[SETTINGS_KEY] = settings
    app[STATUS_KEY] = status if status is not None else ArchiveStatus()
    if stop is not None:
        app[STOP_KEY] = stop
    app.cleanup_ctx.append(storage_clients)

    async def ready() -> str | None:
        if REGISTRY_KEY not in app:
            return "starting"
        return app[REGISTRY_KEY].problem() or app[STATUS_KEY].problem()

    add_health_routes(app, SERVICE, ready)
    app.router.add_get("/v1/insights/history", insight_history)
    app.router.add_get("/v1/catalog", get_catalog)
    setup_file_routes(app)
    setup_link_routes(app)
    return app
