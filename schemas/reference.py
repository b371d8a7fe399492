"""Reference data every partner can see: dated exchange rates to yuan.

``reference.fx-rates.v1`` is compacted and keyed ``<CURRENCY>/<YYYY-MM-DD>`` (``EUR/2026-11-30``):
one rate per currency and date, the latest record of a key being the one in force (a correction
is the same key published again). The operator publishes them (``xietong rates set`` / ``load``);
partners read them (``GET /v1/rates``, ``xietong rates list``); the clean service converts every
price with the rate of the latest date on or before the event's date (UTC) and records the rate
it used on the clean event (:class:`schemas.events.Conversion`).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from pydantic import Field, field_validator

from schemas.events import Contract, CurrencyCode

RATE_PATTERN = r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,12})?$"


class FxRate(Contract):
    """Yuan per unit of a currency on a date, and who published it."""

    currency: CurrencyCode = Field(description="The currency priced (not CNY).")
    date: dt.date = Field(description="The date the rate is for (UTC dates of events).")
    cny_per_unit: str = Field(
        pattern=RATE_PATTERN,
        description="Yuan per one unit of `currency`, an exact decimal string greater than 0 "
        "(at most 12 digits before and 12 after the point).",
    )
    source: str = Field(
        min_length=1, max_length=200, description="Who published it, e.g. PBOC central parity."
    )

    @field_validator("cny_per_unit")
    @classmethod
    def _positive(cls, value: str) -> str:
        if not Decimal(value):
            raise ValueError("a rate must be greater than 0")
        return value

    @field_validator("currency")
    @classmethod
    def _not_yuan(cls, value: str) -> str:
        if value == "CNY":
            raise ValueError("CNY needs no rate: it is the currency everything is converted to")
        return value

    @property
    def rate(self) -> Decimal:
        return Decimal(self.cny_per_unit)

    @property
    def key(self) -> str:
        """The record key on ``reference.fx-rates.v1``."""
        return rate_key(self.currency, self.date)


def rate_key(currency: str, day: dt.date) -> str:
    return f"{currency}/{day.isoformat()}"
