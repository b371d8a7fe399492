"""The analytics service: clean events in, statistics, correlations, benchmarks and clusters out.

Consumes ``events.clean.v1`` (:class:`schemas.events.CleanEvent`, key = tenant) and the tenant
registry (``control.tenants.v1``, for each firm's industry and region). Produces
:class:`~schemas.insights.Statistics` and :class:`~schemas.insights.Correlation` (private to the
firm), :class:`~schemas.insights.Benchmark` (public, owner ``network``) and
:class:`~schemas.insights.ClusterAssignment` (private to the firm) to their topics in
:data:`schemas.topics.INSIGHT_TOPICS`, keyed by the owner tenant. Records it cannot read go to
``events.clean.v1.dlq`` with the reason.

Two loops run in one process:

1. **Firm windows** (high rate; aiokafka batch loop, consumer group ``analytics``): ``getmany`` on
   the clean topic, each event put in its event-time tumbling windows (default one hour, a daily
   UTC window on request) per firm (:mod:`.windows`). When the firm's watermark (its largest
   event time minus the grace period: one firm's clock never moves another firm's windows)
   passes a window's end, the window closes: ``describe()`` of each metric and ``corr`` of the
   metrics are computed with pandas and published, and a summary of the window (per metric count
   and sum) goes to the internal one-partition topic ``analytics.firm-windows.v1``, followed by
   the partition's network watermark: the smallest of its firms' watermarks that are waited for
   (not quiet, not far behind the others; a firm ahead cannot close network windows early).
   An event whose window has already closed (a back-fill, a file drop) restates it: the
   window's rows are kept on disk for ``analytics_restatement_days`` (:mod:`.restatements`) and
   its statistics and correlation are published again as the next revision; what cannot be
   restated (beyond the horizon, state lost) is counted (``xietong_analytics_late_events_total``),
   logged and dropped. Benchmarks are never revised.
2. **Network** (low rate; consumer group ``analytics-network`` on the one-partition internal
   topic, so one replica does it): collects the firm summaries; once every source partition's
   watermark passed a window's end (a partition that never had an event, or whose firms have all
   sent nothing for ``analytics_quiet_partition_seconds``, is not waited for until one of them
   speaks again), computes that window's benchmarks per industry, region and
   metric (differentially private figures, published only if at least ``k`` firms contributed:
   :mod:`.disclosure`), and every ``cluster_refit_windows`` complete windows refits KMeans on
   the firms' KPI means over the recent period and sends every firm its assignment.

Delivery semantics: **at-least-once, idempotent insights**. Nothing is committed before the
insights and summaries it produced were acknowledged by Kafka (``acks=all``). Window state needs
no store: the firm loop commits, per partition, the first offset of its oldest open window with
every firm's watermark in the commit metadata, so a restarted (or rebalanced) worker
re-reads exactly the span that rebuilds its open windows, and windows closed before the crash
stay closed. The network loop, on getting its partition, re-reads the internal topic up to its
committed offset without publishing, which rebuilds its state, then goes on. Anything
re-published after a restart has the same deterministic ``insight_id`` (a keyed hash, under the
network secret, of type, tenant, metric and window; of the fit for clusters) and the same
content, benchmark noise included: consumers de-duplicate by id.

When the broker goes away both loops wait for it and carry on by themselves: a publish or a
commit that fails with a Kafka error is tried again on the same output (the ids make that
safe; a producer whose idempotence state broke is replaced), and readiness says so while a loop
makes no progress with the broker (:class:`shared.kafka.KafkaHealth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, IllegalStateError
from prometheus_client import Counter

from schemas.insights import Insight
from schemas.topics import EVENTS_CLEAN, INSIGHT_TOPICS, dlq
from services.analytics.handlers import (
    SERVICE,
    NetworkConfig,
    NetworkState,
    Origin,
    Segment,
    firm_summary,
    service_version,
    watermark_mark,
    window_insights,
)
from services.analytics.restatements import RestatementStore, revise
from services.analytics.settings import AnalyticsSettings, load_analytics_settings
from services.analytics.windows import (
    LateEvent,
    PartitionWindows,
    Window,
    WindowEvent,
    decode_metadata,
)
from shared.codec import decode, encode
from shared.control import ControlRegistry
from shared.deadletter import dead_letter_record, record_dead_letter
from shared.kafka import (
    Batch,
    BatchPublisher,
    KafkaHealth,
    OutRecord,
    commit_offsets,
    committed_points,
    connection_config,
    create_consumer,
    ensure_topics,
    publishing,
    retrying,
    started,
    stop_on_signals,
)
from shared.logs import configure_logging
from shared.observability import serve_health

log = logging.getLogger(__name__)

EVENTS = Counter("xietong_analytics_events_total", "Clean events read by analytics.")
LATE_EVENTS = Counter(
    "xietong_analytics_late_events_total",
    "Events dropped because their window had closed and could not be restated.",
    ["window_seconds"],
)
RESTATED_EVENTS = Counter(
    "xietong_analytics_restated_events_total",
    "Late events that restated their closed window (a new revision of its insights).",
    ["window_seconds"],
)
DEAD_LETTERS = Counter("xietong_analytics_dead_letters_total", "Clean records analytics refused.")
INSIGHTS = Counter("xietong_analytics_insights_total", "Insights published.", ["type"])


# --------------------------------------------------------------------------- decoding


def parse_clean_event(offset: int, value: bytes | None) -> WindowEvent:
    """The fields analytics needs of a clean event; ``ValueError`` says why it is unusable.

    A light check rather than a full model validation: the clean service wrote these records
    with the contract, and this is the service's hot path.
    """
    if value is None:
        raise ValueError("empty record")
    data = decode(value)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    tenant, event_type, version = data.get("tenant"), data.get("type"), data.get("schema_version")
    if not isinstance(tenant, str) or not tenant:
        raise ValueError("tenant missing")
    if not isinstance(event_type, str) or not isinstance(version, int):
        raise ValueError("type or schema_version missing")
    raw_time = data.get("occurred_at")
    if not isinstance(raw_time, str):
        raise ValueError("occurred_at missing")
    occurred = datetime.fromisoformat(raw_time)
    if occurred.tzinfo is None:
        raise ValueError("occurred_at has no UTC offset")
    metrics = data.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ValueError("metrics is not an object")
    clean: dict[str, float] = {}
    for name, number in metrics.items():
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ValueError(f"metric {name!r} is not a number")
        clean[name] = float(number)
    source = data.get("source")
    operation = source.get("operation") if isinstance(source, dict) else None
    corrects = data.get("corrects")
    return WindowEvent(
        offset=offset,
        tenant=tenant,
        time_ms=int(occurred.timestamp() * 1000),
        event_type=event_type,
        schema_version=version,
        metrics=clean,
        event_id=str(data.get("event_id") or ""),
        corrects=str(corrects) if corrects else None,
        deleted=operation == "delete",
    )


def insight_records(insights: Sequence[Insight]) -> dict[str, list[OutRecord]]:
    """Insights by topic, keyed by their owner."""
    out: dict[str, list[OutRecord]] = defaultdict(list)
    for insight in insights:
        out[INSIGHT_TOPICS[insight.type]].append(
            OutRecord(insight.tenant.encode(), encode(insight))
        )
    return out


# --------------------------------------------------------------------------- firm windows


_UNREPORTED = object()
"""A partition whose network watermark has not been reported since this worker got it."""


@dataclass
class FirmWindows:
    """The per-firm side: windows per source partition, what closes, what to commit."""

    settings: AnalyticsSettings
    source: str
    origin: Origin
    partitions: int = 1
    states: dict[TopicPartition, PartitionWindows] = field(default_factory=dict)
    restored_at: dict[TopicPartition, float] = field(default_factory=dict)
    heard_at: dict[TopicPartition, dict[str, float]] = field(default_factory=dict)
    """Monotonic time each firm's latest event was read (quiet firms are found with it)."""
    quiet: dict[TopicPartition, set[str]] = field(default_factory=dict)
    """The firms of each partition found quiet, until they send again."""
    store: RestatementStore | None = None
    """Closed windows on disk, for restating them (None: late events are dropped)."""
    unconfirmed: list[tuple[TopicPartition, Window]] = field(default_factory=list)
    """Revisions handed out for publishing, to mark published once Kafka acknowledged them."""
    pending: list[tuple[TopicPartition, Window]] = field(default_factory=list)
    """Revisions found unpublished on restore: published with the next output."""
    _revised: list[Window] = field(default_factory=list)
    reported: dict[TopicPartition, object] = field(default_factory=dict)
    """The network watermark last reported per partition (None: idle). A partition restored
    but not yet reported says its watermark even if it did not move: the previous owner may
    have reported it idle."""
    unrestored: dict[TopicPartition, int] = field(default_factory=dict)
    """Partitions the last :meth:`process` left alone for want of a restored state (a batch
    fetched during a rebalance), with the offset their records started at: read them again."""

    def restore(self, tp: TopicPartition, metadata: str | None, offset: int | None = None) -> None:
        """Fresh state of ``tp`` from its commit's metadata; ``offset`` is the committed offset
        (where reading resumes), so a partition with nothing new can still be found quiet."""
        full = None if self.store is None else self.store.full_metadata(self.source, tp.partition)
        state = PartitionWindows.restore(
            self.settings.window_sizes,
            self.settings.analytics_grace_seconds * 1000,
            metadata,
            full,
        )
        if self.store is not None:
            state.store_token = self.store.claim(self.source, tp.partition, state.committed_token)
            self.pending += [(tp, w) for w in self.store.pending(self.source, tp.partition)]
        if offset is not None and state.heard_of:
            state.next_offset = offset
        self.states[tp] = state
        self.restored_at[tp] = time.monotonic()
        self.heard_at[tp] = {}
        self.quiet[tp] = set()
        self.reported[tp] = _UNREPORTED

    def drop(self, tp: TopicPartition) -> None:
        self.states.pop(tp, None)
        self.restored_at.pop(tp, None)
        self.heard_at.pop(tp, None)
        self.quiet.pop(tp, None)
        self.reported.pop(tp, None)

    def quiet_firms(self, tp: TopicPartition, caught_up: bool) -> set[str]:
        """Firms of ``tp`` that have sent nothing for ``analytics_quiet_partition_seconds``
        while the partition is caught up (behind, a firm's events may still be on their way)."""
        state = self.states[tp]
        if not caught_up:
            return set()
        now, limit = time.monotonic(), self.settings.analytics_quiet_partition_seconds
        restored = self.restored_at.get(tp, now)
        heard = self.heard_at.get(tp, {})
        return {t for t in state.watermarks if now - heard.get(t, restored) >= limit}

    def _mark(self, tp: TopicPartition, watermark: int | None) -> list[OutRecord]:
        """The partition's network watermark, when it is news."""
        if self.reported.get(tp, _UNREPORTED) == watermark:
            return []
        self.reported[tp] = watermark
        mark = watermark_mark(self.source, tp.partition, self.partitions, watermark)
        return [OutRecord(b"network", encode(mark))]

    def network_watermark(self, tp: TopicPartition, quiet: set[str]) -> int | None:
        state = self.states[tp]
        lag_ms = int(self.settings.analytics_firm_max_lag_seconds * 1000)
        return state.network_watermark(set(state.watermarks) - quiet, lag_ms)

    def idle(
        self,
        assigned: set[TopicPartition],
        end_of: Callable[[TopicPartition], int | None],
        *,
        fetched_nothing: bool,
        now: datetime,
    ) -> dict[str, list[OutRecord]]:
        """What time alone produces, by topic:

        - a partition that never had an event is reported idle (watermark None)
          ``analytics_idle_partition_seconds`` after this worker got it, when a ``getmany`` came
          back empty (``fetched_nothing``: caught up);
        - a firm that has sent nothing for ``analytics_quiet_partition_seconds`` while its
          partition is caught up (``end_of``: its end offset as last fetched) is *quiet*: its
          windows that ended (by the wall clock ``now``) more than the grace period ago are
          closed, and the partition's network watermark no longer waits for it (all quiet:
          idle). Its next event makes it waited for again; events for windows closed meanwhile
          are late.
        """
        s = self.settings
        out: dict[str, list[OutRecord]] = defaultdict(list)
        closed: list[Window] = []
        summaries = out[s.analytics_firm_windows_topic]
        for tp in sorted(assigned):
            state = self.states.get(tp)
            if state is None:
                continue
            if not state.heard_of:
                waited = time.monotonic() - self.restored_at.get(tp, time.monotonic())
                if fetched_nothing and waited >= s.analytics_idle_partition_seconds:
                    summaries += self._mark(tp, None)
                continue
            end = end_of(tp)
            caught_up = end is not None and state.next_offset is not None
            caught_up = caught_up and state.next_offset >= end  # type: ignore[operator]
            quiet = self.quiet[tp] = self.quiet_firms(tp, caught_up)
            upto = int(now.timestamp() * 1000) - s.analytics_grace_seconds * 1000
            if any([state.close_quiet(t, upto) for t in sorted(quiet & state.open_tenants())]):
                log.info(
                    "quiet firms' windows closed",
                    extra={"partition": tp.partition, "firms": len(quiet)},
                )
                done = state.close_due()
                self._keep_closed(tp, done)
                for window in done:
                    closed.append(window)
                    summaries.append(
                        OutRecord(b"network", encode(firm_summary(window, self.source)))
                    )
            summaries += self._mark(tp, self.network_watermark(tp, quiet))
        self._take_pending()
        self._publish_insights(closed, now, out)
        return out

    def _publish_insights(
        self, closed: list[Window], produced_at: datetime, out: dict[str, list[OutRecord]]
    ) -> None:
        # one grouped pandas computation for every window closed at once
        s = self.settings
        insights = window_insights(
            closed,
            self.origin,
            produced_at,
            align_s=s.analytics_correlation_align_seconds,
            min_points=s.analytics_correlation_min_points,
        )
        for window in self._revised:
            insights += revise(
                window_insights(
                    [window],
                    self.origin,
                    produced_at,
                    align_s=s.analytics_correlation_align_seconds,
                    min_points=s.analytics_correlation_min_points,
                ),
                window.revision,
            )
        self._revised = []
        for topic, records_out in insight_records(insights).items():
            out[topic] += records_out

    def _keep_closed(self, tp: TopicPartition, closed: list[Window]) -> None:
        """Closed windows go to the store (those beyond the horizon leave it)."""
        if self.store is None:
            return
        horizon_ms = int(self.settings.analytics_restatement_days * 86_400_000)
        for window in closed:
            self.store.keep_closed(self.source, tp.partition, window)
            self.store.forget_before(
                self.source, tp.partition, window.tenant, window.size_s, window.end_ms - horizon_ms
            )

    def _restate(self, tp: TopicPartition, state: PartitionWindows, late: list[LateEvent]) -> None:
        """Late events into their stored windows; what cannot be restated is counted and
        logged with the reason."""
        restated: dict[tuple[int, str, int], Window] = {}
        dropped: dict[tuple[int, str], int] = defaultdict(int)
        horizon_ms = int(self.settings.analytics_restatement_days * 86_400_000)
        for item in late:
            event, (size, tenant, start) = item.event, item.key
            window = restated.get(item.key)
            if window is None and self.store is not None:
                window = self.store.get(self.source, tp.partition, item.key)
            closed_through = state.watermark_of(tenant) or 0
            closed_through -= closed_through % state.unit_ms
            if window is None or start + size * 1000 + horizon_ms <= closed_through:
                if not event.deleted:
                    reason = (
                        "its window is beyond the restatement horizon"
                        if window is not None or start + size * 1000 + horizon_ms <= closed_through
                        else "its window is not kept here (it had no row of the firm, or "
                        "closed before this worker's state: a new disk, a moved partition)"
                    )
                    dropped[(size, reason)] += 1
                continue
            if event.event_id and event.event_id in window.seen_ids:
                continue  # restated with it already (read again after a restart)
            if event.corrects is not None:
                window.remove(item.row)
            if event.deleted:
                if event.event_id:
                    window.seen_ids.add(event.event_id)
            else:
                window.add(event, item.row)
                RESTATED_EVENTS.labels(str(size)).inc()
            restated[item.key] = window
        for (size, reason), count in dropped.items():
            LATE_EVENTS.labels(str(size)).inc(count)
            log.warning(
                "late events dropped: " + reason,
                extra={"partition": tp.partition, "window_seconds": size, "count": count},
            )
        for window in restated.values():
            window.revision += 1
            assert self.store is not None
            self.store.put_revision(self.source, tp.partition, window)
            self._revised.append(window)
            self.unconfirmed.append((tp, window))
        if restated:
            log.info(
                "closed windows restated with late events",
                extra={"partition": tp.partition, "windows": len(restated)},
            )

    def _take_pending(self) -> None:
        for tp, window in self.pending:
            if tp in self.states:
                self._revised.append(window)
                self.unconfirmed.append((tp, window))
        self.pending = []

    def confirm(self) -> None:
        """Kafka acknowledged what was handed out: the revisions are published."""
        if self.store is not None:
            for tp, window in self.unconfirmed:
                self.store.published(self.source, tp.partition, [window])
        self.unconfirmed = []

    def process(self, batch: Batch, produced_at: datetime) -> dict[str, list[OutRecord]]:
        """Everything one ``getmany`` batch produces, by topic."""
        s = self.settings
        out: dict[str, list[OutRecord]] = defaultdict(list)
        closed: list[Window] = []
        self.unrestored = {}
        for tp, records in batch.items():
            state = self.states.get(tp)
            if state is None:
                # Fetched while a rebalance is under way (revoked, not yet assigned again): its
                # state comes from the commit once the listener restores it, and these records
                # are read again from there. Starting it afresh here would drop the committed
                # firm watermarks and windows of everything before these records.
                self.unrestored[tp] = records[0].offset
                continue
            heard = self.heard_at.setdefault(tp, {})
            now = time.monotonic()
            heard_now: set[str] = set()
            for record in records:
                try:
                    event = parse_clean_event(record.offset, record.value)
                except (ValueError, TypeError) as error:
                    state.next_offset = record.offset + 1
                    letter = record_dead_letter(
                        record, f"unreadable clean event: {error}", service=SERVICE
                    )
                    out[dlq(self.source)].append(dead_letter_record(letter))
                    DEAD_LETTERS.inc()
                    continue
                heard[event.tenant] = now
                heard_now.add(event.tenant)
                state.add(event)
            EVENTS.inc(len(records))
            self._restate(tp, state, state.take_late())
            summaries = out[s.analytics_firm_windows_topic]
            done = state.close_due()
            self._keep_closed(tp, done)
            for window in done:
                closed.append(window)
                summaries.append(OutRecord(b"network", encode(firm_summary(window, self.source))))
            # the firms just read are not quiet any more; which others are, time alone says
            quiet = self.quiet[tp] = self.quiet.get(tp, set()) - set(heard_now)
            summaries += self._mark(tp, self.network_watermark(tp, quiet))
        self._take_pending()
        self._publish_insights(closed, produced_at, out)
        return out

    def commit_points(self, assigned: set[TopicPartition]) -> dict[TopicPartition, tuple[int, str]]:
        points = {}
        for tp, state in self.states.items():
            point = state.commit_point(self.settings.analytics_commit_metadata_max_bytes)
            if tp in assigned and point is not None:
                points[tp] = point
                if state.full_metadata is not None and self.store is not None:
                    reference = str(decode_metadata(point[1]).get("n"))
                    self.store.keep_full_metadata(
                        self.source, tp.partition, reference, state.full_metadata
                    )
        return points


