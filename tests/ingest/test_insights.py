"""Insights and sharing on the gateway: who sees what on the list and on open SSE streams.

The routes run in a minimal app (``require_api_key`` + ``setup_insight_routes``) over the real
broker; insights are published straight to the insight topics, as analytics would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from schemas.control import Grant, Tenant
from services.ingest.app import create_app
from services.ingest.insights import (
    INSIGHTS_KEY,
    InsightCache,
    grant_history,
    parse_filter,
    readable,
    series_of,
    setup_insight_routes,
    sse_event,
)
from services.ingest.settings import IngestSettings
from shared.control import issue_api_key, new_id
from shared.httpauth import REGISTRY_KEY, require_api_key
from shared.sdk import GatewayClient, GatewayError, InsightFilter, InsightStream, ServerSentEvent
from shared.settings import XietongSettings, load_settings
from tests.insight_helpers import (
    WINDOW,
    Gateway,
    benchmark,
    gateway_app,
    network,
    prediction,
    publish,
    statistics,
)

T0 = datetime(2026, 11, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- pure helpers


def test_filters_match_type_owner_metric_and_window() -> None:
    stats = statistics("acme", metric="sales.qty")
    assert InsightFilter().matches(stats)
    assert InsightFilter(types=frozenset({"statistics"}), owner="acme").matches(stats)
    assert not InsightFilter(types=frozenset({"prediction"})).matches(stats)
    assert not InsightFilter(owner="rival").matches(stats)
    assert InsightFilter(metric="sales.qty").matches(stats)
    assert not InsightFilter(metric="sales.amount_cny").matches(stats)
    assert InsightFilter(window_start=WINDOW).matches(stats)
    assert not InsightFilter(window_start=WINDOW + timedelta(hours=1)).matches(stats)


def test_parse_filter_reads_repeated_and_comma_separated_types() -> None:
    query = {"type": "statistics", "window_start": "2026-11-01T00:00:00Z"}
    values = {"type": ["statistics,benchmark", "prediction"]}
    parsed = parse_filter(query, lambda name: values.get(name, []))
    assert parsed.types == frozenset({"statistics", "benchmark", "prediction"})
    assert parsed.window_start == WINDOW
    with pytest.raises(ValueError, match="unknown insight type"):
        parse_filter({}, lambda name: ["gossip"] if name == "type" else [])
    with pytest.raises(ValueError, match="offset"):
        parse_filter({"window_start": "2026-11-01T00:00:00"}, lambda name: [])


def test_series_keep_metrics_apart_and_benchmarks_per_industry() -> None:
    assert series_of(statistics("acme", "a")) != series_of(statistics("acme", "b"))
    assert series_of(benchmark("m")) == "fasteners/cn-east/m"


def test_history_lists_grants_revocations_and_expiries_in_order() -> None:
    base: dict[str, Any] = {"owner": "acme", "grantee": "bank", "insight_types": ["statistics"]}
    grants = [
        Grant(grant_id="g0000001", created_at=T0, revoked_at=T0 + timedelta(days=2), **base),
        Grant(
            grant_id="g0000002",
            created_at=T0 + timedelta(days=1),
            expires_at=T0 + timedelta(days=3),
            **base,
        ),
        Grant(
            grant_id="g0000003",
            owner="rival",
            grantee="bank",
            insight_types=["prediction"],
            created_at=T0,
        ),
    ]
    history = grant_history("acme", grants, at=T0 + timedelta(days=5))
    assert [(h["action"], h["grant_id"]) for h in history] == [
        ("granted", "g0000001"),
        ("granted", "g0000002"),
        ("revoked", "g0000001"),
        ("expired", "g0000002"),
    ]
    assert [(h["action"], h["grant_id"]) for h in grant_history("bank", grants, at=T0)] == [
        ("granted", "g0000001"),
        ("granted", "g0000003"),
        ("granted", "g0000002"),
        ("revoked", "g0000001"),
    ]


def test_sse_frames_carry_event_id_and_one_line_of_data() -> None:
    frame = sse_event("statistics", b'{"a":1}', "id-1")
    assert frame == b'event: statistics\nid: id-1\ndata: {"a":1}\n\n'


def test_cache_keeps_the_latest_per_series_and_serves_only_what_a_reader_may_read() -> None:
    cache = InsightCache(load_settings(), per_series=2)
    a_old, a_mid, a_new = (statistics("acme", mean=float(n)) for n in range(3))
    a_pred, b_stats, public = prediction("acme"), statistics("bolts"), benchmark("m")
    for insight in (a_old, a_mid, a_new, a_new, a_pred, b_stats, public):
        cache.add(insight)  # a_new twice: a redelivery is kept once
    everything = cache.latest(lambda _: True, 100)
    assert [c.insight for c in everything] == [public, b_stats, a_pred, a_new, a_mid]
    anything = lambda _: True  # noqa: E731
    assert cache.after(str(a_old.insight_id), anything, 100) is None  # evicted
    resumed = cache.after(str(a_new.insight_id), anything, 100)
    assert resumed is not None and [c.insight for c in resumed[0]] == [a_pred, b_stats, public]

    def read(reader: str, grants: list[Grant], **wanted: Any) -> list[Any]:
        found = cache.readable_by(reader, grants, T0, InsightFilter(**wanted), 100)
        return [c.insight for c in found]

    assert read("bolts", []) == [public, b_stats]
    assert read("bank", []) == [public]
    grant = Grant(
        grant_id="g0000001",
        owner="acme",
        grantee="bank",
        insight_types=["statistics"],
        created_at=T0 - timedelta(days=1),
    )
    assert read("bank", [grant]) == [public, a_new, a_mid]
    assert read("bank", [grant], owner="acme") == [a_new, a_mid]
    assert read("bank", [grant.model_copy(update={"revoked_at": T0})]) == [public]


def test_a_resume_sends_only_what_the_reader_may_read_and_says_what_it_left_out() -> None:
    # Before: a resume collected every tenant's insights after the id and silently kept the
    # newest half-queue of them; a rival's id also told whether that insight existed.
    cache = InsightCache(load_settings(), per_series=50, queue_size=8)
    first = statistics("bolts", mean=0.0)
    cache.add(first)
    rival = statistics("acme", mean=1.0)
    cache.add(rival)
    mine = [statistics("bolts", mean=float(n)) for n in range(2, 9)]
    for n, insight in enumerate(mine):
        cache.add(insight)
        cache.add(statistics("acme", mean=float(100 + n)))

    def bolts_may_read(insight: Any) -> bool:
        return readable("bolts", insight, [], T0)

    resumed = cache.after(str(first.insight_id), bolts_may_read, cache.max_replay)
    assert resumed is not None
    replay, left_out = resumed
    assert [c.insight for c in replay] == mine[-cache.max_replay :]
    assert left_out == len(mine) - cache.max_replay
    # A rival's insight id resumes nothing: the same answer as an id that never existed.
    assert cache.after(str(rival.insight_id), bolts_may_read, cache.max_replay) is None


# --------------------------------------------------------------------------- over the broker


@pytest.fixture
async def gateway(settings: XietongSettings) -> AsyncIterator[Gateway]:
    async with gateway_app(settings) as running:
        yield running


def ids(insights: list[Any]) -> set[str]:
    return {str(i.insight_id) for i in insights}


@pytest.mark.integration
async def test_list_shows_own_public_and_granted_insights_only(gateway: Gateway) -> None:
    net = gateway.net
    a_stats, a_pred, b_stats = statistics(net.a), prediction(net.a), statistics(net.b)
    public = benchmark(f"m{net.a}")
    await publish(net.writer.settings, [a_stats, a_pred, b_stats, public])
    await gateway.caught_up()

    async with (
        gateway.client(net.a) as a,
        gateway.client(net.b) as b,
        gateway.client(net.bank) as bank,
    ):
        mine = {net.a, net.b, "network"}
        seen_by_b = ids([i for i in await b.insights(limit=1000) if i.tenant in mine])
        assert str(b_stats.insight_id) in seen_by_b and str(public.insight_id) in seen_by_b
        assert not seen_by_b & ids([a_stats, a_pred])
        assert not ids(await bank.insights(owner=net.a)) | ids(await bank.insights(owner=net.b))
        assert ids(await bank.insights(metric=public.metric)) == ids([public])
        assert ids(await a.insights(owner=net.a)) == ids([a_stats, a_pred])

        # A lets B read its statistics, nothing else.
        grant = await a.grant(
            net.b,
            ["statistics"],
            expires_at=datetime.now(UTC) + timedelta(days=1),
            purpose="supplier financing",
        )
        assert (grant.owner, grant.grantee) == (net.a, net.b)
        assert ids(await b.insights(owner=net.a)) == ids([a_stats])
        assert not ids(await bank.insights(owner=net.a))
        assert ids(await b.insights(owner=net.a, types=["prediction"])) == set()
        assert [g["grant_id"] for g in (await b.shares())["received"]] == [grant.grant_id]
        assert [g["status"] for g in (await a.shares())["granted"]] == ["active"]

        # Only the owner revokes; the grantee learns it exists, a stranger does not.
        with pytest.raises(GatewayError, match="403"):
            await b.revoke(grant.grant_id)
        with pytest.raises(GatewayError, match="404"):
            await bank.revoke(grant.grant_id)
        revoked = await a.revoke(grant.grant_id)
        assert revoked.revoked_at is not None
        assert not ids(await b.insights(owner=net.a))
        assert [(h["action"], h["grant_id"]) for h in await a.audit()] == [
            ("granted", grant.grant_id),
            ("revoked", grant.grant_id),
        ]

        with pytest.raises(GatewayError, match="422"):
            await a.grant(net.b, ["gossip"])

        # A grant to an id no tenant holds is answered like any other (before: "422 unknown
        # grantee", which told any tenant which ids exist), and stays inert for a tenant
        # created later under that id.
        latecomer = f"late{new_id()}"
        inert = await a.grant(latecomer, ["statistics"])
        assert (inert.grantee, inert.revoked_at) == (latecomer, None)
        key, record = issue_api_key(latecomer)
        await net.writer.put_tenant(
            Tenant(tenant=latecomer, name=latecomer, created_at=datetime.now(UTC))
        )
        await net.writer.put_key(record)
        async with asyncio.timeout(30):
            while net.registry.authenticate(key) is None:
                await net.registry.wait_changed(net.registry.version, 1)
        async with GatewayClient(gateway.url, key) as late:
            assert not ids(await late.insights(owner=net.a))


@pytest.mark.integration
async def test_without_a_key_nothing_is_served(gateway: Gateway) -> None:
    async with GatewayClient(gateway.url, "xt_deadbeef00_nope") as stranger:
        with pytest.raises(GatewayError, match="401"):
            await stranger.insights()
        with pytest.raises(GatewayError, match="401"):
            await stranger.shares()


async def read_until(stream: InsightStream, last_id: str, seen: list[ServerSentEvent]) -> None:
    """Collect the stream's events (insights and notices) up to the one with ``last_id``."""
    async with asyncio.timeout(30):
        async for event in stream.events():
            seen.append(event)
            if event.id == last_id:
                return


