"""``GET /v1/rates``: the dated exchange rates the clean service converts with, for partners.

The rates live on ``reference.fx-rates.v1`` (:mod:`schemas.reference`); the gateway follows the
topic with a :class:`shared.rates.RatesReader` and answers from memory. Authenticated like every
route (any valid key: the rates are the same for every partner).

- ``?currency=EUR`` — every dated rate of that currency (all currencies without it);
- ``?currency=EUR&date=2026-11-30`` — the rate an event of that date (UTC) is converted with:
  the latest date on or before it (404 when there is none, as clean dead-letters such an event).

The answer is ``{"rates": [FxRate ...]}``; 503 with ``Retry-After`` while the reader cannot
confirm it is current.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import date

from aiohttp import web

from schemas.reference import FxRate
from services.ingest.openapi import describe
from services.ingest.settings import IngestSettings
from shared.codec import json_response
from shared.rates import RatesReader

RATES_KEY = web.AppKey("xietong.rates", RatesReader)
_CURRENCY = re.compile(r"[A-Z]{3}")


def _error(status: int, message: str, **headers: str) -> web.Response:
    return json_response({"error": message}, status=status, headers=headers or None)


async def get_rates(request: web.Request) -> web.Response:
    """The dated rates, or the rate in force for a date (see the module docstring)."""
    reader = request.app[RATES_KEY]
    problem = reader.problem()
    if problem is not None:
        return _error(503, problem, **{"Retry-After": "2"})
    # Given empty is given: refused as the document's pattern and format say, not ignored.
    currency = request.query.get("currency")
    day_text = request.query.get("date")
    if currency is not None and _CURRENCY.fullmatch(currency) is None:
        return _error(400, "currency must be an ISO 4217 code such as EUR")
    if day_text is None:
        rates = reader.table.current(currency)
        return json_response({"rates": [rate.model_dump(mode="json") for rate in rates]})
    if currency is None:
        return _error(400, "a date needs a currency: ?currency=EUR&date=2026-11-30")
    try:
        day = date.fromisoformat(day_text)
    except ValueError:
        return _error(400, "date must be YYYY-MM-DD")
    used = reader.table.rate_for(currency, day)
    if used is None:
        return _error(404, f"no {currency} rate on or before {day.isoformat()}")
    rate = FxRate(
        currency=used.currency,
        date=used.date,
        cny_per_unit=format(used.rate, "f"),
        source=used.source,
    )
    return json_response({"rates": [rate.model_dump(mode="json")]})


def setup_rates_routes(app: web.Application, settings: IngestSettings) -> None:
    """Serve ``GET /v1/rates`` on ``app``; its rates reader starts and stops with the app."""

    async def reader(app: web.Application) -> AsyncIterator[None]:
        async with RatesReader(settings) as rates:
            app[RATES_KEY] = rates
            yield

    app.cleanup_ctx.append(reader)
    app.router.add_get("/v1/rates", get_rates)
    describe(
        "GET",
        "/v1/rates",
        {
            "summary": "Dated exchange rates to CNY (reference.fx-rates.v1).",
            "description": "Every dated rate, or with `currency` and `date` the rate an event "
            "of that date (UTC) is converted with: the latest on or before it.",
            "parameters": [
                {
                    "name": "currency",
                    "in": "query",
                    "schema": {"type": "string", "pattern": _CURRENCY.pattern},
                },
                {"name": "date", "in": "query", "schema": {"type": "string", "format": "date"}},
            ],
            "responses": {
                "200": {"description": "`{rates: [FxRate]}`"},
                "400": {"description": "A malformed currency or date."},
                "404": {"description": "No rate of the currency on or before the date."},
            },
        },
    )
