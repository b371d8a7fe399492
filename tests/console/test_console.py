"""The web console in a real browser (Debian's headless chromium) against the real gateway process
on the real broker: sign-in, charts with the right number of points, live updates, the grant
preview against what the grantee then reads, a revoked grantee's page, a wrong key, the operator
view, and partners' markup shown as text. Screenshots of each view are written as artefacts."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import TopicPartition
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from schemas.insights import (
    NETWORK_TENANT,
    Benchmark,
    ClusterAssignment,
    Insight,
    Prediction,
    Provenance,
    Statistics,
    TextInsight,
)
from shared.kafka import create_consumer, create_producer, ensure_topics, started
from tests.console.conftest import INDUSTRY, Firms, Platform, sign_in, wait
from tests.factories import sales_event
from tests.insight_helpers import publish

pytestmark = pytest.mark.integration

DAY0 = datetime(2025, 1, 1, tzinfo=UTC)


def daily(day: int, partners: int = 1) -> Provenance:
    start = DAY0 + timedelta(days=day)
    return Provenance(
        window_start=start,
        window_end=start + timedelta(days=1),
        contributing_partners=partners,
        event_count=10,
        source_topics=["events.clean.v1"],
        schema_versions={"sales_order_line": 1},
        service="analytics",
        service_version="test",
        produced_at=datetime.now(UTC),
    )


def one_statistic(tenant: str, metric: str, day: int, offset: float = 0.0) -> Statistics:
    return Statistics(
        tenant=tenant,
        metric=metric,
        count=10,
        mean=100 + day + offset,
        std=1.0,
        min=0.0,
        p25=1.0,
        p50=2.0,
        p75=3.0,
        max=4.0,
        provenance=daily(day),
    )


def year_of_statistics(tenant: str, metrics: list[str], days: int) -> list[Insight]:
    return [
        one_statistic(tenant, metric, day, 10 * m)
        for m, metric in enumerate(metrics)
        for day in range(days)
    ]


def benchmarks(metric: str, days: int, industry: str = INDUSTRY) -> list[Insight]:
    return [
        Benchmark(
            tenant=NETWORK_TENANT,
            visibility="public",
            metric=metric,
            industry=industry,
            region="cn-east",
            firms=5,
            quantiles={"p25": 90.0 + day, "p50": 100.0 + day, "p75": 110.0 + day},
            mean=100.0 + day,
            provenance=daily(day, 5),
        )
        for day in range(days)
    ]


def js(browser: WebDriver, script: str, *args: Any) -> Any:
    return browser.execute_script(script, *args)


def feed_ids(browser: WebDriver, owner: str) -> set[str]:
    return set(
        js(
            browser,
            "return [...document.querySelectorAll('#feed tbody tr')]"
            ".filter(r => r.dataset.owner === arguments[0]).map(r => r.dataset.insightId)",
            owner,
        )
    )


def signed_in(browser: WebDriver) -> bool:
    return bool(js(browser, "return document.getElementById('feed').dataset.ready === 'true'"))


# --------------------------------------------------------------------------- HTTP, no browser


def test_the_page_is_static_public_and_locked_down(platform: Platform, firms: Firms) -> None:
    status, headers, body = platform.http("GET", "/console/")
    assert status == 200
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp and "http" not in csp  # no foreign origin
    html = body.decode()
    assert "<script>" not in html and "<style" not in html and " style=" not in html
    assert firms.a not in html  # nothing of a tenant before sign-in
    for asset in ("console.js", "console.css", "vendor/uPlot.iife.min.js"):
        assert platform.http("GET", f"/console/{asset}")[0] == 200
    assert platform.http("GET", "/console/../pyproject.toml")[0] == 404
    assert platform.http("GET", "/console/%2e%2e/pyproject.toml")[0] == 404
    # the data routes are not public
    assert platform.http("GET", "/v1/console/me")[0] == 401
    assert platform.http("GET", "/v1/console/publishing")[0] == 401
    me = platform.get_json("/v1/console/me", firms.keys[firms.a])
    assert me == {
        "tenant": firms.a,
        "name": me["name"],
        "kind": "partner",
        "industry": INDUSTRY,
        "region": "cn-east",
        "statistics_metrics": [],
    }


def test_operator_routes_take_the_operator_token_and_no_tenant_key(
    platform: Platform, firms: Firms
) -> None:
    assert platform.http("GET", "/v1/operator/overview")[0] == 401
    assert platform.http("GET", "/v1/operator/overview", firms.keys[firms.a])[0] == 401
    status, _, body = platform.http("GET", "/v1/operator/overview", platform.operator_token)
    assert status == 200, body[:300]
    overview = json.loads(body)
    assert {t["tenant"] for t in overview["tenants"]} >= {firms.a, firms.b, firms.bank}
    assert "sha256" not in body.decode()
    (ingest,) = overview["services"]
    assert ingest["ready"] is True
    assert any(s["name"].startswith("xietong_ingest_") for s in ingest["metrics"])


async def test_operator_lag_is_end_minus_committed(platform: Platform) -> None:
    """A service group's lag, from the broker: 5 records written, 2 committed -> 3."""
    topic = f"console.lag.t{uuid.uuid4().hex[:10]}.v1"
    group = f"ingest-console{uuid.uuid4().hex[:8]}"  # named after a scraped service
    settings = platform.settings
    await ensure_topics(settings, [topic], partitions=1)
    async with started(create_producer(settings)) as producer:
        for n in range(5):
            await producer.send_and_wait(topic, b"x", key=b"k%d" % n, partition=0)
    async with started(create_consumer(settings, group, topic)) as consumer:
        await consumer.getmany(timeout_ms=2000)
        await consumer.commit({TopicPartition(topic, 0): 2})
    overview = json.loads(
        (
            await asyncio.to_thread(
                platform.http, "GET", "/v1/operator/overview", platform.operator_token
            )
        )[2]
    )
    assert overview["lag"][group] == {"topics": {topic: 3}, "total": 3}
    assert overview["topics"][topic] == 5