class _RestoreWindows(ConsumerRebalanceListener):  # type: ignore[misc]
    """Partitions handed over: drop their state, or rebuild it from the committed metadata."""

    def __init__(self, worker: FirmWindows, admin: AIOKafkaAdminClient, group: str) -> None:
        self.worker, self.admin, self.group = worker, admin, group

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            self.worker.drop(tp)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if not assigned:
            return
        self.worker.partitions = max(self.worker.partitions, *(tp.partition + 1 for tp in assigned))
        committed = await committed_points(
            self.admin, self.group, assigned, what="reading the firm windows' commit points"
        )
        for tp, point in committed.items():
            if point is not None:
                self.worker.restore(tp, point[1], point[0])
            else:
                self.worker.restore(tp, None)
        log.info(
            "firm windows restored", extra={"partitions": sorted(tp.partition for tp in assigned)}
        )


async def run_firm_windows(
    settings: AnalyticsSettings,
    stop: asyncio.Event,
    source: str,
    publisher: BatchPublisher,
    origin: Origin,
    health: KafkaHealth | None = None,
) -> None:
    def publish(out: dict[str, Sequence[OutRecord]], what: str) -> Any:
        return retrying(
            lambda: publisher.publish_many(out),
            what=what,
            health=health,
            stop=stop,
            publisher=publisher,
        )

    async def commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, Any]) -> None:
        # a commit refused after a rebalance: the new owner re-reads from the last commit and
        # re-publishes the same (idempotent) insights
        await commit_offsets(consumer, offsets, what="firm window commit", health=health, stop=stop)

    store = RestatementStore(Path(settings.state_dir) / "analytics-restatements")
    worker = FirmWindows(settings, source, origin, store=store)
    admin = AIOKafkaAdminClient(**connection_config(settings))
    await admin.start()
    try:
        async with started(create_consumer(settings, settings.analytics_group_id)) as consumer:
            consumer.subscribe(
                [source], listener=_RestoreWindows(worker, admin, settings.analytics_group_id)
            )
            while not stop.is_set():
                batch = await consumer.getmany(
                    timeout_ms=settings.kafka_fetch_timeout_ms,
                    max_records=settings.kafka_fetch_max_records,
                )
                worker.partitions = (
                    len(consumer.partitions_for_topic(source) or ()) or worker.partitions
                )
                idle = worker.idle(
                    consumer.assignment(),
                    consumer.highwater,
                    fetched_nothing=not batch,
                    now=datetime.now(UTC),
                )
                if any(idle.values()):
                    await publish(dict(idle.items()), "quiet firms' windows")
                    worker.confirm()
                    if not batch:  # quiet firms' windows closed: the commit moves on
                        await commit(consumer, worker.commit_points(consumer.assignment()))
                if not batch:
                    if health is not None:
                        health.progress()
                    continue
                try:
                    out = worker.process(batch, datetime.now(UTC))
                    for tp, offset in worker.unrestored.items():
                        log.info(
                            "records of a partition being handed over read again once restored",
                            extra={"partition": tp.partition},
                        )
                        if tp in consumer.assignment():
                            consumer.seek(tp, offset)
                    await publish(dict(out.items()), "firm window batch")
                    worker.confirm()
                except Exception:
                    log.exception(
                        "firm window batch failed; stopping without commit", extra=_where(batch)
                    )
                    raise
                await commit(consumer, worker.commit_points(consumer.assignment()))
    finally:
        await admin.close()
        store.close()


