"""Dated exchange rates to yuan, kept on ``reference.fx-rates.v1`` (:mod:`schemas.reference`).

:class:`RatesWriter` publishes rates (the CLI, the demo, test fixtures); :class:`RatesReader`
reads the topic from the beginning into an :class:`FxRates` table and then follows it (the clean
service converts with it, the gateway serves it to partners at ``GET /v1/rates``).

**Which rate an event gets** (:meth:`FxRates.rate_for`): the rate of the latest date on or
before the event's date (UTC), *among the rates published before the event was written to the
raw topic* (each rate record's Kafka timestamp against the raw record's). A rate published later
— for any date, or a correction of a date's rate — applies to events that arrive after it, never
to one already there. So converting an event does not depend on when the clean hop happens to
read it: cleaning it again (after a crash, a rebuilt store, a replay into a new clean topic)
picks the same rate, because the hop first makes sure it has read the rates topic past that
moment (:meth:`RatesReader.caught_up`). The table keeps every version of a key it read;
compaction may drop superseded versions after a while, so a replay long after a correction sees
only the corrected rate (the clean event records the rate it used either way).

The reader is a :class:`shared.compacted.CompactedView`, like the control plane: it never blocks
on a lock, :meth:`RatesReader.caught_up` asks for a sync at once, and :meth:`RatesReader.problem`
says when it could not confirm it is current for ``control_max_staleness_seconds``.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from schemas.reference import FxRate
from schemas.topics import REFERENCE_FX_RATES
from shared.codec import decode, encode
from shared.compacted import CompactedView, Where
from shared.kafka import (
    BatchPublisher,
    OutRecord,
    create_consumer,
    create_producer,
    ensure_topics,
    stop_consumer,
)
from shared.settings import XietongSettings

log = logging.getLogger(__name__)

DEMO_RATES: dict[str, str] = {
    "USD": "7.10",
    "EUR": "7.70",
    "JPY": "0.047",
    "KRW": "0.0051",
    "GBP": "9.00",
    "HKD": "0.91",
}
"""Yuan per unit: the demo's (and the test fixtures') initial rates, published to the rates
topic with an early date; an operator publishes the day's reference rates instead."""
DEMO_RATES_DATE = date(2000, 1, 1)
DEMO_RATES_SOURCE = "demo seed (not a reference rate)"


def demo_rates() -> list[FxRate]:
    return [
        FxRate(currency=c, date=DEMO_RATES_DATE, cny_per_unit=r, source=DEMO_RATES_SOURCE)
        for c, r in DEMO_RATES.items()
    ]


@dataclass(frozen=True, slots=True)
class UsedRate:
    """The rate an event was converted with."""

    currency: str
    date: date
    rate: Decimal
    source: str


@dataclass
class _Day:
    """The versions of one currency's rate for one date, in the order they were published."""

    published: list[int] = field(default_factory=list)
    rates: list[FxRate] = field(default_factory=list)

    def as_of(self, moment_ms: int) -> FxRate | None:
        index = bisect_right(self.published, moment_ms)
        return self.rates[index - 1] if index else None


class FxRates:
    """Every rate read, per currency and date, with when each version was published."""

    def __init__(self) -> None:
        self._days: dict[str, dict[date, _Day]] = {}
        self._dates: dict[str, list[date]] = {}
        self.synced_ms = 0
        """Wall-clock time (ms) at which the last completed read up to the topic's end began:
        every rate published before it is in the table."""

    def add(self, rate: FxRate, published_ms: int) -> None:
        days = self._days.setdefault(rate.currency, {})
        day = days.get(rate.date)
        if day is None:
            day = days[rate.date] = _Day()
            dates = self._dates.setdefault(rate.currency, [])
            dates.insert(bisect_right(dates, rate.date), rate.date)
        at = bisect_right(day.published, published_ms)  # compaction keeps order; be safe anyway
        day.published.insert(at, published_ms)
        day.rates.insert(at, rate)

    def rate_for(self, currency: str, day: date, as_of_ms: int | None = None) -> UsedRate | None:
        """The rate of the latest date on or before ``day`` among the versions published by
        ``as_of_ms`` (None: everything read); None when there is none."""
        dates = self._dates.get(currency)
        if not dates:
            return None
        moment = as_of_ms if as_of_ms is not None else 2**63
        days = self._days[currency]
        for index in range(bisect_right(dates, day) - 1, -1, -1):
            found = days[dates[index]].as_of(moment)
            if found is not None:
                return UsedRate(currency, found.date, found.rate, found.source)
        return None

    def current(self, currency: str | None = None) -> list[FxRate]:
        """The rate in force for every (currency, date) now: the latest version of each key."""
        out: list[FxRate] = []
        for name in sorted(self._days) if currency is None else [currency]:
            for day in self._dates.get(name, []):
                out.append(self._days[name][day].rates[-1])
        return out


class RatesWriter:
    """Publishes rates (acks=all) to the compacted rates topic."""

    def __init__(self, settings: XietongSettings, topic: str = REFERENCE_FX_RATES) -> None:
        self.settings = settings
        self.topic = topic
        self._producer = create_producer(settings)
        self._publisher = BatchPublisher(self._producer)

    async def __aenter__(self) -> RatesWriter:
        await ensure_topics(self.settings, [self.topic], partitions=1, compacted=[self.topic])
        await self._producer.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self._producer.stop()

    async def put(self, rates: list[FxRate]) -> None:
        """Publish ``rates`` in order; returns once Kafka acknowledged every one."""
        records = [OutRecord(rate.key.encode(), encode(rate)) for rate in rates]
        await self._publisher.publish(self.topic, records)


async def publish_rates(
    settings: XietongSettings, rates: list[FxRate], topic: str = REFERENCE_FX_RATES
) -> None:
    async with RatesWriter(settings, topic) as writer:
        await writer.put(rates)


class RatesReader(CompactedView):
    """The rates topic in memory (:attr:`table`), followed in the background; fails closed."""

    what = "rates reader"

    def __init__(self, settings: XietongSettings, topic: str = REFERENCE_FX_RATES) -> None:
        super().__init__(settings, [topic])
        self.topic = topic
        self.table = FxRates()

    async def __aenter__(self) -> RatesReader:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Read everything published so far, then follow the topic in the background."""
        await ensure_topics(self.settings, [self.topic], partitions=1, compacted=[self.topic])
        consumer = create_consumer(self.settings, None, enable_auto_commit=False)
        await consumer.start()
        try:
            await self.follow(consumer)
        except BaseException:
            await stop_consumer(consumer)
            raise

    async def stop(self) -> None:
        await self.stop_following()
        if self._consumer is not None:
            await stop_consumer(self._consumer)

    def take(self, record: ConsumerRecord[bytes, bytes], key: str, where: Where) -> None:
        if record.value is None:
            return  # a tombstone: the version it follows stays for what came before
        try:
            rate = FxRate.model_validate(decode(record.value))
        except (ValidationError, ValueError, TypeError):
            log.error("unreadable rate skipped", extra=where)
            return
        if key != rate.key:
            log.error("rate whose key is not its currency/date skipped", extra=where)
            return
        self.table.add(rate, record.timestamp)

    def _synced(self, started: float, started_ms: int) -> None:
        self.table.synced_ms = started_ms  # what FxRates.rate_for may trust as read
        super()._synced(started, started_ms)
