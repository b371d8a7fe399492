"""``GET /v1/rates`` against the real broker: partners read the dated rates clean converts with."""

from __future__ import annotations

import random
import string
from collections.abc import AsyncIterator

import pytest

from schemas.reference import FxRate
from services.ingest.rates import RATES_KEY
from shared.compacted import wall_ms as now_ms
from shared.rates import publish_rates
from shared.settings import XietongSettings
from tests.ingest.test_gateway import Gateway, ingest_settings, running_gateway

pytestmark = pytest.mark.integration


@pytest.fixture
async def gateway(settings: XietongSettings) -> AsyncIterator[Gateway]:
    async for running in running_gateway(ingest_settings(settings)):
        yield running


def currency() -> str:
    """A code of this test's own: the rates topic is shared by every test on the broker."""
    return "Q" + "".join(random.choices(string.ascii_uppercase, k=2))


async def test_partners_read_the_dated_rates_and_the_rate_of_a_date(
    gateway: Gateway, settings: XietongSettings
) -> None:
    code = currency()
    rates = [
        FxRate(currency=code, date=day, cny_per_unit=rate, source="PBOC central parity")  # type: ignore[arg-type]
        for day, rate in (("2026-11-29", "7.6512"), ("2026-11-30", "7.7012"))
    ]
    await publish_rates(settings, rates)
    await gateway.client.app[RATES_KEY].caught_up(now_ms())

    answer = await gateway.client.get(f"/v1/rates?currency={code}", headers=gateway.auth())
    assert answer.status == 200
    assert (await answer.json())["rates"] == [r.model_dump(mode="json") for r in rates]

    for day, expected in (("2026-11-29", "7.6512"), ("2026-12-24", "7.7012")):
        answer = await gateway.client.get(
            "/v1/rates", params={"currency": code, "date": day}, headers=gateway.auth()
        )
        (rate,) = (await answer.json())["rates"]
        assert rate["cny_per_unit"] == expected
    answer = await gateway.client.get(
        "/v1/rates", params={"currency": code, "date": "2026-11-28"}, headers=gateway.auth()
    )
    assert answer.status == 404
    assert (await answer.json())["error"] == f"no {code} rate on or before 2026-11-28"


async def test_rates_need_a_key(gateway: Gateway) -> None:
    assert (await gateway.client.get("/v1/rates")).status == 401