def _where(batch: Batch) -> dict[str, Any]:
    return {
        "batch": {
            f"{tp.topic}[{tp.partition}]": [records[0].offset, records[-1].offset]
            for tp, records in batch.items()
        }
    }


# --------------------------------------------------------------------------- network


def network_config(settings: AnalyticsSettings) -> NetworkConfig:
    return NetworkConfig(
        main_size_s=settings.analytics_window_seconds,
        retain_windows=settings.analytics_retain_windows,
        benchmark_min_firms=settings.benchmark_min_firms,
        benchmark_epsilon=settings.benchmark_epsilon,
        benchmark_bounds=settings.metric_bounds(),
        benchmark_metrics=tuple(settings.benchmark_metrics),
        cluster_metrics=tuple(settings.cluster_metrics),
        cluster_k_min=settings.cluster_k_min,
        cluster_k_max=settings.cluster_k_max,
        cluster_seed=settings.cluster_seed,
        cluster_n_init=settings.cluster_n_init,
        cluster_period_windows=settings.cluster_period_windows,
        cluster_refit_windows=settings.cluster_refit_windows,
        cluster_min_profile_firms=settings.cluster_min_profile_firms,
        cluster_profile_epsilon=settings.cluster_profile_epsilon,
    )


def segment_lookup(registry: ControlRegistry) -> Any:
    """Tenant -> (industry, region) from the registry; None for firms not benchmarkable."""

    def segment_of(tenant: str) -> Segment | None:
        record = registry.tenant(tenant)
        if record is None or record.kind != "partner":
            return None
        if record.industry == "unknown" or record.region == "unknown":
            return None
        return record.industry, record.region

    return segment_of


