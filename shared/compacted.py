"""A continuously updated in-memory view of compacted topics that fails closed.

The control plane (:class:`shared.control.ControlRegistry`) and the model registry
(:class:`shared.models.ModelRegistry`) are both "read every record of a few compacted topics,
keep the latest value per key, and know whether that is still current". This is that part, once.

- :meth:`CompactedView.follow` reads the topics from the beginning up to where they end at that
  moment, then keeps tailing them in a background task that never dies silently: a failure is
  logged, kept as the reason, and retried with back-off.
- Every ``control_sync_interval_seconds`` the tail asks the broker where the topics end and, once
  it has read up to there, records that moment as :attr:`CompactedView.synced_at`. A change
  acknowledged by Kafka at time ``t`` is therefore applied by the first sync that starts after
  ``t``: within one interval plus one fetch.
- :meth:`CompactedView.problem` says why the view cannot be vouched for when no sync completed
  for ``control_max_staleness_seconds`` (broker away, tail failing); callers fail closed on it.
- Waiting for a change (:meth:`CompactedView.wait_changed`) holds no lock: each change sets the
  event the waiters of that moment hold and replaces it, so a waiter cancelled at any point (a
  stream whose client went away) can never stop the view from applying the next change.
- :meth:`CompactedView.caught_up` waits (asking for a sync at once) until everything written
  before a given wall-clock moment has been read; :meth:`CompactedView.current` is that for now.
- Keyless records are skipped and logged here; a subclass's :meth:`CompactedView.take` applies
  one keyed record (and skips what it cannot read or what is filed under another id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from shared.kafka import kafka_problem, topic_partitions
from shared.settings import XietongSettings

log = logging.getLogger(__name__)

Where = dict[str, Any]
"""Topic, partition and offset of a record, for the log."""


def wall_ms() -> int:
    return int(time.time() * 1000)


class CompactedView:
    """The latest value per key of ``topics``, kept current by a background tail."""

    what = "view"
    """What the view is called in its log lines and in :meth:`problem` ("control registry")."""

    def __init__(self, settings: XietongSettings, topics: Iterable[str]) -> None:
        self.settings = settings
        self.topics = tuple(topics)
        self.version = 0
        """Bumped on every batch applied and every completed sync."""
        self.synced_at: float | None = None
        """Monotonic time at which the last completed sync started (None: never synced)."""
        self.synced_wall_ms = 0
        """The same moment on the wall clock (ms): everything written before it has been read."""
        self.positions: dict[TopicPartition, int] = {}
        """How far the view has read each partition."""
        self._failure: str | None = None
        self._changed = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []
        self._task: asyncio.Task[None] | None = None
        self._next_sync = 0.0

    # ------------------------------------------------------------------ what a subclass adds

    def take(self, record: ConsumerRecord[bytes, bytes], key: str, where: Where) -> None:
        """Apply one keyed record (``record.value`` None is a tombstone)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ lifecycle

    async def follow(self, consumer: AIOKafkaConsumer) -> None:
        """Load everything written so far with ``consumer`` (started, no group), then tail."""
        self._consumer = consumer
        self._partitions = [
            tp for topic in self.topics for tp in await topic_partitions(consumer, topic)
        ]
        consumer.assign(self._partitions)
        await consumer.seek_to_beginning(*self._partitions)
        started, started_ms = time.monotonic(), wall_ms()
        end = await consumer.end_offsets(self._partitions)
        while any([await consumer.position(tp) < offset for tp, offset in end.items()]):
            self.apply(await consumer.getmany(timeout_ms=200))
        await self._note_positions(consumer)
        self._synced(started, started_ms)
        self._task = asyncio.create_task(self._tail(), name=f"{self.what}-tail")
        self._task.add_done_callback(self._report_end)

    async def stop_following(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _tail(self) -> None:
        """Follow the topics for ever; a failure is logged, reported and retried, never final."""
        backoff = 0.5
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # anything: the view goes stale and says why
                self._failure = f"{self.what} cannot follow its topics: {error!r}"
                if isinstance(error, KafkaError | OSError | TimeoutError):
                    # the broker away: one line (repeats collapsed), not a traceback each time
                    log.warning(
                        "%s cannot follow its topics: %s",
                        self.what,
                        kafka_problem(error, self.settings.kafka_bootstrap_servers),
                    )
                else:
                    log.error(self._failure, exc_info=error)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _follow(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        interval = self.settings.control_sync_interval_seconds
        # Asking for the ends must not hang the loop for the client's whole request timeout.
        ask_timeout = max(interval, self.settings.control_max_staleness_seconds / 2)
        target: dict[TopicPartition, int] | None = None
        asked_at, asked_ms = 0.0, 0
        while True:
            if target is None and time.monotonic() >= self._next_sync:
                asked_at, asked_ms = time.monotonic(), wall_ms()
                async with asyncio.timeout(ask_timeout):
                    target = await consumer.end_offsets(self._partitions)
                self._next_sync = asked_at + interval
            batch = await consumer.getmany(timeout_ms=min(200, int(interval * 1000)))
            if batch:
                self.apply(batch)
            await self._note_positions(consumer)
            if target is not None and all(
                self.positions[tp] >= offset for tp, offset in target.items()
            ):
                target = None
                self._synced(asked_at, asked_ms)

    async def _note_positions(self, consumer: AIOKafkaConsumer) -> None:
        for tp in self._partitions:
            self.positions[tp] = await consumer.position(tp)

    def _synced(self, started: float, started_ms: int) -> None:
        self.synced_at, self.synced_wall_ms, self._failure = started, started_ms, None
        self._notify()

    def _report_end(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._failure = f"{self.what} stopped: {task.exception()!r}"
            log.error(self._failure, exc_info=task.exception())

    # ------------------------------------------------------------------ applying and waiting

    def apply(self, batch: dict[TopicPartition, list[Any]]) -> None:
        """Apply a fetched batch (keyless records skipped) and wake the waiters."""
        for tp, records in batch.items():
            for record in records:
                where = {"topic": tp.topic, "partition": tp.partition, "offset": record.offset}
                if record.key is None:  # not ours: every record here is keyed by its id
                    log.error(f"{self.what} record without a key skipped", extra=where)
                    continue
                self.take(record, record.key.decode(errors="replace"), where)
        self._notify()

    def _notify(self) -> None:
        self.version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_changed(self, seen_version: int, timeout: float) -> int:
        """Wait until the view moved past ``seen_version`` (or ``timeout``); return it.

        Safe to cancel at any point: it holds nothing another task needs."""
        if self.version <= seen_version:
            event = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await event.wait()
        return self.version

    async def caught_up(self, moment_ms: int, timeout: float = 30.0) -> None:
        """Return once the view holds everything written before ``moment_ms`` (wall clock; a
        moment ahead of now counts as now), asking the tail for a sync at once rather than at
        its next interval; ``TimeoutError`` after ``timeout`` seconds. Safe to cancel."""
        moment_ms = min(moment_ms, wall_ms())
        async with asyncio.timeout(timeout):
            while self.synced_wall_ms < moment_ms:
                self._next_sync = 0.0
                await self.wait_changed(self.version, timeout)

    async def current(self, timeout: float = 10.0) -> None:
        """Return once the view holds every write acknowledged before this call."""
        await self.caught_up(wall_ms(), timeout)

    def problem(self) -> str | None:
        """Why the view cannot be vouched for as current right now, or None."""
        if self.synced_at is None:
            return f"{self.what} has not loaded its topics yet"
        age = time.monotonic() - self.synced_at
        if age > self.settings.control_max_staleness_seconds:
            reason = self._failure or "the broker has not confirmed its topics' end"
            return f"{self.what} not confirmed current for {age:.0f} s ({reason})"
        return None
