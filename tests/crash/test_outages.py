"""Crashes and broker outages under load, counted event by event (issue 10, "run it for months").

Each test runs its own broker and the services as processes (:mod:`tests.crash.harness`),
publishes steadily through the gateway for six firms, breaks something, keeps publishing, then
counts per tenant: every event the gateway accepted (202) must come out of the clean topic
exactly once, and no insight id may carry two different contents. The figures are written to
the terminal (``[crash] ...``) whatever pytest's capture.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.crash.harness import Load, Network, eventually, network, report, tally

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_SECONDS = 70.0


async def readiness_is(net: Network, status: int) -> None:
    for name in net.services:

        async def check(name: str = name) -> bool:
            return await net.ready(name) == status

        await eventually(check, f"{name} /readyz answers {status}", timeout=90)


async def accepting(load: Load, more_than: int) -> None:
    async def check() -> bool:
        return load.total() > more_than

    await eventually(check, f"the gateway accepts more than {more_than} events", timeout=120)


async def test_a_broker_stopped_for_over_a_minute_under_load_loses_nothing() -> None:
    async with network() as net:
        load = Load(net)
        load.start()
        await accepting(load, 300)
        lines_before = {name: s.log_lines() for name, s in net.services.items()}

        net.stop_broker()
        outage = asyncio.get_running_loop().time()
        at_stop = load.total()
        # every service says so on /readyz within seconds, and none of them exits
        await readiness_is(net, 503)
        await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (asyncio.get_running_loop().time() - outage)))
        net.check_running()
        accepted_during = load.total() - at_stop
        lines = {name: s.log_lines() - lines_before[name] for name, s in net.services.items()}

        net.start_broker()
        await readiness_is(net, 200)
        await accepting(load, load.total() + 300)  # they carry on by themselves
        await load.stop()
        counted = await tally(net, load)

    report(
        f"broker outage {OUTAGE_SECONDS:.0f} s: {counted.line()}; 503 answers "
        f"{load.statuses[503]} (Retry-After {sorted(load.retry_after)}), lost connections "
        f"{load.statuses[0]}; accepted while the broker was down {accepted_during}; "
        f"log lines during the outage {lines}"
    )
    assert counted.lost == 0, counted.lost_by_tenant
    assert counted.duplicated == 0
    assert counted.insight_conflicts == 0
    assert load.statuses[503] > 0 and load.retry_after  # refused quickly, with a hint
    assert all(count < 400 for count in lines.values()), lines  # repeats collapsed


async def test_each_service_killed_under_load_and_the_broker_restarted_lose_nothing() -> None:
    async with network() as net:
        load = Load(net)
        load.start()
        await accepting(load, 300)
        for name in ("ingest", "clean", "analytics"):
            service = net.services[name]
            service.kill()
            await service.wait_killed()
            await asyncio.sleep(2)
            await service.start(net.session)
            await accepting(load, load.total() + 200)

        net.stop_broker()
        await asyncio.sleep(10)
        net.start_broker()
        await readiness_is(net, 200)
        await accepting(load, load.total() + 300)
        await load.stop()
        counted = await tally(net, load)

    report(
        f"SIGKILL of ingest, clean and analytics, then a 10 s broker restart: {counted.line()}; "
        f"503 answers {load.statuses[503]}, lost connections {load.statuses[0]}"
    )
    assert counted.lost == 0, counted.lost_by_tenant
    assert counted.duplicated == 0
    assert counted.insight_conflicts == 0
