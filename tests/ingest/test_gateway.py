"""The ingest gateway against the real local Kafka: every bad input, auth, retries, CSV, unicode."""

from __future__ import annotations

import asyncio
import gzip
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from aiokafka import ConsumerRecord, TopicPartition

from deploy.local.infra import free_port
from schemas.control import ApiKey, Tenant
from schemas.events import EVENT_MODELS
from schemas.topics import EVENTS_RAW, dlq
from services.ingest.app import create_app, create_operator_app, operator_port
from services.ingest.handlers import METRICS_KEY, PUBLISHER_KEY, ErrorAnswer, IngestAnswer
from services.ingest.settings import IngestSettings
from shared.control import ControlRegistry, ControlWriter, issue_api_key, new_id
from shared.httpauth import REGISTRY_KEY
from shared.kafka import create_consumer
from shared.settings import XietongSettings
from tests.factories import sales_event

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@dataclass
class Gateway:
    client: TestClient[Any, Any]
    settings: IngestSettings
    writer: ControlWriter
    tenant: str
    key: str
    key_record: ApiKey

    @property
    def registry(self) -> ControlRegistry:
        registry: ControlRegistry = self.client.app[REGISTRY_KEY]
        return registry

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    async def post(
        self, body: bytes | str, content_type: str, *, key: str | None = None, **params: str
    ) -> tuple[int, Any]:
        response = await self.client.post(
            "/v1/events",
            data=body.encode() if isinstance(body, str) else body,
            headers={**self.auth(key), "Content-Type": content_type},
            params=params,
        )
        answer = await response.json(content_type=None)
        return response.status, answer

    async def add_tenant(self, tenant: str, kind: str = "partner") -> str:
        """Create another tenant with a key; return the key once the gateway knows it."""
        await self.writer.put_tenant(
            Tenant(tenant=tenant, name=tenant.title(), kind=kind, created_at=T0)  # type: ignore[arg-type]
        )
        plaintext, record = issue_api_key(tenant)
        await self.writer.put_key(record)
        await until_known(self.registry, plaintext)
        return plaintext


async def until_known(registry: ControlRegistry, key: str, known: bool = True) -> None:
    """The registry is eventually consistent: wait until it (no longer) knows ``key``."""
    async with asyncio.timeout(20):
        while (registry.authenticate(key) is not None) != known:
            await registry.wait_changed(registry.version, 1)


def ingest_settings(settings: XietongSettings, **overrides: Any) -> IngestSettings:
    return IngestSettings(**{**settings.model_dump(), "ingest_with_insights": False, **overrides})


async def running_gateway(settings: IngestSettings) -> AsyncIterator[Gateway]:
    tenant = f"t{new_id()}"
    plaintext, record = issue_api_key(tenant)
    async with ControlWriter(settings) as writer:
        await writer.put_tenant(Tenant(tenant=tenant, name="Acme 精密", created_at=T0))
        await writer.put_key(record)
        client = TestClient(TestServer(create_app(settings), host="127.0.0.1"))
        await client.start_server()
        try:
            gateway = Gateway(client, settings, writer, tenant, plaintext, record)
            await until_known(gateway.registry, plaintext)
            yield gateway
        finally:
            await client.close()