@pytest.mark.integration
async def test_revocation_stops_an_open_stream_and_strangers_never_see_private_insights(
    gateway: Gateway,
) -> None:
    net = gateway.net
    settings = net.writer.settings
    async with gateway.client(net.a) as a:
        grant = await a.grant(net.b, ["statistics"], purpose="planning")

    async with gateway.stream(net.b) as b_stream, gateway.stream(net.bank) as bank_stream:
        # Phase 1: B reads A's statistics under the grant, not A's predictions.
        granted, not_granted = statistics(net.a, mean=1.0), prediction(net.a)
        await publish(settings, [granted, not_granted])
        await gateway.caught_up()
        marker_b, marker_public = statistics(net.b), benchmark(f"m{net.b}")
        await publish(settings, [marker_b, marker_public])
        b_seen: list[ServerSentEvent] = []
        await read_until(b_stream, str(marker_b.insight_id), b_seen)
        b_ids = {e.id for e in b_seen}
        assert str(granted.insight_id) in b_ids
        assert str(not_granted.insight_id) not in b_ids

        # Phase 2: A revokes while the stream is open; nothing more of A reaches B.
        async with gateway.client(net.a) as a:
            await a.revoke(grant.grant_id)
        after = statistics(net.a, mean=2.0)
        await publish(settings, [after])
        await gateway.caught_up()
        marker_b2 = statistics(net.b, mean=3.0)
        await publish(settings, [marker_b2])
        b_seen_after: list[ServerSentEvent] = []
        await read_until(b_stream, str(marker_b2.insight_id), b_seen_after)
        assert str(after.insight_id) not in {e.id for e in b_seen_after}
        notices = [e for e in b_seen + b_seen_after if e.event == "grant_revoked"]
        assert [grant.grant_id in e.data for e in notices] == [True]

        # The bank, granted nothing, saw only the public benchmark of all this.
        bank_seen: list[ServerSentEvent] = []
        await read_until(bank_stream, str(marker_public.insight_id), bank_seen)
        private = {str(i.insight_id) for i in (granted, not_granted, marker_b, after, marker_b2)}
        assert not private & {e.id for e in bank_seen}


