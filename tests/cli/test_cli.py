"""The ``xietong`` CLI through click's CliRunner against the real local Kafka, and ``publish``
through a gateway run as ``python -m services.ingest`` (stopped with SIGTERM)."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner, Result

from deploy.local.infra import free_port
from schemas.topics import EVENTS_RAW, dlq
from shared.control import ControlRegistry, new_id
from shared.settings import XietongSettings
from tests.factories import sales_event
from tests.ingest.test_gateway import read_topic
from tests.processes import gateway_process
from xietong.cli import main

pytestmark = pytest.mark.integration


def xietong(settings: XietongSettings, *args: str, env: dict[str, str] | None = None) -> Result:
    runner = CliRunner()
    return runner.invoke(
        main, ["--kafka", settings.kafka_bootstrap_servers, *args], env=env, catch_exceptions=False
    )


def registry_sees(settings: XietongSettings, key: str, known: bool) -> bool:
    """Wait (up to 20 s) until a fresh registry does (not) authenticate ``key``."""

    async def poll() -> bool:
        async with ControlRegistry(settings) as registry:
            async with asyncio.timeout(20):
                while (registry.authenticate(key) is not None) != known:
                    await registry.wait_changed(registry.version, 1)
        return True

    return asyncio.run(poll())


def gateway_knows(url: str, key: str) -> None:
    """The gateway's registry learns a new key moments later: wait until ``[]`` is accepted."""
    deadline = time.monotonic() + 20
    while True:
        request = urllib.request.Request(
            f"{url}/v1/events",
            data=b"[]",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 202:
                    return
        except urllib.error.HTTPError as error:
            assert error.code == 401, error.code
        assert time.monotonic() < deadline, "the gateway never learned the key"
        time.sleep(0.2)


def add_tenant_with_key(settings: XietongSettings, kind: str = "partner") -> tuple[str, str]:
    tenant = f"t{new_id()}"
    added = xietong(settings, "tenants", "add", tenant, "--name", "Acme 精密", "--kind", kind)
    assert added.exit_code == 0, added.output
    issued = xietong(settings, "keys", "issue", tenant, "--label", "ci")
    assert issued.exit_code == 0, issued.output
    return tenant, issued.stdout.strip()


def test_tenants_and_keys_are_added_listed_issued_and_revoked(settings: XietongSettings) -> None:
    tenant = f"t{new_id()}"
    result = xietong(
        settings,
        "tenants",
        "add",
        tenant,
        "--name",
        "Zhongshan Steel 中山钢铁",
        "--industry",
        "steel",
        "--region",
        "cn-south",
    )
    assert result.exit_code == 0 and f"tenant {tenant} added" in result.output
    bad = xietong(settings, "tenants", "add", "Not A Tenant!", "--name", "x")
    assert bad.exit_code == 2 and "tenant" in bad.output
    listed = xietong(settings, "tenants", "list")
    line = next(line for line in listed.stdout.splitlines() if line.startswith(tenant))
    assert "partner" in line and "中山钢铁" in line and "steel" in line and "cn-south" in line

    unknown = xietong(settings, "keys", "issue", f"t{new_id()}")
    assert unknown.exit_code == 1 and "no active tenant" in unknown.output

    issued = xietong(settings, "keys", "issue", tenant, "--label", "erp export")
    assert issued.exit_code == 0
    key = issued.stdout.strip()
    key_id = key.split("_")[1]
    assert key.startswith("xt_") and "shown only now" in issued.stderr
    assert registry_sees(settings, key, known=True)

    keys = xietong(settings, "keys", "list", tenant)
    assert key_id in keys.stdout and "erp export" in keys.stdout and "active" in keys.stdout
    assert key.split("_", 2)[2] not in keys.output  # never the secret
    other = xietong(settings, "keys", "list", f"t{new_id()}")
    assert key_id not in other.stdout

    revoked = xietong(settings, "keys", "revoke", key_id)
    assert revoked.exit_code == 0 and "revoked" in revoked.output
    assert registry_sees(settings, key, known=False)
    assert "revoked" in xietong(settings, "keys", "list", tenant).stdout
    again = xietong(settings, "keys", "revoke", key_id)
    assert again.exit_code == 0 and "already revoked" in again.output
    missing = xietong(settings, "keys", "revoke", "ffffffffffffffff")
    assert missing.exit_code == 1 and "no key" in missing.output


# --------------------------------------------------------------------------- publish


@pytest.fixture
def gateway_url(settings: XietongSettings, tmp_path: Path) -> Iterator[str]:
    """``python -m services.ingest`` on a free port; stopped with SIGTERM, which must be clean."""
    with gateway_process(
        settings,
        tmp_path / "gateway.log",
        XIETONG_KAFKA_PARTITIONS="3",
        XIETONG_INGEST_WITH_INSIGHTS="false",
    ) as url:
        yield url


CSV = """occurred_at,record_id,order_id,customer_id,product_sku,quantity,unit_price
2026-11-01T08:00:00+08:00,R0,SO-0,C-0,BOLT-M8,1,2.5
2026-11-01T08:01:00+08:00,R1,SO-1,C-1,BOLT-M8,2,2.5
2026-11-01T08:02:00+08:00,R2,SO-2,,BOLT-M8,3,2.5
2026-11-01T08:03:00+08:00,R3,SO-3,C-3,螺栓,4,

2026-11-01T08:04:00+08:00,R4,SO-4,C-4,BOLT-M8,-5,2.5
2026-11-01T08:05:00+08:00,R5,SO-5,C-5,BOLT-M8,6,2.5
2026-11-01T08:06:00+08:00,R6,SO-6,C-6,BOLT-M8,7,2.5
"""


def test_publish_a_csv_file_through_the_gateway_in_batches(
    settings: XietongSettings, gateway_url: str, tmp_path: Path
) -> None:
    tenant, key = add_tenant_with_key(settings)
    gateway_knows(gateway_url, key)
    path = tmp_path / "orders.csv"
    path.write_text(CSV, encoding="utf-8")
    args = ["publish", str(path), "--type", "sales_order_line", "--url", gateway_url]
    result = xietong(settings, *args, "--batch-size", "3", env={"XIETONG_API_KEY": key})

    assert result.exit_code == 2, result.output  # some records were refused
    assert "7 records: 5 accepted, 2 refused" in result.stdout
    assert "record 2: payload.customer_id: Field required" in result.stdout
    assert "record 4: payload.quantity" in result.stdout  # file-wide index across batches
    assert "7/7" in result.stderr  # the progress bar
    events = [orjson.loads(r.value) for r in asyncio.run(read_topic(settings, EVENTS_RAW, tenant))]
    assert sorted(e["source"]["record_id"] for e in events) == ["R0", "R1", "R3", "R5", "R6"]
    letters = asyncio.run(read_topic(settings, dlq(EVENTS_RAW), tenant))
    assert len(letters) == 2

    # The same file again, but straight to Kafka: the same batches give the same event ids.
    direct = xietong(settings, *args, "--batch-size", "3", "--direct", "--tenant", tenant)
    assert direct.exit_code == 2 and "5 accepted, 2 refused" in direct.stdout
    again = [orjson.loads(r.value) for r in asyncio.run(read_topic(settings, EVENTS_RAW, tenant))]
    assert len(again) == 10 and len({e["event_id"] for e in again}) == 5

    revoked = xietong(settings, "keys", "revoke", key.split("_")[1])
    assert revoked.exit_code == 0
    deadline = time.monotonic() + 20
    while True:
        refused = xietong(settings, *args, env={"XIETONG_API_KEY": key})
        if refused.exit_code == 1:
            break
        assert time.monotonic() < deadline, refused.output
        time.sleep(0.5)
    assert "401" in refused.output


def test_publish_ndjson_and_json_files_through_the_gateway_and_directly(
    settings: XietongSettings, gateway_url: str, tmp_path: Path
) -> None:
    tenant, key = add_tenant_with_key(settings)
    gateway_knows(gateway_url, key)
    records = [sales_event(tenant, seq=i) for i in range(25)]
    untyped = sales_event(tenant, seq=99)
    del untyped["type"], untyped["schema_version"]
    ndjson = tmp_path / "orders.ndjson"
    ndjson.write_bytes(
        b"\n".join([orjson.dumps(r) for r in records] + [b"{not json", orjson.dumps(untyped)])
        + b"\n"
    )
    result = xietong(
        settings,
        "publish",
        str(ndjson),
        "--type",
        "sales_order_line",
        "--url",
        gateway_url,
        "--api-key",
        key,
        "--batch-size",
        "10",
    )
    assert result.exit_code == 2, result.output
    assert "27 records: 26 accepted, 1 refused" in result.stdout  # --type filled the untyped one
    assert "record 25: (record): invalid JSON" in result.stdout

    as_array = tmp_path / "more.json"
    more = [sales_event(tenant, seq=100 + i) for i in range(5)]
    as_array.write_bytes(orjson.dumps(more))
    direct = xietong(settings, "publish", str(as_array), "--direct", "--tenant", tenant)
    assert direct.exit_code == 0, direct.output
    assert "5 records: 5 accepted, 0 refused" in direct.stdout
    events = [orjson.loads(r.value) for r in asyncio.run(read_topic(settings, EVENTS_RAW, tenant))]
    assert len(events) == 31

    foreign = tmp_path / "foreign.json"
    foreign.write_bytes(orjson.dumps([sales_event(f"t{new_id()}")]))
    refused = xietong(settings, "publish", str(foreign), "--direct", "--tenant", tenant)
    assert refused.exit_code == 1 and "belongs to" in refused.output
    nobody = xietong(settings, "publish", str(as_array), "--direct", "--tenant", f"t{new_id()}")
    assert nobody.exit_code == 1 and "no active partner tenant" in nobody.output
    no_key = xietong(settings, "publish", str(as_array), "--url", gateway_url)
    assert no_key.exit_code == 2 and "XIETONG_API_KEY" in no_key.output


def test_publish_retries_a_gateway_that_does_not_answer_then_gives_up(
    settings: XietongSettings, tmp_path: Path
) -> None:
    path = tmp_path / "one.json"
    path.write_bytes(orjson.dumps([sales_event("acme")]))
    nobody = f"http://127.0.0.1:{free_port()}"
    result = xietong(
        settings, "publish", str(path), "--url", nobody, "--api-key", "xt_a_b", "--retries", "1"
    )
    assert result.exit_code == 1
    assert result.stderr.count("retrying") == 1 and "after 2 attempts" in result.stderr