@dataclass
class Network:
    settings: AnalyticsSettings
    origin: Origin
    registry: ControlRegistry
    state: NetworkState | None = None

    def fresh(self) -> NetworkState:
        self.state = NetworkState(network_config(self.settings), self.origin)
        return self.state

    def process(self, values: Sequence[bytes | None], *, emit: bool) -> list[Insight]:
        state = self.state or self.fresh()
        segment_of = segment_lookup(self.registry)
        insights: list[Insight] = []
        produced_at = datetime.now(UTC)
        for value in values:
            try:
                message = decode(value) if value is not None else None
            except ValueError:
                message = None
            if not isinstance(message, dict):
                log.error("unreadable firm-window record skipped")
                continue
            insights += state.apply(message, segment_of, emit=emit, produced_at=produced_at)
        return insights


class _ReplayNetwork(ConsumerRebalanceListener):  # type: ignore[misc]
    """On getting the internal partition: rebuild the state by re-reading up to the commit."""

    def __init__(self, network: Network, admin: AIOKafkaAdminClient, group: str) -> None:
        self.network, self.admin, self.group = network, admin, group

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if revoked:
            self.network.state = None

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if not assigned:
            return
        self.network.fresh()
        committed = await committed_points(
            self.admin, self.group, assigned, what="reading the network's commit point"
        )
        settings = self.network.settings
        for tp in sorted(assigned):
            point = committed[tp]
            upto = point[0] if point is not None else 0
            if upto == 0:
                continue
            replayed = 0
            async with started(create_consumer(settings, None)) as reader:
                reader.assign([tp])
                await reader.seek_to_beginning(tp)
                while await reader.position(tp) < upto:
                    got = await reader.getmany(tp, timeout_ms=settings.kafka_fetch_timeout_ms)
                    values = [r.value for r in got.get(tp, []) if r.offset < upto]
                    replayed += len(values)
                    await asyncio.to_thread(self.network.process, values, emit=False)
            log.info("network state rebuilt", extra={"records": replayed, "upto": upto})