@pytest.mark.integration
async def test_stream_yields_typed_insights_of_the_requested_types(gateway: Gateway) -> None:
    net = gateway.net
    async with gateway.stream(net.a, types=["prediction"]) as stream:
        stats, pred = statistics(net.a), prediction(net.a)
        await publish(net.writer.settings, [stats])
        await gateway.caught_up()
        await publish(net.writer.settings, [pred])
        async with asyncio.timeout(30):
            first = await anext(aiter(stream))
    assert first == pred


@pytest.mark.integration
async def test_the_gateway_app_serves_insights_through_its_own_middlewares(
    settings: XietongSettings,
) -> None:
    gateway_settings = IngestSettings(**{**settings.model_dump(), "ingest_with_insights": True})
    async with network(settings) as net:
        server = TestServer(create_app(gateway_settings), host="127.0.0.1")
        async with server:
            url = str(server.make_url("")).rstrip("/")
            async with InsightStream(url, net.keys[net.b], types=["statistics"]) as stream:
                own, foreign = statistics(net.b), statistics(net.a)
                await publish(settings, [foreign])
                await publish(settings, [own])
                async with asyncio.timeout(30):
                    first = await anext(aiter(stream))
            assert first == own
            async with GatewayClient(url, net.keys[net.b]) as b:
                assert own in await b.insights(owner=net.b)
                assert await b.insights(owner=net.a) == []


