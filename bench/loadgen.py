"""The HTTP load generator, the same for our gateway and for the bare handler.

Requests are built before the clock starts (headers and body bytes); ``connections`` workers
share one aiohttp session limited to that many connections and post them as fast as answers
come back (:func:`post_all`), or at a fixed offered rate (:func:`post_paced`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import aiohttp


@dataclass(frozen=True)
class Request:
    headers: dict[str, str]
    body: bytes
    events: int
    event_ids: tuple[str, ...] = ()


@dataclass
class LoadResult:
    started: float
    """Wall time the first request was sent."""
    finished: float
    """Wall time the last answer arrived."""
    events: int
    refused: list[str] = field(default_factory=list)
    sent_at: dict[str, float] = field(default_factory=dict)
    """event id -> wall time its request was sent (paced runs)."""

    @property
    def rate(self) -> float:
        return self.events / max(self.finished - self.started, 1e-3)


async def _post(
    session: aiohttp.ClientSession, url: str, request: Request, result: LoadResult
) -> None:
    async with session.post(url, data=request.body, headers=request.headers) as response:
        text = await response.read()
        if response.status >= 300:
            result.refused.append(f"{response.status} {text[:200]!r}")


async def post_all(url: str, requests: list[Request], *, connections: int) -> LoadResult:
    """Post every request over ``connections`` connections, as fast as answers come back."""
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue: Iterator[Request] = iter(requests)
        result = LoadResult(time.time(), 0.0, sum(r.events for r in requests))

        async def worker() -> None:
            for request in queue:
                await _post(session, url, request, result)

        await asyncio.gather(*(worker() for _ in range(connections)))
        result.finished = time.time()
    return result


async def post_paced(
    url: str, requests: list[Request], *, rate: float, connections: int
) -> LoadResult:
    """Send requests on a fixed schedule offering ``rate`` events/s, each noting its send time.
    A request whose slot comes while all connections are busy waits for one (and that wait
    counts in the latency it shows)."""
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        result = LoadResult(time.time(), 0.0, sum(r.events for r in requests))
        tasks = []
        clock = time.monotonic()
        due = 0.0
        for request in requests:
            delay = clock + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            now = time.time()
            for event_id in request.event_ids:
                result.sent_at[event_id] = now
            tasks.append(asyncio.create_task(_post(session, url, request, result)))
            due += request.events / rate
        await asyncio.gather(*tasks)
        result.finished = time.time()
    return result
