"""The SDK: the SSE parser, and the Kafka ``Subscriber`` applying the sharing rule (real broker)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from schemas.control import Grant
from schemas.insights import Insight, Statistics
from shared.control import new_id
from shared.sdk import ServerSentEvent, SseParser, Subscriber, iter_sse, parse_insight
from shared.settings import XietongSettings
from tests.insight_helpers import benchmark, network, prediction, publish, statistics


def test_sse_parser_joins_data_lines_skips_comments_and_keeps_the_last_id() -> None:
    parser = SseParser()
    lines = [
        ": connected",
        "retry: 3000",
        "",
        "event: statistics",
        "id: 42",
        "data: {",
        "data: }",
        "",
        ": heartbeat",
        "",
        "data: plain",
        "",
    ]
    events = [e for e in (parser.feed(line) for line in lines) if e is not None]
    assert events == [
        ServerSentEvent("statistics", "{\n}", "42"),
        ServerSentEvent("message", "plain", "42"),
    ]
    assert parser.last_event_id == "42"


async def test_iter_sse_reads_raw_lines_with_crlf() -> None:
    async def lines() -> AsyncIterator[bytes]:
        for line in (b"event: end\r\n", b"data: {}\r\n", b"\r\n"):
            yield line

    assert [e async for e in iter_sse(lines())] == [ServerSentEvent("end", "{}")]


def test_parse_insight_gives_the_typed_model_and_refuses_others() -> None:
    stats = statistics("acme")
    parsed = parse_insight(stats.model_dump(mode="json"))
    assert isinstance(parsed, Statistics) and parsed == stats
    with pytest.raises(ValueError, match="not an insight"):
        parse_insight({"type": "gossip"})


def as_ids(*items: Insight) -> set[str]:
    return {str(i.insight_id) for i in items}


async def drain(subscriber: Subscriber) -> list[Insight]:
    """Everything the subscriber yields until it has read its partitions to their end."""
    found: list[Insight] = []
    async with asyncio.timeout(60):
        while True:
            found += await subscriber.poll(timeout_ms=200)
            if await subscriber.at_end():
                return found


@pytest.mark.integration
async def test_subscriber_yields_own_public_and_granted_insights_only(
    settings: XietongSettings,
) -> None:
    async with network(settings) as net:
        grant = Grant(
            grant_id=new_id(),
            owner=net.a,
            grantee=net.bank,
            insight_types=["statistics"],
            created_at=datetime.now(UTC),
        )
        await net.writer.put_grant(grant)
        async with asyncio.timeout(30):
            while grant.grant_id not in net.registry.grants:
                await net.registry.wait_changed(net.registry.version, 1)
        a_stats, a_pred, b_stats = statistics(net.a), prediction(net.a), statistics(net.b)
        public = benchmark(f"m{net.a}")
        await publish(settings, [a_stats, a_pred, b_stats, public])

        ours = {net.a, net.b, "network"}
        got: dict[str, set[str]] = {}
        for tenant in (net.a, net.b, net.bank):
            # The bank's subscriber shares the registry; the others start their own.
            registry = net.registry if tenant == net.bank else None
            async with Subscriber(
                settings, tenant, registry, group_id=f"test.{tenant}"
            ) as subscriber:
                got[tenant] = {
                    str(i.insight_id)
                    for i in await drain(subscriber)
                    if i.tenant in ours and (i.tenant != "network" or i == public)
                }
        assert got[net.a] == as_ids(a_stats, a_pred, public)
        assert got[net.b] == as_ids(b_stats, public)
        assert got[net.bank] == as_ids(a_stats, public)


@pytest.mark.integration
async def test_subscriber_commits_what_it_handed_out(settings: XietongSettings) -> None:
    async with network(settings) as net:
        first, second = statistics(net.a, mean=1.0), statistics(net.a, mean=2.0)
        await publish(settings, [first])
        group = f"test.commit.{new_id()}"
        async with Subscriber(
            settings, net.a, net.registry, types=["statistics"], group_id=group
        ) as subscriber:
            assert first in await drain(subscriber)
        await publish(settings, [second])
        async with Subscriber(
            settings, net.a, net.registry, types=["statistics"], group_id=group
        ) as again:
            mine = [i for i in await drain(again) if i.tenant == net.a]
        assert mine == [second]


@pytest.mark.integration
async def test_subscriber_stops_yielding_what_a_revoked_grant_covered(
    settings: XietongSettings,
) -> None:
    async with network(settings) as net:
        grant = Grant(
            grant_id=new_id(),
            owner=net.a,
            grantee=net.bank,
            insight_types=["statistics"],
            created_at=datetime.now(UTC),
        )

        async def put(g: Grant, active: bool) -> None:
            await net.writer.put_grant(g)
            async with asyncio.timeout(30):
                while bool(net.registry.grants_to(net.bank)) != active:
                    await net.registry.wait_changed(net.registry.version, 1)

        await put(grant, active=True)
        before, after = statistics(net.a, mean=1.0), statistics(net.a, mean=2.0)
        async with Subscriber(
            settings, net.bank, net.registry, types=["statistics"], group_id=f"test.{new_id()}"
        ) as subscriber:
            await publish(settings, [before])
            assert before in await drain(subscriber)
            await put(grant.model_copy(update={"revoked_at": datetime.now(UTC)}), active=False)
            await publish(settings, [after])
            assert [i for i in await drain(subscriber) if i.tenant == net.a] == []