@pytest.mark.integration
async def test_a_reconnecting_stream_resumes_after_its_last_event_id(gateway: Gateway) -> None:
    net = gateway.net
    settings = net.writer.settings
    first, second, third = (statistics(net.a, mean=float(n)) for n in range(3))
    async with gateway.stream(net.a, types=["statistics"]) as stream:
        await publish(settings, [first])
        async with asyncio.timeout(30):
            assert await anext(aiter(stream)) == first
        last_id = stream.last_event_id
    assert last_id == str(first.insight_id)

    # Missed while disconnected: A's next two and B's (which A may not read).
    await publish(settings, [second, statistics(net.b)])
    await publish(settings, [third])
    await gateway.caught_up()
    resumed: list[Any] = []
    async with gateway.stream(net.a, last_event_id=last_id) as stream:
        async with asyncio.timeout(30):
            async for insight in stream:
                resumed.append(insight)
                if insight == third:
                    break
    assert [i for i in resumed if i.visibility == "private" and i.tenant != net.a] == []
    assert [i for i in resumed if i.tenant == net.a] == [second, third]

    # An id the gateway no longer holds: it says so instead of replaying silently nothing.
    gap: list[ServerSentEvent] = []
    async with gateway.stream(
        net.a, last_event_id="00000000-0000-0000-0000-000000000000", on_notice=gap.append
    ) as stream:
        fourth = statistics(net.a, mean=4.0)
        await publish(settings, [fourth])
        async with asyncio.timeout(30):
            assert await anext(aiter(stream)) == fourth
    assert [e.event for e in gap] == ["gap"]

    # replay=N starts with the latest N the caller may read, oldest first.
    async with gateway.stream(net.a, owner=net.a, types=["statistics"], replay=2) as stream:
        async with asyncio.timeout(30):
            replayed = [await anext(aiter(stream)) for _ in range(2)]
    assert replayed == [third, fourth]