async def read_topic(
    settings: XietongSettings, topic: str, key: str
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` with ``key``, from the beginning to the current end."""
    consumer = create_consumer(settings, None)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = [
                TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()
            ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        found: list[ConsumerRecord[bytes, bytes]] = []
        async with asyncio.timeout(60):
            while any([await consumer.position(tp) < offset for tp, offset in end.items()]):
                batch = await consumer.getmany(timeout_ms=200, max_records=50_000)
                for tp, records in batch.items():
                    found.extend(r for r in records if r.key == key.encode() and r.offset < end[tp])
        return found
    finally:
        await consumer.stop()


# --------------------------------------------------------------------------- fixtures and builders


@pytest.fixture
async def gateway(settings: XietongSettings) -> AsyncIterator[Gateway]:
    async for running in running_gateway(ingest_settings(settings, ingest_max_body_bytes=1 << 20)):
        yield running


def event(tenant: str | None, seq: int = 0, **changes: Any) -> dict[str, Any]:
    body = sales_event(tenant or "x", seq=seq)
    if tenant is None:
        del body["tenant"]
    return {**body, **changes}


def text_event(tenant: str, text: str, language: str = "zh") -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "tenant": tenant,
        "type": "text_document",
        "schema_version": 1,
        "occurred_at": "2026-11-01T08:00:00+08:00",
        "source": {"system": "test"},
        "payload": {"kind": "customer_feedback", "language": language, "text": text},
    }


def ndjson(records: list[Any]) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in records)


CSV_HEADER = (
    "event_id,occurred_at,record_id,order_id,customer_id,product_sku,quantity,unit_price,region"
)


# --------------------------------------------------------------------------- accepted and refused


async def test_json_array_is_validated_published_and_refusals_reach_the_dead_letter_topic(
    gateway: Gateway,
) -> None:
    tenant = gateway.tenant
    good = [event(tenant, seq=i) for i in range(3)] + [event(None, seq=3)]
    bad_quantity = event(tenant, seq=4)
    bad_quantity["payload"]["quantity"] = -1
    unknown_type = event(tenant, seq=5, type="sales_forecast")
    records: list[Any] = [*good, bad_quantity, unknown_type, "not an object", 42]

    status, answer = await gateway.post(orjson.dumps(records), "application/json")

    assert status == 202, answer
    assert (answer["accepted"], answer["refused"]) == (4, 4)
    by_index = {r["index"]: r for r in answer["refusals"]}
    assert set(by_index) == {4, 5, 6, 7}
    assert by_index[4]["field"] == "payload.quantity"
    assert by_index[5]["field"] == "type" and "sales_forecast" in by_index[5]["reason"]
    assert by_index[6]["field"] == "" and "JSON object" in by_index[6]["reason"]

    raw = await read_topic(gateway.settings, EVENTS_RAW, tenant)
    published = [orjson.loads(r.value) for r in raw]
    assert sorted(e["event_id"] for e in published) == sorted(e["event_id"] for e in good)
    assert {e["tenant"] for e in published} == {tenant}  # stamped where the record had none
    letters = [
        orjson.loads(r.value) for r in await read_topic(gateway.settings, dlq(EVENTS_RAW), tenant)
    ]
    assert len(letters) == 4
    originals = {letter["source_ref"].rsplit("#", 1)[1]: letter["original"] for letter in letters}
    assert orjson.loads(originals["4"]) == bad_quantity
    assert orjson.loads(originals["6"]) == "not an object"
    assert all(
        letter["source_ref"].startswith("http:" + answer["request_id"]) for letter in letters
    )


async def test_ndjson_keeps_chinese_and_other_unicode_and_refuses_bad_lines_alone(
    gateway: Gateway,
) -> None:
    tenant = gateway.tenant
    texts = [
        "交货及时，质量稳定，但包装需要改进。",
        "Qualität gut — Lieferung zu spät 😞",
        "नमस्ते; ¿qué tal? «ок» 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    ]
    records = [text_event(tenant, t) for t in texts]
    body = (
        ndjson(records[:1])
        + b"\n   \n"  # blank lines are not records
        + b'{"event_id": "broken\n'
        + b"\xff\xfe not utf-8\n"
        + ndjson(records[1:])
    )
    status, answer = await gateway.post(body, "application/x-ndjson; charset=utf-8")

    assert status == 202, answer
    assert (answer["accepted"], answer["refused"]) == (3, 2)
    assert sorted(r["index"] for r in answer["refusals"]) == [3, 4]  # line numbers
    assert all(r["reason"].startswith("invalid JSON") for r in answer["refusals"])
    raw = await read_topic(gateway.settings, EVENTS_RAW, tenant)
    assert sorted(orjson.loads(r.value)["payload"]["text"] for r in raw) == sorted(texts)
    letters = [
        orjson.loads(r.value) for r in await read_topic(gateway.settings, dlq(EVENTS_RAW), tenant)
    ]
    kept = {(letter["original_encoding"], letter["original"]) for letter in letters}
    assert ("utf-8", '{"event_id": "broken') in kept
    assert ("base64", "//4gbm90IHV0Zi04") in kept  # binary junk kept byte for byte


async def test_event_times_ahead_of_now_or_before_2000_are_refused_per_record_on_every_format(
    gateway: Gateway,
) -> None:
    tenant = gateway.tenant
    ahead = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    times = [ahead, "9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00Z", "2004-02-29T08:00:00Z"]
    records = [event(tenant, seq=i, occurred_at=t) for i, t in enumerate(times)]
    csv_body = (
        "order_id,customer_id,product_sku,quantity,occurred_at\n"
        f"SO-1,C-1,BOLT,5,{ahead}\nSO-2,C-1,BOLT,5,1999-12-31T23:00:00Z\n"
        "SO-3,C-1,BOLT,5,2004-02-29T08:00:00+08:00\n"
    )
    answers = [
        await gateway.post(ndjson(records), "application/x-ndjson"),
        await gateway.post(orjson.dumps(records), "application/json"),
        await gateway.post(csv_body, "text/csv", type="sales_order_line"),
    ]
    for status, answer in answers:
        assert status == 202, answer
        assert answer["accepted"] == 1, answer
        assert {r["field"] for r in answer["refusals"]} == {"occurred_at"}
    assert [a["refused"] for _, a in answers] == [3, 3, 2]
    letters = [
        orjson.loads(r.value) for r in await read_topic(gateway.settings, dlq(EVENTS_RAW), tenant)
    ]
    assert len(letters) == 8
    assert {letter["reason"] for letter in letters} == {"event time out of bounds"}
    assert len(await read_topic(gateway.settings, EVENTS_RAW, tenant)) == 3


async def test_a_client_retry_of_the_same_batch_publishes_the_same_event_ids(
    gateway: Gateway,
) -> None:
    tenant = gateway.tenant
    body = orjson.dumps([event(tenant, seq=i) for i in range(20)])
    first = await gateway.post(body, "application/json")
    second = await gateway.post(body, "application/json")
    assert first[0] == second[0] == 202
    assert first[1]["request_id"] != second[1]["request_id"]

    raw = [
        orjson.loads(r.value)["event_id"]
        for r in await read_topic(gateway.settings, EVENTS_RAW, tenant)
    ]
    # Both deliveries are on the raw topic with the same ids: the clean service keeps the first.
    assert len(raw) == 40 and len(set(raw)) == 20


# --------------------------------------------------------------------------- CSV


def csv_rows(*rows: str, header: str = CSV_HEADER) -> bytes:
    return ("\n".join([header, *rows]) + "\n").encode()


async def test_csv_rows_become_events_and_a_retry_repeats_the_derived_ids(gateway: Gateway) -> None:
    tenant = gateway.tenant
    header = "occurred_at,record_id,order_id,customer_id,product_sku,quantity,unit_price,region"
    body = csv_rows(
        "2026-11-01T08:00:00+08:00,R1,SO-1,C-1,BOLT-M8,10,1.5,华东",
        "2026-11-01T09:00:00+08:00,R2,SO-2,,BOLT-M8,5,,华南",  # empty required cell
        "2026-11-01T10:00:00+08:00,R3,SO-3,C-3,BOLT-M8,abc,2,",  # not a number
        "2026-11-01T11:00:00+08:00,R4,SO-4,C-4,BOLT-M8,3",  # a cell short
        '2026-11-01T12:00:00+08:00,R5,"SO-5, rush",C-5,"螺栓 ""M8""",7,,',  # quoted; empty=missing
        header=header,
    )
    params = {"type": "sales_order_line", "version": "1"}
    status, answer = await gateway.post(body, "text/csv", **params)
    assert status == 202, answer
    assert (answer["accepted"], answer["refused"]) == (2, 3)
    reasons = {(r["index"], r["field"]) for r in answer["refusals"]}
    assert reasons == {(1, "payload.customer_id"), (2, "payload.quantity"), (3, "")}

    again = await gateway.post(body, "text/csv", **params)
    assert again[0] == 202
    events = [orjson.loads(r.value) for r in await read_topic(gateway.settings, EVENTS_RAW, tenant)]
    assert len(events) == 4 and len({e["event_id"] for e in events}) == 2
    fifth = next(e for e in events if e["source"]["record_id"] == "R5")
    assert fifth["payload"]["order_id"] == "SO-5, rush"
    assert fifth["payload"]["product_sku"] == '螺栓 "M8"'
    assert fifth["payload"]["quantity"] == 7.0 and fifth["payload"]["unit_price"] is None
    assert fifth["source"]["system"] == "csv"

    # Another body (one more row) is another request: its ids differ.
    longer = body + b"2026-11-01T13:00:00+08:00,R6,SO-6,C-6,BOLT-M8,1,1,\n"
    third = await gateway.post(longer, "text/csv", **params)
    assert third[1]["accepted"] == 3
    events = [orjson.loads(r.value) for r in await read_topic(gateway.settings, EVENTS_RAW, tenant)]
    assert len({e["event_id"] for e in events}) == 5


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            "occurred_at,order_id,custmer_id,product_sku,quantity",
            [
                "unknown column 'custmer_id'",
                "did you mean 'customer_id'?",
                "missing column 'customer_id'",
            ],
        ),
        (
            "occurred_at,order_id,customer_id,product_sku,quantity,colour",
            ["unknown column 'colour'"],
        ),
        ("order_id,customer_id,product_sku,quantity", ["missing column 'occurred_at'"]),
        (
            "occurred_at,order_id,customer_id,product_sku,quantity,quantity",
            ["column 'quantity' appears twice"],
        ),
        ("occurred_at,order_id,customer_id,product_sku", ["missing column 'quantity'"]),
    ],
)
async def test_csv_header_problems_refuse_the_request_with_a_precise_message(
    gateway: Gateway, header: str, expected: list[str]
) -> None:
    status, answer = await gateway.post(
        csv_rows("2026-11-01T08:00:00Z,SO-1,C-1,B,1", header=header),
        "text/csv",
        type="sales_order_line",
    )
    assert status == 400
    for fragment in expected:
        assert fragment in answer["error"]
    assert await read_topic(gateway.settings, EVENTS_RAW, gateway.tenant) == []


async def test_csv_with_optional_columns_left_out_and_nested_payload_names(
    gateway: Gateway,
) -> None:
    header = "occurred_at,payload.site_id,payload.product_sku,on_hand"
    status, answer = await gateway.post(
        csv_rows("2026-11-02T00:00:00Z,WH-1,BOLT-M8,120.5", header=header),
        "text/csv",
        type="inventory_level",
    )
    assert (status, answer["accepted"]) == (202, 1), answer
    [record] = await read_topic(gateway.settings, EVENTS_RAW, gateway.tenant)
    payload = orjson.loads(record.value)["payload"]
    assert payload["site_id"] == "WH-1" and payload["on_hand"] == 120.5 and payload["unit"] is None


# --------------------------------------------------------------------------- whole-request errors


@pytest.mark.parametrize(
    ("body", "content_type", "params", "status", "fragment"),
    [
        (b"[{]", "application/json", {}, 400, "not valid JSON"),
        (b'{"type": "sales_order_line"}', "application/json", {}, 400, "JSON array"),
        (b'"text"', "application/json", {}, 400, "JSON array"),
        (b"", "application/json", {}, 400, "empty"),
        (b"", "application/x-ndjson", {}, 400, "empty"),
        (b"[]", "application/xml", {}, 415, "unsupported content type"),
        (b"[]", "application/octet-stream", {}, 415, "unsupported content type"),
        (b"[]", "application/json; charset=latin-1", {}, 415, "UTF-8"),
        (b"a,b\n1,2\n", "text/csv", {}, 400, "?type="),
        (b"a,b\n1,2\n", "text/csv", {"type": "sales_forecast"}, 422, "unknown event type"),
        (b"a,b\n1,2\n", "text/csv", {"type": "sale_order_line"}, 422, "'sales_order_line'"),
        (
            b"a,b\n1,2\n",
            "text/csv",
            {"type": "sales_order_line", "version": "9"},
            422,
            "no version 9",
        ),
        (b"a,b\n1,2\n", "text/csv", {"type": "sales_order_line", "version": "v1"}, 422, "integer"),
        (b"\xff\xfe,\x00\n", "text/csv", {"type": "sales_order_line"}, 400, "CSV"),
    ],
)
async def test_whole_request_errors_are_precise_and_publish_nothing(
    gateway: Gateway,
    body: bytes,
    content_type: str,
    params: dict[str, str],
    status: int,
    fragment: str,
) -> None:
    got, answer = await gateway.post(body, content_type, **params)
    assert got == status, answer
    assert fragment in answer["error"] and answer["request_id"]


async def test_bodies_over_the_limit_are_refused_413_declared_or_streamed(gateway: Gateway) -> None:
    limit = gateway.settings.ingest_max_body_bytes
    big = ndjson([event(gateway.tenant, seq=i) for i in range(limit // 300 + 100)])
    assert len(big) > limit
    status, answer = await gateway.post(big, "application/x-ndjson")
    assert status == 413 and str(limit) in answer["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    response = await gateway.client.post(
        "/v1/events",
        data=chunks(),
        headers={**gateway.auth(), "Content-Type": "application/x-ndjson"},
    )
    assert response.status == 413
    assert await read_topic(gateway.settings, EVENTS_RAW, gateway.tenant) == []


async def test_junk_of_many_kinds_never_produces_a_server_error(gateway: Gateway) -> None:
    junk: list[bytes] = [
        b"\x00" * 100,
        bytes(range(256)),
        b"[" * 10_000 + b"]" * 10_000,
        b"[" * 100_000,
        b'[{"payload": ' * 1000,
        b"[null, true, 1e999, -0, [], {}]",
        b'[{"event_id": null, "tenant": ["x"], "type": {}, "schema_version": "1"}]',
        b'[{"type": "sales_order_line", "schema_version": 1e308, "payload": [1]}]',
        b'[{"type": "sales_order_line", "schema_version": true}]',
        b'[{"occurred_at": "yesterday", "type": "text_document", "schema_version": 1}]',
        b'{"a":1}\n[1,2]\n"x"\nnull\n',
        b"\xef\xbb\xbf[]",
        "中文,列\n值,值\n".encode("gb18030"),
        b"occurred_at,quantity\n" + b'"unterminated\n' * 10,
        b"\n\n\n,,,\n",
        b"\r\n" * 50,
    ]
    valid = orjson.dumps(event(gateway.tenant))
    for broken in (b'"\xff\xfe"', b'"\xed\xa0\x80"', b'"\xc0\xaf"'):  # not UTF-8
        record = valid.replace(b'"' + gateway.tenant.encode() + b'"', broken, 1)
        junk += [b"[" + record + b"," + valid + b"]", record + b"\n" + valid]
        record = valid.replace(b'"sales_order_line"', broken, 1)
        junk += [b"[" + record + b"]", record]
    types = ["application/json", "application/x-ndjson", "text/csv", "text/plain"]
    for body in junk:
        for content_type in types:
            params = {"type": "sales_order_line"} if content_type == "text/csv" else {}
            status, answer = await gateway.post(body, content_type, **params)
            assert status in (202, 400, 403, 413, 415, 422), (body[:40], content_type, answer)
            assert "error" in answer or "accepted" in answer


# --------------------------------------------------------------------------- authentication


async def test_keys_are_required_and_checked_and_revocation_takes_effect(gateway: Gateway) -> None:
    body = orjson.dumps([event(gateway.tenant)])
    response = await gateway.client.post(
        "/v1/events", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status == 401 and "missing API key" in (await response.json())["error"]
    for wrong in ("nonsense", gateway.key + "x", f"xt_{new_id()}_secret"):
        status, answer = await gateway.post(body, "application/json", key=wrong)
        assert status == 401, wrong
    response = await gateway.client.post(
        "/v1/events",
        data=body,
        headers={"X-Api-Key": gateway.key, "Content-Type": "application/json"},
    )
    assert response.status == 202

    await gateway.writer.put_key(
        gateway.key_record.model_copy(update={"revoked_at": datetime.now(UTC)})
    )
    await until_known(gateway.registry, gateway.key, known=False)
    status, answer = await gateway.post(body, "application/json")
    assert status == 401 and "revoked" in answer["error"]


async def test_a_record_for_another_tenant_refuses_the_whole_request(gateway: Gateway) -> None:
    rival = f"t{new_id()}"
    rival_key = await gateway.add_tenant(rival)
    mixed = [event(gateway.tenant, seq=0), event(rival, seq=1), event(gateway.tenant, seq=2)]
    status, answer = await gateway.post(orjson.dumps(mixed), "application/json")
    assert status == 403 and answer["index"] == 1 and rival in answer["error"]
    status, answer = await gateway.post(ndjson(mixed[1:]), "application/x-ndjson")
    assert status == 403
    assert await read_topic(gateway.settings, EVENTS_RAW, gateway.tenant) == []
    assert await read_topic(gateway.settings, EVENTS_RAW, rival) == []

    # The rival's own key publishes in its own name only.
    status, answer = await gateway.post(
        orjson.dumps([event(None)]), "application/json", key=rival_key
    )
    assert (status, answer["accepted"]) == (202, 1)
    [record] = await read_topic(gateway.settings, EVENTS_RAW, rival)
    assert orjson.loads(record.value)["tenant"] == rival


async def test_a_consumer_tenant_may_not_publish(gateway: Gateway) -> None:
    bank = f"t{new_id()}"
    key = await gateway.add_tenant(bank, kind="consumer")
    status, answer = await gateway.post(orjson.dumps([event(None)]), "application/json", key=key)
    assert status == 403 and "consumer" in answer["error"]


# --------------------------------------------------------------------------- operations


async def test_health_readiness_and_metrics_need_no_key_and_count_what_happened(
    gateway: Gateway,
) -> None:
    """Health and readiness on both ports (load balancers probe the partner one); the metrics
    only on the operator port: a partner gets 404 for /metrics, with or without a key."""
    client = gateway.client
    operator = TestClient(TestServer(create_operator_app(client.app), host="127.0.0.1"))
    await operator.start_server()
    for served in (client, operator):
        assert (await served.get("/healthz")).status == 200
        ready = await served.get("/readyz")
        assert ready.status == 200, await ready.text()
    assert (await client.get("/metrics")).status == 404
    assert (await client.get("/metrics", headers=gateway.auth())).status == 404

    bad = event(gateway.tenant, seq=1)
    bad["payload"]["quantity"] = "lots"
    await gateway.post(orjson.dumps([event(gateway.tenant), bad]), "application/json")
    await gateway.post(b"[", "application/json")
    await gateway.post(b"[]", "application/json", key="nope")

    text = await (await operator.get("/metrics")).text()
    await operator.close()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    route = 'route="/v1/events"'
    assert samples[f'xietong_ingest_http_requests_total{{method="POST",{route},status="202"}}'] == 1
    assert samples[f'xietong_ingest_http_requests_total{{method="POST",{route},status="400"}}'] == 1
    assert samples[f'xietong_ingest_http_requests_total{{method="POST",{route},status="401"}}'] == 1
    assert samples['xietong_ingest_records_accepted_total{format="json"}'] == 1
    assert samples['xietong_ingest_records_refused_total{reason="invalid event"}'] == 1
    assert samples["xietong_ingest_publish_seconds_count"] == 1


async def test_the_process_serves_the_metrics_on_the_operator_port(
    settings: XietongSettings,
) -> None:
    port = free_port()
    app = create_app(ingest_settings(settings, ingest_metrics_port=port))
    app.cleanup_ctx.append(operator_port)  # as python -m services.ingest does
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                assert response.status == 200
                assert "xietong_ingest_http_requests" in await response.text()
            async with session.get(f"http://127.0.0.1:{port}/readyz") as response:
                assert response.status == 200
        assert (await client.get("/metrics")).status == 404
    finally:
        await client.close()


async def test_openapi_documents_exactly_the_served_routes_and_the_models(
    settings: XietongSettings,
) -> None:
    async for running in running_gateway(ingest_settings(settings, ingest_with_insights=True)):
        response = await running.client.get("/openapi.json")  # public: no key
        assert response.status == 200
        document = await response.json()
        app = running.client.app
        served = {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.resource is not None and route.method != "HEAD"
        }
        documented = {
            (method.upper(), path)
            for path, operations in document["paths"].items()
            for method in operations
        }
        assert documented == served
        gateway_routes = {
            ("POST", "/v1/events"),
            ("GET", "/healthz"),
            ("GET", "/readyz"),
            ("GET", "/openapi.json"),
        }
        assert gateway_routes < served and ("GET", "/v1/insights") in served
        assert ("GET", "/metrics") not in served  # on the operator port only
        assert document["openapi"].startswith("3.1")

        # Every reference resolves, and the components are the contracts' own schemas.
        schemas = document["components"]["schemas"]
        refs = {ref for ref in _refs(document)}
        assert refs and all(ref.removeprefix("#/components/schemas/") in schemas for ref in refs)
        for model in EVENT_MODELS.values():
            assert schemas[model.__name__]["properties"]["payload"] is not None
            # the gateway fills in the key's tenant: a record need not name it
            assert set(schemas[model.__name__]["required"]) == {
                name for name, info in model.model_fields.items() if info.is_required()
            } - {"tenant"}
        post = document["paths"]["/v1/events"]["post"]
        assert set(post["responses"]) == {"202", "400", "401", "403", "413", "415", "422", "503"}
        assert set(post["requestBody"]["content"]) == {
            "application/json",
            "application/x-ndjson",
            "text/csv",
        }

        # Real answers fit the documented models.
        status, answer = await running.post(
            orjson.dumps([event(running.tenant), {"type": "x"}]), "application/json"
        )
        assert status == 202 and IngestAnswer.model_validate(answer).refused == 1
        status, answer = await running.post(b"[", "application/json")
        assert status == 400 and ErrorAnswer.model_validate(answer).error


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


@pytest.mark.parametrize("lanes", [1, 3])
async def test_concurrent_requests_share_rounds_and_each_is_answered_after_its_acks(
    settings: XietongSettings, lanes: int
) -> None:
    async for gateway in running_gateway(ingest_settings(settings, ingest_producers=lanes)):
        tenant = gateway.tenant
        bodies = [ndjson([event(tenant, seq=100 * r + i) for i in range(30)]) for r in range(24)]
        answers = await asyncio.gather(*(gateway.post(b, "application/x-ndjson") for b in bodies))
        assert [status for status, _ in answers] == [202] * 24
        assert sum(answer["accepted"] for _, answer in answers) == 720
        raw = [orjson.loads(r.value) for r in await read_topic(settings, EVENTS_RAW, tenant)]
        assert len({e["event_id"] for e in raw}) == len(raw) == 720
        # The records of one request stay in order on the tenant's partition.
        order = [e["payload"]["order_id"] for e in raw]
        for r in range(24):
            mine = [o for o in order if int(o[3:]) // 100 == r]
            assert mine == sorted(mine)
        registry = gateway.client.app[METRICS_KEY].registry  # served on the operator port
        rounds = registry.get_sample_value("xietong_ingest_publish_round_requests_count")
        assert rounds is not None and 1 <= rounds <= 24


async def test_a_broker_that_does_not_acknowledge_gives_503_not_202(
    settings: XietongSettings,
) -> None:
    quick = ingest_settings(settings, ingest_publish_timeout_seconds=2, ingest_producers=1)
    async for running in running_gateway(quick):
        publisher = running.client.app[PUBLISHER_KEY]
        await publisher.producer.stop()  # nothing can be acknowledged any more
        status, answer = await running.post(
            orjson.dumps([event(running.tenant)]), "application/json"
        )
        assert status == 503 and "retry" in answer["error"]


async def test_gzip_bodies_are_accepted_and_the_limit_counts_what_they_inflate_to(
    gateway: Gateway,
) -> None:
    records = [event(gateway.tenant, seq=i) for i in range(50)]
    headers = {**gateway.auth(), "Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"}
    response = await gateway.client.post(
        "/v1/events", data=gzip.compress(ndjson(records)), headers=headers
    )
    assert response.status == 202 and (await response.json())["accepted"] == 50

    limit = gateway.settings.ingest_max_body_bytes
    bomb = gzip.compress(b" " * (limit * 4))  # a few KiB that inflate past the limit
    assert len(bomb) < limit // 10
    response = await gateway.client.post("/v1/events", data=bomb, headers=headers)
    assert response.status == 413


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_is_not_what_its_content_encoding_says_is_a_400_with_the_reason(
    gateway: Gateway, encoding: str
) -> None:
    body = ndjson([event(gateway.tenant)])
    for sent in (body, b"\x1f\x8b\x08\x00" + body)[: 2 if encoding == "gzip" else 1]:
        # not compressed at all; a gzip header, then no deflate stream
        headers = {
            **gateway.auth(),
            "Content-Type": "application/x-ndjson",
            "Content-Encoding": encoding,
        }
        response = await gateway.client.post("/v1/events", data=sent, headers=headers)
        answer = await response.json(content_type=None)
        assert response.status == 400, (sent[:8], answer)
        assert encoding in answer["error"] and answer["request_id"]
    assert await read_topic(gateway.settings, EVENTS_RAW, gateway.tenant) == []