async def run_network(
    settings: AnalyticsSettings,
    stop: asyncio.Event,
    publisher: BatchPublisher,
    registry: ControlRegistry,
    origin: Origin,
    health: KafkaHealth | None = None,
) -> None:
    network = Network(settings, origin, registry)
    admin = AIOKafkaAdminClient(**connection_config(settings))
    await admin.start()
    try:
        group = settings.analytics_network_group_id
        async with started(create_consumer(settings, group)) as consumer:
            consumer.subscribe(
                [settings.analytics_firm_windows_topic],
                listener=_ReplayNetwork(network, admin, group),
            )
            while not stop.is_set():
                batch = await consumer.getmany(
                    timeout_ms=settings.kafka_fetch_timeout_ms,
                    max_records=settings.kafka_fetch_max_records,
                )
                if not batch:
                    if health is not None:
                        health.progress()
                    continue
                values = [r.value for _, records in sorted(batch.items()) for r in records]
                try:
                    # KMeans may take a moment: keep the event loop (and the firm loop) moving.
                    insights = await asyncio.to_thread(network.process, values, emit=True)
                    out = dict(insight_records(insights).items())
                    await retrying(
                        lambda out=out: publisher.publish_many(out),  # type: ignore[misc]
                        what="network batch",
                        health=health,
                        stop=stop,
                        publisher=publisher,
                    )
                except Exception:
                    log.exception(
                        "network batch failed; stopping without commit", extra=_where(batch)
                    )
                    raise
                for insight in insights:
                    INSIGHTS.labels(insight.type).inc()
                with contextlib.suppress(CommitFailedError, IllegalStateError):
                    await retrying(consumer.commit, what="network commit", health=health, stop=stop)
    finally:
        await admin.close()


