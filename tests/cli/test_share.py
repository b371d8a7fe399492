"""``xietong share`` and ``xietong subscribe`` against a running gateway app on the real broker.

The commands call ``asyncio.run`` themselves, so they run in a worker thread while the gateway
serves on the test's event loop.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import click
import pytest
from click.testing import CliRunner, Result

from schemas.insights import Statistics
from shared.codec import decode
from shared.settings import XietongSettings
from tests.insight_helpers import benchmark, gateway_app, network, prediction, publish, statistics
from xietong.cli import main
from xietong.share import describe_insight, parse_until, share, split_types, subscribe


def test_until_accepts_a_date_or_a_timestamp_in_utc() -> None:
    assert parse_until("2027-01-01") == datetime(2027, 1, 1, tzinfo=UTC)
    assert parse_until("2027-01-01T08:00:00+08:00") == datetime(2027, 1, 1, tzinfo=UTC)
    assert parse_until(None) is None
    with pytest.raises(click.BadParameter):
        parse_until("next spring")


def test_types_are_split_and_checked() -> None:
    assert split_types(("statistics,benchmark", "prediction")) == [
        "statistics",
        "benchmark",
        "prediction",
    ]
    with pytest.raises(click.BadParameter, match="gossip"):
        split_types("statistics,gossip")


def test_terminal_lines_name_the_owner_and_the_numbers() -> None:
    line = describe_insight(statistics("acme", metric="sales.qty", mean=12.5))
    assert "statistics" in line and "acme" in line and "sales.qty" in line and "mean=12.5" in line
    assert "firms=5" in describe_insight(benchmark("m"))
    assert "demand=3" in describe_insight(prediction("acme"))


async def invoke(command: click.Command, *args: str) -> Result:
    result = await asyncio.to_thread(CliRunner().invoke, command, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.mark.integration
async def test_grant_subscribe_revoke_from_the_shell(settings: XietongSettings) -> None:
    async with gateway_app(settings) as gateway:
        net = gateway.net
        a = ("--url", gateway.url, "--api-key", net.keys[net.a])
        b = ("--url", gateway.url, "--api-key", net.keys[net.b])

        granted = await invoke(
            share,
            "grant",
            *a,
            "--to",
            net.b,
            "--types",
            "statistics",
            "--until",
            "2099-01-01",
            "--purpose",
            "test",
            "--json",
        )
        grant_id = decode(granted.stdout)["grant_id"]
        listed = await invoke(share, "list", *b)
        assert grant_id in listed.stdout and net.a in listed.stdout

        # B subscribes as NDJSON; A keeps publishing until B got one of A's statistics.
        # A's predictions are not granted and must not show up first.
        watching = asyncio.create_task(
            invoke(subscribe, *b, "--ndjson", "--owner", net.a, "--count", "1")
        )
        async with asyncio.timeout(60):
            while not watching.done():
                await publish(settings, [prediction(net.a), statistics(net.a)])
                await asyncio.wait({watching}, timeout=0.5)
        received = Statistics.model_validate(decode(watching.result().stdout.splitlines()[0]))
        assert received.tenant == net.a

        revoked = await invoke(share, "revoke", *a, grant_id)
        assert grant_id in revoked.stdout
        audit = await invoke(share, "audit", *a, "--json")
        actions = [decode(line)["action"] for line in audit.stdout.splitlines()]
        assert actions == ["granted", "revoked"]

        refused = await asyncio.to_thread(CliRunner().invoke, share, ["revoke", *b, grant_id])
        assert refused.exit_code != 0 and "403" in refused.output


@pytest.mark.integration
async def test_operator_subscribes_over_kafka_with_the_same_rule(settings: XietongSettings) -> None:
    async with network(settings) as net:
        foreign, own = statistics(net.a), statistics(net.b)
        await publish(settings, [foreign, own])
        # The broker comes from the group's --kafka (an unreachable one in the environment
        # shows the option wins); --as-tenant is whose view is read.
        env = {"XIETONG_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9"}
        result = await asyncio.to_thread(
            CliRunner(env=env).invoke,
            main,
            # Everyone's statistics since the topic began pass by; the first B may read is its own.
            [
                "--kafka",
                settings.kafka_bootstrap_servers,
                "subscribe",
                "--as-tenant",
                net.b,
                "--ndjson",
                "--count",
                "1",
                "--type",
                "statistics",
            ],
        )
        assert result.exit_code == 0, (result.output, result.exception)
        assert Statistics.model_validate(decode(result.stdout.splitlines()[0])) == own


def test_share_and_subscribe_are_commands_of_the_xietong_cli() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert {"share", "subscribe", "tenants", "keys", "publish"} <= set(main.commands)
