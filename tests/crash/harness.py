"""A whole network run as an operator runs it, on a broker of its own, under steady load.

:class:`Network` starts a private Kafka broker (``infra.start_kafka`` on free ports, never the
shared one: these tests stop it) and the services as processes (``python -m services.<name>``),
each with its own ports, state folder and log file. :class:`Load` publishes through the gateway
for a set of tenants, each request re-sent until it is answered 202 (a 503 or a lost
connection means "retry": the same event ids, so nothing is counted twice). :func:`tally` then
reads the clean topic and the insight topics back and counts, per tenant, what was accepted,
cleaned, lost and duplicated, and the insight ids that carry two different contents.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import TopicPartition

from deploy.local import infra
from schemas.topics import EVENTS_CLEAN, INSIGHT_TOPICS
from shared.kafka import create_consumer, create_producer, started
from shared.settings import XietongSettings, load_settings
from tests.e2e.system import Member, register
from tests.factories import sales_event
from tests.processes import wait_until_ready

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds (a bound, not a measure)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.5)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:.0f} s: {what}") from None


def report(line: str) -> None:
    """A figure for the person running the suite: straight to the terminal, whatever pytest's
    capture (``-s`` or not)."""
    print(f"\n[crash] {line}", file=sys.__stderr__, flush=True)


@dataclass
class Service:
    """One ``python -m services.<name>`` process and where it answers ``/readyz``."""

    name: str
    env: dict[str, str]
    ready_url: str
    log: Path
    process: asyncio.subprocess.Process | None = None
    starts: int = 0

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.starts += 1
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                PYTHON,
                "-m",
                f"services.{self.name}",
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=out,
            )
        await wait_until_ready(session, self.ready_url, self.process)

    def kill(self) -> None:
        """SIGKILL: no drain, no commit, no flush."""
        assert self.process is not None and self.process.returncode is None, self.tail()
        self.process.send_signal(signal.SIGKILL)

    async def wait_killed(self) -> None:
        assert self.process is not None
        await self.process.wait()

    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self) -> None:
        if self.running():
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def log_lines(self) -> int:
        return len(self.log.read_text(errors="replace").splitlines()) if self.log.exists() else 0


@dataclass
class Network:
    """The private broker and the services of one test."""

    root: Path
    broker: infra.KafkaInstance
    settings: XietongSettings
    services: dict[str, Service]
    session: aiohttp.ClientSession
    members: dict[str, Member] = field(default_factory=dict)

    @property
    def gateway(self) -> str:
        return self.services["ingest"].env["XIETONG_GATEWAY_URL"]

    def stop_broker(self) -> None:
        infra.stop(self.broker)

    def start_broker(self) -> None:
        """The same ports and the same data folder: what a restarted machine would do."""
        self.broker = infra.start_kafka(
            port=self.broker.port,
            controller_port=self.broker.controller_port,
            data_dir=Path(self.broker.data_dir),
        )

    async def ready(self, name: str) -> int:
        """The ``/readyz`` status of a service right now (0: no answer)."""
        try:
            async with self.session.get(f"{self.services[name].ready_url}/readyz") as response:
                return response.status
        except aiohttp.ClientError:
            return 0

    def check_running(self) -> None:
        for service in self.services.values():
            code = service.process.returncode if service.process is not None else None
            if code is not None and code != -signal.SIGKILL:
                raise AssertionError(f"{service.name} exited with {code}:\n{service.tail()}")


@asynccontextmanager
async def network(
    names: tuple[str, ...] = ("ingest", "clean", "analytics"),
    *,
    tenants: int = 6,
    env: dict[str, str] | None = None,
) -> AsyncIterator[Network]:
    """A private broker, ``tenants`` registered partner firms with keys, and ``names`` started."""
    root = Path(tempfile.mkdtemp(prefix="xietong-crash-"))
    broker = infra.start_kafka(data_dir=root / "kafka", partitions=6)
    settings = load_settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        kafka_partitions=6,
        state_dir=str(root / "test-state"),
        log_format="text",
        network_secret="crash-network-secret",
    )
    base_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("XIETONG_")},
        "XIETONG_RUN_DIR": str(root),
        "XIETONG_KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "XIETONG_NETWORK_SECRET": "crash-network-secret",
        "XIETONG_LOG_FORMAT": "json",
        "XIETONG_KAFKA_UNREADY_AFTER_SECONDS": "6",
        "XIETONG_INGEST_PUBLISH_TIMEOUT_SECONDS": "5",
        "XIETONG_ANALYTICS_WINDOW_SECONDS": "600",
        "XIETONG_ANALYTICS_GRACE_SECONDS": "60",
        "XIETONG_ANALYTICS_DAILY_WINDOW": "false",
        **(env or {}),
    }
    services: dict[str, Service] = {}
    for name in names:
        port, extra = infra.free_port(), {}
        if name == "ingest":
            metrics = infra.free_port()
            extra = {
                "XIETONG_INGEST_HTTP_PORT": str(port),
                "XIETONG_INGEST_METRICS_PORT": str(metrics),
                "XIETONG_GATEWAY_URL": f"http://127.0.0.1:{port}",
            }
            ready = f"http://127.0.0.1:{metrics}"
        else:
            extra = {f"XIETONG_{name.upper()}_HTTP_PORT": str(port)}
            ready = f"http://127.0.0.1:{port}"
        services[name] = Service(
            name,
            {**base_env, **extra, "XIETONG_STATE_DIR": str(root / "state" / name)},
            ready,
            root / f"{name}.log",
        )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            net = Network(root, broker, settings, services, session)
            net.members = await register(
                settings,
                [(f"firm{i}", "partner", "fasteners", "east") for i in range(tenants)],
            )
            try:
                for service in services.values():
                    await service.start(session)
                yield net
            finally:
                for service in services.values():
                    await service.stop()
    finally:
        infra.stop(broker)
        if os.environ.get("XIETONG_KEEP_CRASH_DIR"):
            report(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- load


@dataclass
class Load:
    """Steady publishing through the gateway, each request re-sent until it is answered 202."""

    net: Network
    per_request: int = 10
    pause: float = 0.2
    accepted: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: set[str] = field(default_factory=set)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
        for member in self.net.members.values():
            self._tasks.append(asyncio.create_task(self._publish(member, base)))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def total(self) -> int:
        return sum(len(ids) for ids in self.accepted.values())

    async def _publish(self, member: Member, base: datetime) -> None:
        headers = {"Authorization": f"Bearer {member.key}", "Content-Type": "application/json"}
        url = f"{self.net.gateway}/v1/events"
        timeout = aiohttp.ClientTimeout(total=60)
        seq = 0
        while not self._stop.is_set():
            events = [
                sales_event(
                    member.tenant,
                    seq=seq + i,
                    quantity=float(1 + (seq + i) % 17),
                    occurred_at=base + timedelta(seconds=10 * (seq + i)),
                )
                for i in range(self.per_request)
            ]
            seq += self.per_request
            body = orjson.dumps(events)
            while True:  # the same request until it is taken: same ids, never counted twice
                try:
                    async with self.net.session.post(
                        url, data=body, headers=headers, timeout=timeout
                    ) as response:
                        self.statuses[response.status] += 1
                        if response.status == 202:
                            answer = await response.json()
                            assert answer["accepted"] == len(events), answer
                            self.accepted[member.tenant].update(e["event_id"] for e in events)
                            break
                        assert response.status == 503, await response.text()
                        if "Retry-After" in response.headers:
                            self.retry_after.add(response.headers["Retry-After"])
                except (aiohttp.ClientError, TimeoutError):
                    self.statuses[0] += 1
                await asyncio.sleep(0.5)
            await asyncio.sleep(self.pause)


# --------------------------------------------------------------------------- counting


@dataclass
class Tally:
    accepted: int
    cleaned: int
    lost: int
    duplicated: int
    insights: int
    insight_conflicts: int
    lost_by_tenant: dict[str, int]

    def line(self) -> str:
        return (
            f"accepted {self.accepted}, cleaned {self.cleaned}, lost {self.lost}, "
            f"duplicated {self.duplicated}, insights {self.insights} "
            f"(conflicts {self.insight_conflicts})"
        )


async def read_all(settings: XietongSettings, topics: list[str]) -> list[Any]:
    """Every record of ``topics`` up to their current ends."""
    records: list[Any] = []
    async with (
        started(create_producer(settings)) as producer,
        started(create_consumer(settings, None)) as consumer,
    ):
        partitions = [
            TopicPartition(topic, p)
            for topic in topics
            for p in sorted(await producer.partitions_for(topic))
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp in partitions if ends[tp] > 0}
        async with asyncio.timeout(120):
            while remaining:
                for tp, got in (await consumer.getmany(*remaining, timeout_ms=500)).items():
                    records += [r for r in got if r.offset < ends[tp]]
                for tp in list(remaining):
                    if await consumer.position(tp) >= ends[tp]:
                        remaining.discard(tp)
    return records


async def tally(net: Network, load: Load, *, settle: float = 120.0) -> Tally:
    """Wait (up to ``settle`` s) until every accepted event is in the clean topic; then count."""
    wanted = {i for ids in load.accepted.values() for i in ids}
    deadline = asyncio.get_running_loop().time() + settle
    while True:
        net.check_running()
        records = await read_all(net.settings, [EVENTS_CLEAN])
        seen = Counter(orjson.loads(r.value)["event_id"] for r in records if r.value)
        if wanted <= seen.keys() or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(3)
    insights = await read_all(net.settings, list(INSIGHT_TOPICS.values()))
    contents: dict[str, set[bytes]] = defaultdict(set)
    for record in insights:
        if record.value:
            insight = orjson.loads(record.value)
            insight.pop("produced_at", None)
            contents[insight["insight_id"]].add(orjson.dumps(insight, option=orjson.OPT_SORT_KEYS))
    lost_by_tenant = {
        tenant: len(ids - seen.keys()) for tenant, ids in load.accepted.items() if ids - seen.keys()
    }
    return Tally(
        accepted=len(wanted),
        cleaned=len(seen),
        lost=len(wanted - seen.keys()),
        duplicated=sum(n - 1 for n in seen.values() if n > 1),
        insights=len(contents),
        insight_conflicts=sum(1 for c in contents.values() if len(c) > 1),
        lost_by_tenant=lost_by_tenant,
    )