def test_preview_route_equals_the_grantees_list_after_the_grant(
    platform: Platform, firms: Firms
) -> None:
    # A text insight's pseudonyms are keyed by the grant it is read under. Before: the preview
    # keyed them by a provisional id and the grant got another, so they differed.
    redacted = TextInsight(
        tenant=firms.a,
        provenance=daily(0),
        document_event_id=uuid.uuid4(),
        language="zh",
        label="delay",
        kind="supplier_note",
        entities=["PHONE:" + "ab" * 10, "NAME:" + "cd" * 10],
    )
    asyncio.run(
        publish(
            platform.settings,
            [
                *year_of_statistics(firms.a, ["sales.amount_cny"], 3),
                prediction(firms.a, "9"),
                redacted,
            ],
        )
    )
    wait_listed(platform, firms.keys[firms.a], firms.a, 5)
    proposal = {
        "grantee": firms.bank,
        "insight_types": ["prediction", "text_insight"],
        "purpose": "credit",
    }
    status, _, body = platform.http("POST", "/v1/shares/preview", firms.keys[firms.a], proposal)
    assert status == 200, body
    preview = json.loads(body)
    token = preview.pop("preview")
    assert sorted(i["type"] for i in preview["insights"]) == ["prediction", "text_insight"]
    (shown,) = [i for i in preview["insights"] if i["type"] == "text_insight"]
    assert len(shown["entities"]) == 2 and set(shown["entities"]).isdisjoint(redacted.entities)
    # nothing was granted by previewing
    assert platform.get_json(f"/v1/insights?owner={firms.a}", firms.keys[firms.bank])["count"] == 0
    # another tenant holding the token grants nothing in a's name (the id is a's alone)
    rival = {**proposal, "grantee": firms.b, "preview": token}
    assert platform.http("POST", "/v1/shares", firms.keys[firms.bank], rival)[0] == 201
    status, _, _ = platform.http(
        "POST", "/v1/shares", firms.keys[firms.a], {**proposal, "preview": token}
    )
    assert status == 201
    seen = platform.get_json(f"/v1/insights?owner={firms.a}", firms.keys[firms.bank])
    assert seen == preview
    # a preview grants once
    again = platform.http("POST", "/v1/shares", firms.keys[firms.a], {**proposal, "preview": token})
    assert again[0] == 409
    # the same answer shape for an id no tenant holds (existence is not told)
    status, _, _ = platform.http(
        "POST", "/v1/shares/preview", firms.keys[firms.a], {**proposal, "grantee": "nobody1234"}
    )
    assert status == 200
    bad = {**proposal, "insight_types": ["no_such_type"]}
    assert platform.http("POST", "/v1/shares/preview", firms.keys[firms.a], bad)[0] == 422


