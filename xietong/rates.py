"""``xietong rates``: the dated exchange rates on ``reference.fx-rates.v1`` (:mod:`shared.rates`).

- ``xietong rates set EUR 7.7012 --date 2026-11-30 --source "PBOC central parity"``
- ``xietong rates load rates.csv`` — columns ``currency,date,cny_per_unit,source``
- ``xietong rates list [--currency EUR]`` — what every partner sees at ``GET /v1/rates``

The clean service converts an event with the rate of the latest date on or before its date
(UTC) among the rates published before the event arrived; publishing a date's rate again
corrects it for events that arrive afterwards.
"""

from __future__ import annotations

import asyncio
import csv
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from schemas.reference import FxRate
from shared.rates import RatesReader, publish_rates


@click.group()
def rates() -> None:
    """Dated exchange rates to CNY, which clean converts prices with."""


def _rate(currency: str, day: str, value: str, source: str, where: str) -> FxRate:
    try:
        return FxRate(currency=currency, date=day, cny_per_unit=value, source=source)  # type: ignore[arg-type]
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise click.ClickException(f"{where}: {problems}") from None


@rates.command("set")
@click.argument("currency")
@click.argument("cny_per_unit")
@click.option("--date", "day", default=None, help="YYYY-MM-DD (default: today, UTC).")
@click.option("--source", required=True, help="Who published the rate.")
@click.pass_obj
def rates_set(obj: Any, currency: str, cny_per_unit: str, day: str | None, source: str) -> None:
    """Publish the rate of CURRENCY (yuan per unit) for a date."""
    rate = _rate(
        currency, day or datetime.now(UTC).date().isoformat(), cny_per_unit, source, "rate"
    )
    asyncio.run(publish_rates(obj.settings(), [rate]))
    click.echo(f"{rate.key} = {rate.cny_per_unit} CNY ({rate.source})")


@rates.command("load")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.pass_obj
def rates_load(obj: Any, path: Path) -> None:
    """Publish every rate of a CSV file (currency,date,cny_per_unit,source); all or none."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"currency", "date", "cny_per_unit", "source"} - set(reader.fieldnames or ())
        if missing:
            raise click.ClickException(f"{path}: missing columns {sorted(missing)}")
        loaded = [
            _rate(row["currency"], row["date"], row["cny_per_unit"], row["source"], f"row {n}")
            for n, row in enumerate(reader, start=2)
        ]
    asyncio.run(publish_rates(obj.settings(), loaded))
    click.echo(f"{len(loaded)} rates published")


@rates.command("list")
@click.option("--currency", default=None, help="Only this currency.")
@click.option("--date", "day", default=None, help="The rate an event of this date gets.")
@click.pass_obj
def rates_list(obj: Any, currency: str | None, day: str | None) -> None:
    """The rates in force, as partners see them."""

    async def read() -> list[FxRate]:
        async with RatesReader(obj.settings()) as reader:
            if day is None:
                return reader.table.current(currency)
            if currency is None:
                raise click.ClickException("--date needs --currency")
            used = reader.table.rate_for(currency, date.fromisoformat(day))
            if used is None:
                click.echo(f"no {currency} rate on or before {day}", err=True)
                sys.exit(1)
            return [
                FxRate(
                    currency=used.currency,
                    date=used.date,
                    cny_per_unit=format(used.rate, "f"),
                    source=used.source,
                )
            ]

    for rate in asyncio.run(read()):
        click.echo(f"{rate.currency}  {rate.date}  {rate.cny_per_unit:>14}  {rate.source}")