@pytest.mark.integration
async def test_a_stream_ends_when_the_key_is_revoked(gateway: Gateway) -> None:
    net = gateway.net
    key_id = net.keys[net.b].split("_")[1]
    async with gateway.stream(net.b) as stream:
        record = net.registry.keys[key_id]
        await net.writer.put_key(record.model_copy(update={"revoked_at": datetime.now(UTC)}))
        async with asyncio.timeout(30):
            rest = [insight async for insight in stream]
    assert rest == [] and [e.event for e in stream.notices] == ["access_revoked"]


@pytest.mark.integration
async def test_open_streams_end_cleanly_when_the_gateway_stops(settings: XietongSettings) -> None:
    async with network(settings) as net:
        app = web.Application(middlewares=[require_api_key()])
        app[REGISTRY_KEY] = net.registry
        setup_insight_routes(app)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        url = str(server.make_url("")).rstrip("/")
        notices: list[ServerSentEvent] = []
        async with InsightStream(
            url, net.keys[net.a], reconnect_attempts=0, on_notice=notices.append
        ) as stream:
            # Without the shutdown hook the server would wait for this handler until its timeout.
            async with asyncio.timeout(30):
                await server.close()
                rest = [insight async for insight in stream]
        assert rest == [] and [e.event for e in notices] == ["end"]
        assert "shutting down" in notices[0].data