def prediction(tenant: str, version: str) -> Prediction:
    return Prediction(
        tenant=tenant,
        target="late_delivery",
        model_name="rf",
        model_version=version,
        label="late",
        probability=0.8,
        provenance=daily(0),
    )


def wait_listed(platform: Platform, key: str, owner: str, count: int) -> None:
    import time

    deadline = time.monotonic() + 90  # a bound for a loaded machine, not a speed check
    while platform.get_json(f"/v1/insights?owner={owner}&limit=1000", key)["count"] < count:
        assert time.monotonic() < deadline, "the gateway's cache never got the insights"
        time.sleep(0.2)


# --------------------------------------------------------------------------- in the browser


def test_a_wrong_key_gets_a_clear_message(
    platform: Platform, driver: WebDriver, screenshot: Any
) -> None:
    sign_in(driver, platform, "xt_notakey00_" + "x" * 20)
    message = wait(driver, lambda b: b.find_element(By.ID, "signin-error").text)
    assert "not accepted" in message and "unknown or has been revoked" in message
    assert js(driver, "return document.body.dataset.view") == "signin"
    screenshot(driver, "signin-wrong-key")
    sign_in(driver, platform, "wrong-token", role="operator")
    message = wait(driver, lambda b: b.find_element(By.ID, "signin-error").text)
    assert message == "This operator token was not accepted."


def test_partner_view_draws_its_data_and_takes_live_updates(
    platform: Platform, firms: Firms, driver: WebDriver, screenshot: Any
) -> None:
    metrics = ["inventory.on_hand", "purchasing.amount_cny", "sales.amount_cny"]
    days = 40
    cluster = ClusterAssignment(
        tenant=firms.a,
        cluster=1,
        k=2,
        silhouette=0.61,
        features=["sales.amount_cny", "inventory.on_hand"],
        profiles=[
            {"sales.amount_cny": 10.0, "inventory.on_hand": 5.0},
            {"sales.amount_cny": 90.0, "inventory.on_hand": 40.0},
        ],
        cluster_sizes=[3, 2],
        model_version="fit-42",
        provenance=daily(days),
    )
    asyncio.run(
        publish(
            platform.settings,
            [
                *year_of_statistics(firms.a, metrics, days),
                *benchmarks("sales.amount_cny", days),
                *benchmarks("inventory.on_hand", days - 10),
                *benchmarks("sales.amount_cny", days, industry="bakeries"),  # not ours
                cluster,
                prediction(firms.a, "7"),
            ],
        )
    )
    wait_listed(platform, firms.keys[firms.a], firms.a, len(metrics) * days + 2)
    # publishing health: two records accepted, one refused (quantity is no number)
    events = [sales_event(firms.a, seq=1), sales_event(firms.a, seq=2), sales_event(firms.a, seq=3)]
    events[2]["payload"]["quantity"] = "ten"
    status, _, body = platform.http("POST", "/v1/events", firms.keys[firms.a], events)
    assert status == 202, body

    sign_in(driver, platform, firms.keys[firms.a])
    wait(driver, signed_in)
    points = js(
        driver,
        "return Object.fromEntries([...document.querySelectorAll('#stats figure')]"
        ".map(f => [f.dataset.metric, [Number(f.dataset.points), Number(f.dataset.bandPoints)]]))",
    )
    assert points == {
        "inventory.on_hand": [days, days - 10],
        "purchasing.amount_cny": [days, 0],
        "sales.amount_cny": [days, days],
    }
    # what uPlot holds: the own line's non-empty points, the band's lower edge
    drawn = js(
        driver,
        "const p = window.xietongConsole.charts.get('stat:sales.amount_cny').plot;"
        "return [p.data.length, p.data[p.data.length-1].filter(v => v !== null).length,"
        " p.data[1].filter(v => v !== null).length, p.data[0].length]",
    )
    assert drawn == [5, days, days, days]  # x, band low, band high, median, us
    assert js(driver, "return document.querySelectorAll('#stats canvas').length") == len(metrics)
    cluster_text = driver.find_element(By.ID, "cluster").text
    assert "cluster 1 of 2" in cluster_text and "fit-42" in cluster_text
    # listed if the gateway's cache already had it, else streamed to the page when it does
    prediction_text = "late_delivery = late (p 0.8) — model rf v7"
    wait(driver, lambda b: prediction_text in b.find_element(By.ID, "feed").text)

    # live: one more window of one metric arrives over the stream
    wait(driver, lambda b: b.find_element(By.ID, "live").text == "live")
    later = year_of_statistics(firms.a, ["sales.amount_cny"], days + 1)[-1]
    asyncio.run(publish(platform.settings, [later]))
    wait(
        driver,
        lambda b: (
            js(
                b,
                "return document.querySelector('#stats figure[data-metric=\"sales.amount_cny\"]')"
                ".dataset.points",
            )
            == str(days + 1)
        ),
    )
    assert str(later.insight_id) in feed_ids(driver, firms.a)

    # publishing health
    health = (
        "const c = document.getElementById('publishing-chart').dataset;"
        "return [c.accepted, c.refused]"
    )
    wait(driver, lambda b: js(b, health) == ["2", "1"], timeout=45)
    reasons = driver.find_element(By.ID, "reasons").text
    assert "payload.quantity" in reasons
    screenshot(driver, "partner")