# --------------------------------------------------------------------------- the service


async def run_analytics(
    settings: AnalyticsSettings,
    stop: asyncio.Event,
    *,
    source: str = EVENTS_CLEAN,
    ready: asyncio.Event | None = None,
    health: KafkaHealth | None = None,
) -> None:
    """Run both loops until ``stop`` is set (each finishes its batch and commits), or until one
    of them fails (then the other is cancelled and the error propagates). A broker not there
    yet is waited for; ``health`` (optional) hears from both loops."""

    async def create_topics() -> None:
        await ensure_topics(settings, [source, dlq(source), *INSIGHT_TOPICS.values()])
        await ensure_topics(settings, [settings.analytics_firm_windows_topic], partitions=1)

    await retrying(create_topics, what="creating the analytics topics", health=health, stop=stop)
    origin = Origin((source,), service_version(), settings.network_key())
    async with (
        ControlRegistry(settings) as registry,
        publishing(settings) as publisher,
    ):
        if ready is not None:
            ready.set()
        async with asyncio.TaskGroup() as group:
            group.create_task(run_firm_windows(settings, stop, source, publisher, origin, health))
            group.create_task(run_network(settings, stop, publisher, registry, origin, health))


async def serve(settings: AnalyticsSettings) -> None:
    """The process: health and metrics over HTTP, both loops, SIGTERM drains and commits."""
    stop, ready = asyncio.Event(), asyncio.Event()
    stop_on_signals(stop)
    health = KafkaHealth.of(settings)

    async def readiness() -> str | None:
        return health.problem() if ready.is_set() else "starting"

    runner = await serve_health(
        SERVICE, settings.http_host, settings.analytics_http_port, readiness
    )
    try:
        async with health.watching(settings):
            await run_analytics(
                settings, stop, source=settings.analytics_source_topic, ready=ready, health=health
            )
    finally:
        await runner.cleanup()


def main() -> None:
    settings = load_analytics_settings()
    settings.network_key()  # refuse to start without the network secret
    configure_logging(SERVICE, settings.log_level, settings.log_format)
    asyncio.run(serve(settings))