async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Poll ``condition`` (a state with no event to wait on) until it holds."""
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.05)


async def open_and_drop_streams(gateway: Gateway, tenant: str, count: int) -> None:
    """Open ``count`` streams and drop each at its own moment, the way clients go away."""

    async def one(n: int) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.05 * (n % 7) + 0.01), gateway.stream(tenant) as stream:
                async for _ in stream:
                    pass

    await asyncio.gather(*(one(n) for n in range(count)))


@pytest.mark.integration
async def test_revocation_holds_after_many_streams_were_dropped_under_load(
    gateway: Gateway,
) -> None:
    # Before the fix, streams dropped while waiting for a registry change broke its condition
    # lock ("Lock is not acquired"): the registry stopped following control.*, keys issued
    # afterwards got 401 and a key revoked afterwards kept publishing and reading.
    net = gateway.net
    stop_load = asyncio.Event()

    async def insight_load() -> None:  # insights keep arriving while streams come and go
        n = 0
        while not stop_load.is_set():
            await publish(net.writer.settings, [statistics(net.a, mean=float(n))])
            n += 1
            await asyncio.sleep(0.02)

    load = asyncio.create_task(insight_load())
    try:
        for _ in range(3):
            await open_and_drop_streams(gateway, net.a, 20)
            await asyncio.sleep(0.6)  # past a heartbeat: the waiters' timeouts fire too

        # The registry still follows: a key issued now is honoured ...
        fresh_key, record = issue_api_key(net.a)
        await net.writer.put_key(record)
        async with asyncio.timeout(30):
            while net.registry.authenticate(fresh_key) is None:
                await net.registry.wait_changed(net.registry.version, 1)
        async with GatewayClient(gateway.url, fresh_key) as client:
            await client.insights(limit=1)

            # ... and a revocation takes effect on the first sync that starts after Kafka
            # acknowledged it (within control_sync_interval_seconds and one fetch).
            await net.writer.put_key(record.model_copy(update={"revoked_at": datetime.now(UTC)}))
            acknowledged = time.monotonic()
            await until(lambda: (net.registry.synced_at or 0) > acknowledged)
            with pytest.raises(GatewayError, match="401"):
                await client.insights(limit=1)
    finally:
        stop_load.set()
        await load


@pytest.mark.integration
async def test_a_registry_that_cannot_follow_fails_closed(settings: XietongSettings) -> None:
    fast = settings.model_copy(
        update={"control_sync_interval_seconds": 0.2, "control_max_staleness_seconds": 1.0}
    )
    async with gateway_app(fast) as gateway:
        net = gateway.net
        async with gateway.client(net.a) as client:
            # Confirmed current once the gateway serves (its start-up read a busy broker's
            # history, which can hold the event loop past the one second allowed here).
            await until(lambda: net.registry.problem() is None)
            await client.insights(limit=1)
            # The registry's reader dies (as when the broker goes away for good): the registry
            # can no longer confirm it is current, so no key is honoured until it can again.
            assert net.registry._consumer is not None
            await net.registry._consumer.stop()
            await until(lambda: net.registry.problem() is not None)
            with pytest.raises(GatewayError, match="503"):
                await client.insights(limit=1)
            assert net.registry.authenticate(net.keys[net.a]) is None
            assert net.registry.grants_to(net.bank) == []


@pytest.mark.integration
async def test_a_gateway_serves_only_once_it_has_read_the_recent_history(
    settings: XietongSettings,
) -> None:
    # Before: the gateway served while its cache was still reading the recent insights (on a
    # busy broker, seconds): a list then missed them, and a stream opened meanwhile was sent
    # them as if new, which could overflow it and drop it with the notice it was waiting for.
    async with network(settings) as net:
        history = [statistics(net.a, metric=f"m{n % 200}", mean=float(n)) for n in range(60_000)]
        await publish(settings, history)
        app = web.Application(middlewares=[require_api_key()])
        app[REGISTRY_KEY] = net.registry
        setup_insight_routes(app, heartbeat=0.5)
        async with TestServer(app, host="127.0.0.1") as server:
            # Looked at the moment the server serves, before anything else can run.
            held = app[INSIGHTS_KEY].cache.readable_by(
                net.a, [], datetime.now(UTC), InsightFilter(owner=net.a), 1000
            )
            assert {i.insight.insight_id for i in held} == {i.insight_id for i in history[-1000:]}
            url = str(server.make_url("")).rstrip("/")
            async with InsightStream(url, net.keys[net.a], types=["statistics"]) as stream:
                news = statistics(net.a, mean=-1.0)
                await publish(settings, [news])
                async with asyncio.timeout(60):
                    first = await anext(aiter(stream))
            assert first == news


@pytest.mark.integration
async def test_a_burst_of_other_tenants_insights_does_not_drop_an_open_stream(
    gateway: Gateway,
) -> None:
    # Before: the cache offered each fetched batch to every stream's queue without yielding,
    # so one fetch of more insights than a queue holds (any tenant's, none the reader's)
    # dropped every open stream as "too slow", however fast its client read.
    net = gateway.net
    await gateway.caught_up()
    ended: list[ServerSentEvent] = []
    async with gateway.stream(net.a, types=["statistics"], on_notice=ended.append) as stream:
        burst = [statistics(net.b, metric=f"m{n % 500}", mean=float(n)) for n in range(40_000)]
        await publish(net.writer.settings, burst)
        await gateway.caught_up()
        mine = statistics(net.a, mean=-1.0)
        await publish(net.writer.settings, [mine])
        async with asyncio.timeout(60):
            first = await anext(aiter(stream))
    assert first == mine
    assert [e.event for e in ended] == []