def test_a_grants_preview_equals_what_the_grantee_sees_and_a_revoked_grantee_stops_receiving(
    platform: Platform, firms: Firms, driver: WebDriver, screenshot: Any
) -> None:
    a, b = firms.a, firms.b
    shared = [prediction(a, "1"), prediction(a, "2")]
    private = year_of_statistics(a, ["sales.amount_cny"], 2)  # not granted
    asyncio.run(publish(platform.settings, [*shared, *private]))
    wait_listed(platform, firms.keys[a], a, 4)

    sign_in(driver, platform, firms.keys[a])
    wait(driver, signed_in)
    driver.find_element(By.ID, "grantee").send_keys(b)
    driver.find_element(By.CSS_SELECTOR, "#share-types input[value=prediction]").click()
    driver.find_element(By.ID, "purpose").send_keys("joint planning")
    driver.find_element(By.ID, "preview-button").click()
    wait(driver, lambda d: js(d, "return document.getElementById('preview').dataset.count") == "2")
    previewed = set(
        js(
            driver,
            "return [...document.querySelectorAll('#preview tbody tr')]"
            ".map(r => r.dataset.insightId)",
        )
    )
    assert previewed == {str(i.insight_id) for i in shared}
    driver.find_element(By.ID, "grant-button").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#granted tr[data-status=active]"))
    grant_id = driver.find_element(
        By.CSS_SELECTOR, "#granted tr[data-status=active]"
    ).get_attribute("data-grant-id")
    screenshot(driver, "partner-sharing")

    # the grantee's page shows exactly the previewed insights of a
    sign_in(driver, platform, firms.keys[b])
    wait(driver, signed_in)
    assert feed_ids(driver, a) == previewed
    wait(driver, lambda d: d.find_element(By.ID, "live").text == "live")
    # live under the grant, then revoked while the page is open
    under_grant = prediction(a, "3")
    asyncio.run(publish(platform.settings, [under_grant]))
    wait(driver, lambda d: str(under_grant.insight_id) in feed_ids(d, a))
    status, _, _ = platform.http("DELETE", f"/v1/shares/{grant_id}", firms.keys[a])
    assert status == 200
    wait(driver, lambda d: "ended (revoked)" in d.find_element(By.ID, "notices").text)
    after = prediction(a, "4")
    own = year_of_statistics(b, ["sales.amount_cny"], 1)[0]
    asyncio.run(publish(platform.settings, [after, own]))  # a's first, then b's own
    wait(driver, lambda d: str(own.insight_id) in feed_ids(d, b))
    assert str(after.insight_id) not in feed_ids(driver, a)
    assert (
        js(driver, "return document.querySelector('#received tr[data-status]').dataset.status")
        == "revoked"
    )


def test_partners_markup_in_events_renders_as_text(
    platform: Platform, firms: Firms, driver: WebDriver, screenshot: Any
) -> None:
    hostile = "<script>window.__pwned = 1</script>"
    image = '<img src=x onerror="window.__pwned = 2">'

    def text_insight(label: str) -> TextInsight:
        return TextInsight(
            tenant=firms.a,
            provenance=daily(0),
            document_event_id=uuid.uuid4(),
            language="en",
            label=label,
            key_terms=[hostile, image],
            kind="<b>customer_feedback</b>",
        )

    marked_metric = "<i>sales</i><svg onload=window.__pwned=3>"
    listed = text_insight("<u>listed</u>")
    asyncio.run(
        publish(
            platform.settings,
            [listed, *year_of_statistics(firms.a, [marked_metric], 2)],
        )
    )
    wait_listed(platform, firms.keys[firms.a], firms.a, 3)
    sign_in(driver, platform, firms.keys[firms.a])
    wait(driver, signed_in)
    wait(driver, lambda d: d.find_element(By.ID, "live").text == "live")
    streamed = text_insight("<u>streamed</u>")
    asyncio.run(publish(platform.settings, [streamed]))
    wait(driver, lambda d: str(streamed.insight_id) in feed_ids(d, firms.a))
    feed = driver.find_element(By.ID, "feed").text
    assert f"<b>customer_feedback</b>: <u>streamed</u>; key terms: {hostile}, {image}" in feed
    assert "<u>listed</u>" in feed
    assert driver.find_element(By.CSS_SELECTOR, "#stats figcaption").text == marked_metric
    # none of it became markup, nothing ran
    assert js(driver, "return window.__pwned === undefined") is True
    for tag in ("img", "b", "u", "i", "svg"):
        assert not driver.find_elements(By.CSS_SELECTOR, f"#feed {tag}, #stats figcaption {tag}")
    screenshot(driver, "partner-markup-as-text")


def test_operator_view_shows_the_network(
    platform: Platform, firms: Firms, driver: WebDriver, screenshot: Any
) -> None:
    sign_in(driver, platform, platform.operator_token, role="operator")
    wait(driver, lambda d: js(d, "return document.body.dataset.view") == "operator")
    wait(
        driver,
        lambda d: (
            int(js(d, "return document.getElementById('operator').dataset.snapshots || 0")) >= 2
        ),
    )
    # records arrive meanwhile: the topic rates chart has at least one series
    status, _, _ = platform.http(
        "POST", "/v1/events", firms.keys[firms.a], [sales_event(firms.a, seq=n) for n in range(20)]
    )
    assert status == 202
    wait(
        driver,
        lambda d: int(js(d, "return document.getElementById('op-rates').dataset.topics || 0")) >= 1,
    )
    tenants = driver.find_element(By.ID, "op-tenants").text
    assert firms.a in tenants and firms.bank in tenants
    services = driver.find_element(By.CSS_SELECTOR, "#op-services tr[data-service=ingest]").text
    assert "ready" in services and "not ready" not in services
    wait(
        driver,
        lambda d: int(js(d, "return document.getElementById('operator').dataset.snapshots")) >= 6,
    )
    screenshot(driver, "operator")


@pytest.mark.slow
def test_first_paint_and_memory_are_measured_and_reported(
    kafka_bootstrap: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reported, not asserted (``make console-bench`` runs the 10-minute soak)."""
    from tests.console.measure import DAYS, measure

    report = measure(kafka_bootstrap, tmp_path, soak_seconds=20)
    paint = report["year_of_10_metrics"]
    assert paint["points_per_chart"] == [DAYS] * 10  # the measured page held the whole year
    live = report["live_stream"]
    assert live["samples"][-1]["received"] > 0
    with capsys.disabled():
        first, last = live["samples"][0], live["samples"][-1]
        print(
            f"\nconsole: first paint {paint['first_paint_ms']} ms (10 metrics x {DAYS} days); "
            f"50 insights/s for 20 s: heap {first['heap_mb']} -> {last['heap_mb']} MB, "
            f"DOM nodes {first['dom_nodes']} -> {last['dom_nodes']}"
        )
